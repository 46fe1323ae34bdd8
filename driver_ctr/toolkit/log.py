"""Structured logging for both sides (structlog, vendored in the DTK zipapp).

JSON lines when stdout is not a terminal (the pod case), readable key=value
on a terminal; ``DRIVER_CTR_LOG_FORMAT=json|console`` overrides. Log lines go
to stderr so that stdout stays free for command output (``status --json``).
Every event passes through :func:`_redact` so secret-looking fields and proxy
credentials never reach the log in clear.
"""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Any, Iterator, Mapping, MutableMapping, Optional, TextIO

import structlog

from .errors import InvalidValue
from .redact import redact_mapping

LOG_FORMATS = ("json", "console")


def _redact(_logger: Any, _name: str, event: MutableMapping[str, Any]) -> Mapping[str, Any]:
    return redact_mapping(dict(event))


def choose_format(env_value: Optional[str], stdout: TextIO) -> str:
    """The log format for ``DRIVER_CTR_LOG_FORMAT`` (may be unset) and stdout."""
    if env_value:
        v = env_value.strip().lower()
        if v not in LOG_FORMATS:
            raise InvalidValue("DRIVER_CTR_LOG_FORMAT", env_value, "json or console")
        return v
    try:
        tty = stdout.isatty()
    except (AttributeError, ValueError):
        tty = False
    return "console" if tty else "json"


def configure(fmt: str = "json", stream: Optional[TextIO] = None, level: str = "info") -> None:
    """Configure structlog once per process (the CLI calls this)."""
    stream = stream if stream is not None else sys.stderr
    renderer: Any
    if fmt == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=False)
    else:
        renderer = structlog.processors.JSONRenderer(sort_keys=False)
    levels = {"debug": 10, "info": 20, "warning": 30, "error": 40}
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _redact,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(levels.get(level, 20)),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )


def get_logger(**initial: Any) -> Any:
    return structlog.get_logger(**initial)


@contextlib.contextmanager
def phase(log: Any, name: str, **fields: Any) -> Iterator[MutableMapping[str, Any]]:
    """Log the start, end, outcome and duration of one phase.

    The yielded dict collects fields to add to the end event. An exception
    marks the outcome ``failed`` with its type and message and propagates.
    """
    extra: MutableMapping[str, Any] = {}
    start = time.monotonic()
    log.info("phase start", phase=name, **fields)
    try:
        yield extra
    except BaseException as exc:
        log.warning(
            "phase end",
            phase=name,
            outcome="failed",
            error_type=type(exc).__name__,
            error=str(exc).splitlines()[0] if str(exc) else "",
            duration_s=round(time.monotonic() - start, 3),
            **fields,
            **extra,
        )
        raise
    log.info(
        "phase end",
        phase=name,
        outcome=extra.pop("outcome", "ok"),
        duration_s=round(time.monotonic() - start, 3),
        **fields,
        **extra,
    )
