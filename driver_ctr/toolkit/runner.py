"""The one seam through which every child process runs.

argv lists only, never a shell string. The runner logs the argv at debug
level and raises :class:`CommandFailed` with the output tails on failure.
Tests substitute :class:`FakeRunner`, which refuses any argv it was not told
to expect.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from typing import IO, Any, Callable, List, Mapping, Optional, Sequence, Tuple, Union

from .errors import CommandFailed
from .log import get_logger

_log = get_logger()


@dataclass(frozen=True)
class Result:
    argv: Tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str


class Runner:
    """Runs real processes."""

    def run(
        self,
        argv: Sequence[str],
        *,
        timeout: Optional[float] = None,
        check: bool = True,
        env: Optional[Mapping[str, str]] = None,
        cwd: Optional[Union[str, "os.PathLike[str]"]] = None,
        stdout_file: Optional[IO[bytes]] = None,
        input_text: Optional[str] = None,
        cancel: Any = None,
    ) -> Result:
        """Run ``argv``; with ``stdout_file`` both streams go to that file
        (a build log) and the result carries empty strings.

        With ``cancel`` (a :class:`~driver_ctr.toolkit.waiting.Cancellation`)
        the child runs in its own process group, which is terminated (then
        killed) when the cancellation is set or the timeout passes; the
        runner then raises ``Cancelled`` or ``CommandFailed``.
        """
        argv = [str(a) for a in argv]
        _log.debug("run", argv=argv, cwd=str(cwd) if cwd else None)
        if cancel is not None:
            return self._run_cancellable(argv, timeout, check, env, cwd, stdout_file, cancel)
        try:
            if stdout_file is not None:
                proc = subprocess.run(
                    argv, stdout=stdout_file, stderr=subprocess.STDOUT, timeout=timeout,
                    env=dict(env) if env is not None else None, cwd=cwd, check=False,
                    stdin=subprocess.DEVNULL,
                )
                out, err = "", ""
            else:
                proc = subprocess.run(
                    argv, capture_output=True, timeout=timeout,
                    env=dict(env) if env is not None else None, cwd=cwd, check=False,
                    input=input_text.encode() if input_text is not None else None,
                    stdin=None if input_text is not None else subprocess.DEVNULL,
                )
                out = proc.stdout.decode("utf-8", "replace")
                err = proc.stderr.decode("utf-8", "replace")
        except FileNotFoundError:
            raise CommandFailed(argv, None, reason="could not start: %s not found" % argv[0]) from None
        except PermissionError as exc:
            raise CommandFailed(argv, None, reason="could not start: %s" % exc) from None
        except subprocess.TimeoutExpired as exc:
            def _s(b: object) -> str:
                return b.decode("utf-8", "replace") if isinstance(b, bytes) else (b or "")  # type: ignore[return-value]
            raise CommandFailed(argv, None, _s(exc.stdout), _s(exc.stderr),
                                reason="timed out after %.0f s" % (timeout or 0)) from None
        result = Result(tuple(argv), proc.returncode, out, err)
        if check and proc.returncode != 0:
            raise CommandFailed(argv, proc.returncode, out, err)
        return result


    def _run_cancellable(self, argv: List[str], timeout: Optional[float], check: bool,
                         env: Optional[Mapping[str, str]], cwd: Any, stdout_file: Optional[IO[bytes]],
                         cancel: Any) -> Result:
        out_target: Any = stdout_file if stdout_file is not None else subprocess.PIPE
        try:
            proc = subprocess.Popen(argv, stdout=out_target, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=dict(env) if env is not None else None, cwd=cwd, start_new_session=True)
        except FileNotFoundError:
            raise CommandFailed(argv, None, reason="could not start: %s not found" % argv[0]) from None
        except PermissionError as exc:
            raise CommandFailed(argv, None, reason="could not start: %s" % exc) from None
        deadline = None if timeout is None else time.monotonic() + timeout
        chunks: List[bytes] = []
        try:
            while True:
                try:
                    if proc.stdout is not None:
                        data, _ = proc.communicate(timeout=0.5)
                        chunks.append(data or b"")
                    else:
                        proc.wait(timeout=0.5)
                    break
                except subprocess.TimeoutExpired:
                    pass
                if cancel.cancelled:
                    _stop_group(proc)
                    cancel.check()
                if deadline is not None and time.monotonic() > deadline:
                    _stop_group(proc)
                    raise CommandFailed(argv, None, reason="timed out after %.0f s" % timeout)
        finally:
            if proc.poll() is None:
                _stop_group(proc)
        out = b"".join(chunks).decode("utf-8", "replace")
        result = Result(tuple(argv), proc.returncode, out, "")
        if check and proc.returncode != 0:
            raise CommandFailed(argv, proc.returncode, out, "")
        return result


def _stop_group(proc: "subprocess.Popen[bytes]", grace_s: float = 5.0) -> None:
    """TERM the child's process group, KILL it after ``grace_s``."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


Handler = Callable[[Sequence[str]], Result]


@dataclass
class FakeRunner(Runner):
    """A runner for tests: answers only the argv prefixes it was given.

    ``expect(("modprobe", "-r"), returncode=0, stdout="")`` registers an
    answer; any other argv raises AssertionError, so an unexpected command
    fails the test instead of touching the machine.
    """

    answers: List[Tuple[Tuple[str, ...], Handler]] = field(default_factory=list)
    calls: List[Tuple[str, ...]] = field(default_factory=list)

    def expect(self, prefix: Sequence[str], returncode: int = 0, stdout: str = "", stderr: str = "") -> None:
        def handler(argv: Sequence[str]) -> Result:
            return Result(tuple(argv), returncode, stdout, stderr)

        self.answers.append((tuple(prefix), handler))

    def run(self, argv: Sequence[str], *, timeout: Optional[float] = None, check: bool = True,
            env: Optional[Mapping[str, str]] = None, cwd: object = None,
            stdout_file: object = None, input_text: Optional[str] = None, cancel: Any = None) -> Result:
        argv_t = tuple(str(a) for a in argv)
        self.calls.append(argv_t)
        for prefix, handler in self.answers:
            if argv_t[: len(prefix)] == prefix:
                result = handler(argv_t)
                if check and result.returncode != 0:
                    raise CommandFailed(argv_t, result.returncode, result.stdout, result.stderr)
                return result
        raise AssertionError("unexpected command: %r" % (argv_t,))
