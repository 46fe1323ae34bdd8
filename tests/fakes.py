"""Test doubles for the OS seams (never shipped in the package)."""

from __future__ import annotations

import io
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import IO, Any, Callable, Iterator, List, Sequence, Tuple

from driver_ctr.toolkit.errors import CommandFailed
from driver_ctr.toolkit.runner import Result, Runner

Handler = Callable[[Sequence[str]], Result]


@dataclass
class FakeRunner(Runner):
    """A runner that answers only the argv prefixes it was given.

    ``expect(("modprobe", "-r"), returncode=0, stdout="")`` registers an
    answer; any other argv raises AssertionError, so an unexpected command
    fails the test instead of touching the machine.
    """

    answers: List[Tuple[Tuple[str, ...], Handler]] = field(default_factory=list)
    calls: List[Tuple[str, ...]] = field(default_factory=list)
    cancel: Any = None

    def expect(self, prefix: Sequence[str], returncode: int = 0, stdout: str = "", stderr: str = "") -> None:
        def handler(argv: Sequence[str]) -> Result:
            return Result(tuple(argv), returncode, stdout, stderr, stdout.encode())

        self.answers.append((tuple(prefix), handler))

    @contextmanager
    def stream(self, argv: Sequence[Any], **_kw: Any) -> Iterator[IO[bytes]]:  # type: ignore[override]
        """The registered answer's stdout as the stream (never a real process)."""
        yield io.BytesIO(self.run(argv).stdout_bytes)

    def run(self, argv: Sequence[Any], **_kw: Any) -> Result:  # type: ignore[override]
        argv_t = tuple(str(a) for a in argv)
        self.calls.append(argv_t)
        for prefix, handler in self.answers:
            if argv_t[: len(prefix)] == prefix:
                result = handler(argv_t)
                if _kw.get("check", True) and result.returncode != 0:
                    raise CommandFailed(argv_t, result.returncode, result.stdout, result.stderr)
                return result
        raise AssertionError("unexpected command: %r" % (argv_t,))
