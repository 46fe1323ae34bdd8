"""The one seam through which every child process runs.

argv lists only, never a shell string. One behaviour with or without
cancellation: stdout and stderr are both kept (or both go to a log file),
input can be given, a timeout ends the child. With a
:class:`~driver_ctr.toolkit.waiting.Cancellation` the child runs in its own
process group, which is terminated (then killed) when the cancellation is
set, and nothing new starts once it is. The runner logs the argv at debug
level (``DRIVER_CTR_LOG_LEVEL=debug``: a full transcript) and raises
:class:`CommandFailed` with the output tails on failure. Test doubles live in
``tests/``.
"""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

from .errors import CommandFailed
from .log import get_logger

if TYPE_CHECKING:
    from .waiting import Cancellation

_log = get_logger()

TICK_S = 0.5  # how often a cancellable run looks at its cancellation


@dataclass(frozen=True)
class Result:
    argv: Tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str
    stdout_bytes: bytes = b""


class Runner:
    """Runs real processes; with a cancellation (``Runner(cancel)`` or
    :meth:`with_cancel`) every run is cancellable and none starts after a TERM.
    Undo work (unload, unmount) uses a runner without one: it must still run
    after the signal."""

    def __init__(self, cancel: Optional["Cancellation"] = None) -> None:
        self.cancel = cancel

    def with_cancel(self, cancel: Optional["Cancellation"]) -> "Runner":
        """This runner, with every run bound to ``cancel``."""
        other = copy.copy(self)
        other.cancel = cancel
        return other

    def run(
        self,
        argv: Sequence[Union[str, "os.PathLike[str]"]],
        *,
        timeout: Optional[float] = None,
        check: bool = True,
        env: Optional[Mapping[str, str]] = None,
        cwd: Optional[Union[str, "os.PathLike[str]"]] = None,
        stdout_file: Optional[IO[bytes]] = None,
        input_bytes: Optional[bytes] = None,
        cancel: Optional["Cancellation"] = None,
    ) -> Result:
        """Run ``argv``; with ``stdout_file`` both streams go to that file
        (a build log) and the result carries empty strings.

        Raises ``Cancelled`` when ``cancel`` is (or becomes) set, and
        :class:`CommandFailed` when the child cannot start, times out, or
        exits non-zero with ``check``.
        """
        args = [str(a) for a in argv]
        cancel = cancel if cancel is not None else self.cancel
        if cancel is not None:
            cancel.check()  # nothing new starts after a TERM
        _log.debug("run", argv=args, cwd=str(cwd) if cwd else None)
        try:
            proc = subprocess.Popen(
                args,
                stdin=subprocess.PIPE if input_bytes is not None else subprocess.DEVNULL,
                stdout=stdout_file if stdout_file is not None else subprocess.PIPE,
                stderr=subprocess.STDOUT if stdout_file is not None else subprocess.PIPE,
                env=dict(env) if env is not None else None,
                cwd=cwd,
                start_new_session=cancel is not None,
            )
        except FileNotFoundError:
            raise CommandFailed(args, None, reason="could not start: %s not found" % args[0]) from None
        except PermissionError as exc:
            raise CommandFailed(args, None, reason="could not start: %s" % exc) from None
        out, err = self._communicate(proc, args, input_bytes, timeout, cancel)
        stdout, stderr = out.decode("utf-8", "replace"), err.decode("utf-8", "replace")
        _log.debug("ran", argv=args, returncode=proc.returncode, stdout=stdout[-2000:], stderr=stderr[-2000:])
        if check and proc.returncode != 0:
            raise CommandFailed(args, proc.returncode, stdout, stderr)
        return Result(tuple(args), proc.returncode, stdout, stderr, out)

    @contextmanager
    def stream(
        self,
        argv: Sequence[Union[str, "os.PathLike[str]"]],
        *,
        env: Optional[Mapping[str, str]] = None,
        cancel: Optional["Cancellation"] = None,
    ) -> Iterator[IO[bytes]]:
        """Run ``argv`` with its stdout as a pipe the caller reads (an archive unpacked as it streams, never
        held whole); stderr is kept in a temporary file for the error. On leaving, a child the caller stopped
        reading from is ended (its process group); one that exits non-zero is :class:`CommandFailed`."""
        args = [str(a) for a in argv]
        cancel = cancel if cancel is not None else self.cancel
        if cancel is not None:
            cancel.check()  # nothing new starts after a TERM
        _log.debug("stream", argv=args)
        with tempfile.TemporaryFile() as err:
            try:
                proc = subprocess.Popen(
                    args,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=err,
                    env=dict(env) if env is not None else None,
                    start_new_session=True,
                )
            except (FileNotFoundError, PermissionError) as exc:
                raise CommandFailed(args, None, reason="could not start: %s" % exc) from None
            assert proc.stdout is not None
            try:
                yield proc.stdout
                proc.stdout.read()  # whatever the caller left, so the child is not stuck on a full pipe
                proc.wait()
            finally:
                proc.stdout.close()
                if proc.poll() is None:
                    _stop(proc, True)
            if proc.returncode != 0:
                err.seek(0)
                raise CommandFailed(args, proc.returncode, "", err.read(64 << 10).decode("utf-8", "replace"))

    @staticmethod
    def _communicate(
        proc: "subprocess.Popen[bytes]",
        args: List[str],
        input_bytes: Optional[bytes],
        timeout: Optional[float],
        cancel: Optional["Cancellation"],
    ) -> Tuple[bytes, bytes]:
        deadline = None if timeout is None else time.monotonic() + timeout
        outs: List[bytes] = []
        errs: List[bytes] = []
        data = input_bytes
        try:
            while True:
                step = None if deadline is None else max(0.0, deadline - time.monotonic())
                if cancel is not None:
                    step = TICK_S if step is None else min(step, TICK_S)
                try:
                    out, err = proc.communicate(input=data, timeout=step)
                    outs.append(out or b"")
                    errs.append(err or b"")
                    return b"".join(outs), b"".join(errs)
                except subprocess.TimeoutExpired as exc:
                    data = None  # the input was handed over on the first call
                    partial = (exc.stdout or b"", exc.stderr or b"")
                if cancel is not None and cancel.cancelled:
                    _stop(proc, cancel is not None)
                    cancel.check()
                if deadline is not None and time.monotonic() >= deadline:
                    _stop(proc, cancel is not None)
                    raise CommandFailed(
                        args,
                        None,
                        _text(partial[0]),
                        _text(partial[1]),
                        reason="timed out after %.0f s" % (timeout or 0),
                    )
        finally:
            if proc.poll() is None:
                _stop(proc, cancel is not None)


def _text(b: object) -> str:
    return b.decode("utf-8", "replace") if isinstance(b, bytes) else ""


def _stop(proc: "subprocess.Popen[bytes]", group: bool, grace_s: float = 5.0) -> None:
    """TERM the child (its whole process group when it has one), KILL it after ``grace_s``."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        try:
            if group:
                os.killpg(proc.pid, sig)
            else:
                proc.send_signal(sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


_default: Optional[Runner] = None


def default_runner() -> Runner:
    """The process-wide runner, for code far from any command (decompressing a module)."""
    global _default
    if _default is None:
        _default = Runner()
    return _default
