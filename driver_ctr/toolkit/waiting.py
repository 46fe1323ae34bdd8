"""Event-driven waits with deadlines and cancellation.

A wait wakes on inotify events in the watched directory (``inotify_simple``,
vendored in the zipapp) and re-checks its condition; a periodic re-check
covers filesystems without inotify. Every wait has a deadline, is cancelled
by a stop signal (TERM, INT, HUP, QUIT, PIPE) within half a second, and logs progress at a modest interval.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar

from .errors import Cancelled, HandoffTimeout
from .log import Logger

T = TypeVar("T")

TICK_S = 0.5  # longest sleep between checks of the cancel flag
# What stops a command, as NVIDIA's script traps them: with hostPID the process is not PID 1, and any of
# these would otherwise kill it without the undo (pid file, NotReady, modules and mounts left as they were).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGPIPE)


class Cancellation:
    """Set by a stop signal (:data:`STOP_SIGNALS`, after :meth:`install`) or by a test.

    The one installed in this process is also :func:`check_cancelled`'s: a long loop of pure Python (a
    verifying copy, unpacking a package) that is not handed a cancellation checks the process's own."""

    installed: Optional["Cancellation"] = None

    def __init__(self) -> None:
        self._event = threading.Event()
        self.signal_name = ""

    def install(self) -> "Cancellation":
        def handler(signum: int, _frame: Any) -> None:
            self.signal_name = signal.Signals(signum).name
            self._event.set()

        for signum in STOP_SIGNALS:
            signal.signal(signum, handler)
        Cancellation.installed = self
        return self

    def set(self) -> None:
        self._event.set()

    def clear(self) -> None:
        """Forget the last signal (a shutdown that could not finish waits for the next one)."""
        self._event.clear()
        self.signal_name = ""

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def check(self) -> None:
        if self._event.is_set():
            raise Cancelled("stopped by %s" % (self.signal_name or "request"))

    def sleep(self, seconds: float) -> None:
        self._event.wait(seconds)


def check_cancelled() -> None:
    """Raise :class:`Cancelled` when the process's installed cancellation is set (a signal came)."""
    if Cancellation.installed is not None:
        Cancellation.installed.check()


class DirWatch:
    """Wake-ups on changes in one directory; polling when inotify is unavailable. A directory that does not
    exist yet is never created: its nearest existing ancestor is watched (its creation wakes the wait)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._ino: Any = None
        try:
            from inotify_simple import INotify, flags

            ino = INotify()
            mask = (
                flags.CREATE
                | flags.MODIFY
                | flags.CLOSE_WRITE
                | flags.MOVED_TO
                | flags.MOVED_FROM
                | flags.DELETE
                | flags.ATTRIB
                | flags.DELETE_SELF
            )
            watched = directory
            while not watched.is_dir() and watched != watched.parent:
                watched = watched.parent
            ino.add_watch(str(watched), mask)
            self._ino = ino
        except (ImportError, OSError):
            self._ino = None

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds; True when something may have changed
        (an event arrived, or, without inotify, the time passed: poll then)."""
        if self._ino is None:
            time.sleep(timeout)
            return True
        return bool(self._ino.read(timeout=int(max(timeout, 0) * 1000)))

    def close(self) -> None:
        if self._ino is not None:
            self._ino.close()
            self._ino = None

    def __enter__(self) -> "DirWatch":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def wait_until(
    check: Callable[[], Optional[T]],
    *,
    directory: Path,
    what: str,
    timeout_s: Optional[float],
    cancel: Cancellation,
    log: Optional[Logger] = None,
    recheck_s: float = 5.0,
    progress_s: float = 60.0,
    clock: Callable[[], float] = time.monotonic,
) -> T:
    """Call ``check`` until it returns something other than None, and return that.

    ``check`` runs at once, on every change in ``directory`` and at least every
    ``recheck_s``; it may raise to end the wait (a failure flag). Raises
    :class:`HandoffTimeout` after ``timeout_s`` (None: no deadline, as a sidecar waiting for its
    prerequisites or an idle side) and :class:`Cancelled` on a signal.
    """
    start = clock()
    deadline = math.inf if timeout_s is None else start + timeout_s
    next_progress = start + progress_s
    told = False
    with DirWatch(directory) as watch:
        while True:
            cancel.check()
            result = check()
            if result is not None:
                return result
            now = clock()
            if log is not None and not told:  # the first check did not hold: say what is awaited, once
                log.info("waiting", what=what, waited_s=0, deadline_s=timeout_s)
                told = True
            if timeout_s is not None and now >= deadline:
                raise HandoffTimeout(what, timeout_s)
            if log is not None and now >= next_progress:
                log.info("waiting", what=what, waited_s=round(now - start), deadline_s=timeout_s)
                next_progress = now + progress_s
            # Sleep until an event, the periodic re-check or the deadline,
            # waking every TICK_S to honour a signal promptly.
            budget = min(recheck_s, deadline - now)
            waited = 0.0
            while waited < budget and not cancel.cancelled:
                if watch.wait(min(TICK_S, budget - waited)):
                    break
                waited += TICK_S
