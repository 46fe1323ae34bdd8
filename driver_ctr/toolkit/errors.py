"""The errors of driver-ctr, factored out so every module can raise them.

Each class says when it is raised. The CLI maps every :class:`DriverCtrError`
to one clear message and exit status 1; anything else is a bug and shows a
traceback.
"""

from __future__ import annotations

import re
from typing import Iterable, List, Optional, Sequence, Tuple

ECHO_LIMIT = 200  # characters of a bad value shown back in an error


class DriverCtrError(Exception):
    """Base of every error a user can act on; ``str()`` is the message."""


class InvalidValue(DriverCtrError, ValueError):
    """A value (a variable, a file field, a version string) is malformed.

    ``name`` says which input, ``value`` what it was, ``expected`` what would
    have been accepted.
    """

    def __init__(self, name: str, value: object, expected: str) -> None:
        self.name = name
        self.value = value
        self.expected = expected
        super().__init__("%s: invalid value %s: expected %s" % (name, echo(value), expected))


class SettingsError(DriverCtrError):
    """One or more settings are invalid; raised once with all of them."""

    def __init__(self, problems: Sequence[InvalidValue]) -> None:
        self.problems: List[InvalidValue] = list(problems)
        lines = ["invalid settings (%d):" % len(self.problems)]
        lines += ["  - %s" % p for p in self.problems]
        super().__init__("\n".join(lines))


class CommandFailed(DriverCtrError):
    """A child process exited non-zero (or could not be started, or timed out).

    Carries the argv, the exit status and the tails of both outputs, which is
    everything needed to diagnose it without re-running.
    """

    def __init__(
        self,
        argv: Sequence[str],
        returncode: Optional[int],
        stdout: str = "",
        stderr: str = "",
        reason: str = "",
    ) -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        self.reason = reason
        head = "command %s " % " ".join(self.argv)
        if reason:
            head += reason
        else:
            head += "exited with status %s" % returncode
        self.head = head
        parts = [head]
        for label, text in (("stderr", stderr), ("stdout", stdout)):
            t = tail_lines(text, 15)
            if t:
                parts.append("%s (last lines):\n%s" % (label, t))
        self.tail = "\n".join(parts[1:])
        super().__init__("\n".join(parts))

    @property
    def summary(self) -> str:
        """One line for a wrapping message: the head and the last line the command printed."""
        last = tail_lines(self.stderr, 1) or tail_lines(self.stdout, 1)
        return "%s: %s" % (self.head, last) if last else self.head


class ProtocolError(DriverCtrError):
    """The shared directory holds something that breaks the two-container protocol
    (a malformed manifest or settings file, a flag that is a directory, an unsafe
    staged path). ``path`` names the offending file."""

    def __init__(self, path: object, message: str) -> None:
        self.path = str(path)
        self.message = message
        super().__init__("%s: %s" % (path, message))


class BuildFailed(DriverCtrError):
    """Building the kernel modules failed; ``phase`` and ``log_tail`` say where."""

    def __init__(self, phase: str, message: str, log_tail: str = "") -> None:
        self.phase = phase
        self.message = message
        self.log_tail = log_tail
        text = "build failed in %s: %s" % (phase, message)
        if log_tail:
            text += "\nlast lines of output:\n" + log_tail
        super().__init__(text)


class NoKernelTree(BuildFailed):
    """The target kernel's build tree is not here (install kernel-devel / headers)."""

    def __init__(self, message: str) -> None:
        super().__init__("prepare", message)


class FileSystemError(DriverCtrError):
    """An operating-system error (a full disk, a name too long, a permission refused, a read-only mount)
    reached a command's boundary: said as what failed, where, and the errno's words, never a traceback.
    ``errno`` and ``path`` are the OSError's."""

    def __init__(self, exc: OSError, where: str = "") -> None:
        self.errno = exc.errno
        self.path = exc.filename
        self.where = where
        super().__init__(describe_os_error(exc, where))


def describe_os_error(exc: OSError, where: str = "") -> str:
    """``<where>: <path>: <strerror> (<ERRNO>)``: an OSError in words, with its symbolic errno."""
    import errno as _errno

    code = _errno.errorcode.get(exc.errno, "") if exc.errno is not None else ""
    words = exc.strerror or str(exc) or type(exc).__name__
    text = "%s (%s)" % (words, code) if code else words
    if exc.filename is not None:
        target = str(exc.filename)
        if exc.filename2 is not None:
            target += " -> %s" % exc.filename2
        text = "%s: %s" % (echo_path(target), text)
    return "%s: %s" % (where, text) if where else text


_IO_MODULES = ("toolkit/shared_fs.py", "toolkit/fsio.py", "toolkit/inputs.py")  # how, not which step


def innermost_step(exc: BaseException) -> str:
    """`` (in <module>.<function>)``: the innermost frame of driver-ctr's own code (above the file
    helpers) that ``exc`` passed through, the step a named OS error happened in; '' when none."""
    import traceback

    frames = [
        f
        for f in traceback.extract_tb(exc.__traceback__)
        if "driver_ctr/" in f.filename.replace("\\", "/")
        and not f.name.startswith("<")
        and not f.filename.endswith(_IO_MODULES)
    ]
    if not frames:
        return ""
    f = frames[-1]
    module = f.filename.replace("\\", "/").rsplit("driver_ctr/", 1)[-1][: -len(".py")].replace("/", ".")
    return " (in %s.%s)" % (module, f.name)


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def printable(text: str) -> str:
    """``text`` with its control characters escaped (``\\n``, ``\\x1b``): a name from the node never starts
    a line of its own nor moves a terminal's cursor."""
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], text)


def echo_path(path: str, limit: int = ECHO_LIMIT) -> str:
    """A path from the node in a message: control characters escaped (:func:`printable`), cut to ``limit``
    characters with the full length said."""
    text = printable(path)
    if len(text) <= limit:
        return text
    return "%s... (%d characters)" % (text[:limit], len(path))


class HandoffTimeout(DriverCtrError):
    """A wait of the two-container protocol passed its deadline."""

    def __init__(self, what: str, seconds: float) -> None:
        self.what = what
        self.seconds = seconds
        super().__init__("timed out after %.0f s waiting for %s" % (seconds, what))


class Cancelled(BaseException):
    """A wait or a child process was ended by a stop signal (``waiting.STOP_SIGNALS``).

    Not an :class:`Exception` (as asyncio's ``CancelledError``): an ``except
    DriverCtrError`` or ``except Exception`` that handles a failure never
    swallows a cancellation, which says nothing about what was being done
    (a cache entry being verified is not discarded on a signal)."""


class FallbackRequired(DriverCtrError):
    """The DTK cannot build for this node: the entitled build must take over.

    ``reasons`` are the human-readable lines of the decision.
    """

    def __init__(self, message: str, reasons: Iterable[str] = ()) -> None:
        self.reasons: Tuple[str, ...] = tuple(reasons)
        text = message
        if self.reasons:
            text += "\n" + "\n".join("  - %s" % r for r in self.reasons)
        super().__init__(text)


def echo(value: object, limit: int = ECHO_LIMIT) -> str:
    """``repr(value)``, cut to ``limit`` characters with the full length said:
    a 120,000-character variable is not echoed whole."""
    text = repr(value)
    if len(text) <= limit:
        return text
    length = len(value) if isinstance(value, (str, bytes)) else len(text)
    return "%s... (%d characters)" % (text[:limit], length)


def tail_lines(text: str, n: int) -> str:
    """The last ``n`` non-empty lines of ``text``."""
    lines = [l for l in (text or "").splitlines() if l.strip()]
    return "\n".join(lines[-n:])
