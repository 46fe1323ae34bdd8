"""Structured logging for both sides (structlog, vendored in the DTK zipapp).

JSON lines when stdout is not a terminal (the pod case), readable key=value
on a terminal; ``DRIVER_CTR_LOG_FORMAT=json|console`` overrides, and
``DRIVER_CTR_LOG_LEVEL`` (debug, info, warning, error) filters; at ``debug``
the runner logs every argv and its output, a full transcript. Log lines go
to stderr so that stdout stays free for command output (``status --json``).
Every event passes through :func:`_redact` so secret-looking fields and proxy
credentials never reach the log in clear.

structlog is imported when the first event is emitted, not before: it costs
70 ms (its ``dev`` and ``stdlib`` modules pull in asyncio), and a liveness
probe that has nothing to say must not pay it, nor the DTK side before it
has written ``driver_build_started``.
"""

from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass
from typing import Any, Dict, Iterator, Mapping, MutableMapping, Optional, TextIO, cast

from .errors import InvalidValue
from .redact import redact_mapping

try:  # Python >= 3.8; the annotations below are never evaluated at run time
    from typing import Protocol
except ImportError:  # pragma: no cover
    Protocol = object  # type: ignore[assignment]

LOG_FORMATS = ("json", "console")
LOG_LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}


class Logger(Protocol):
    """What the code needs of a logger (structlog's bound loggers have it)."""

    def debug(self, event: str, **kw: Any) -> Any: ...

    def info(self, event: str, **kw: Any) -> Any: ...

    def warning(self, event: str, **kw: Any) -> Any: ...

    def error(self, event: str, **kw: Any) -> Any: ...

    def bind(self, **kw: Any) -> "Logger": ...


@dataclass
class _Config:
    fmt: str = "json"
    level: str = "info"
    stream: Optional[TextIO] = None
    side: str = ""  # "driver" or "dtk": on every event of this process
    applied: bool = False


_config = _Config()


def _add_side(_logger: Any, _name: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    if _config.side:
        event.setdefault("side", _config.side)
    return event


def _redact(_logger: Any, _name: str, event: MutableMapping[str, Any]) -> Mapping[str, Any]:
    return redact_mapping(dict(event))  # type: ignore[no-any-return]


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


def configure(fmt: str = "json", stream: Optional[TextIO] = None, level: str = "info", side: str = "") -> None:
    """Say how to log (each program calls this once, naming its ``side``: every event carries it);
    structlog is set up on the first event."""
    if level not in LOG_LEVELS:
        raise InvalidValue("DRIVER_CTR_LOG_LEVEL", level, "one of " + ", ".join(LOG_LEVELS))
    _config.fmt, _config.level, _config.stream, _config.side, _config.applied = fmt, level, stream, side, False


def _structlog() -> Any:
    import structlog

    if not _config.applied:
        renderer: Any
        if _config.fmt == "console":
            renderer = structlog.dev.ConsoleRenderer(colors=False)
        else:
            renderer = structlog.processors.JSONRenderer(sort_keys=False)
        structlog.configure(
            processors=[
                _add_side,
                structlog.processors.add_log_level,
                structlog.processors.TimeStamper(fmt="iso", utc=True),
                _redact,
                renderer,
            ],
            wrapper_class=structlog.make_filtering_bound_logger(LOG_LEVELS[_config.level]),
            logger_factory=structlog.PrintLoggerFactory(file=_config.stream or cast(TextIO, _CurrentStderr())),
            cache_logger_on_first_use=False,
        )
        _config.applied = True
    return structlog


class _CurrentStderr:
    """``sys.stderr`` as it is at each write (a redirection made after the first event is followed)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


class _LazyLogger:
    """A logger whose structlog logger is made on the first event."""

    def __init__(self, initial: Dict[str, Any]) -> None:
        self._initial = initial
        self._real: Any = None

    def _log(self) -> Any:
        if self._real is None or not _config.applied:
            self._real = _structlog().get_logger(**self._initial)
        return self._real

    def debug(self, event: str, **kw: Any) -> Any:
        if LOG_LEVELS[_config.level] <= 10:
            return self._log().debug(event, **kw)
        return None

    def info(self, event: str, **kw: Any) -> Any:
        return self._log().info(event, **kw)

    def warning(self, event: str, **kw: Any) -> Any:
        return self._log().warning(event, **kw)

    def error(self, event: str, **kw: Any) -> Any:
        return self._log().error(event, **kw)

    def bind(self, **kw: Any) -> "Logger":
        return _LazyLogger(dict(self._initial, **kw))


def get_logger(**initial: Any) -> Logger:
    return _LazyLogger(dict(initial))


def first_line(exc: BaseException) -> str:
    """The first line of an error's message (for a log field)."""
    text = str(exc)
    return text.splitlines()[0] if text else type(exc).__name__


@contextlib.contextmanager
def phase(log: Logger, name: str, **fields: Any) -> Iterator[MutableMapping[str, Any]]:
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
            error=first_line(exc) if str(exc) else "",
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
