"""Entry point of the DTK-side zipapp: ``ocp_dtk_entrypoint dtk-build-driver``.

Runs on the DTK image's own Python (3.9+), standard library plus the vendored
structlog, pyelftools and inotify_simple. The launcher script beside the
zipapp sets ``DRIVER_CTR_SHARED_DIR`` to its own directory.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path
from typing import List, Mapping, NoReturn, Optional

from . import log as logmod
from . import protocol as proto
from .builders import Builder
from .dtk_side import DtkSide
from .errors import DriverCtrError, FileSystemError, InvalidValue, innermost_step
from .log import first_line
from .paths import HostPaths
from .redact import redact_url_credentials
from .waiting import Cancellation


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(1, "%s: error: %s\n" % (self.prog, message))


def shared_dir_from_env(env: Mapping[str, str]) -> Path:
    """Before settings.json is read: the same rule as ``Settings.paths.shared_dir``."""
    return HostPaths(
        root=env.get("DRIVER_CTR_ROOT", "").strip() or None,
        shared_dir_override=env.get("DRIVER_CTR_SHARED_DIR", "").strip() or None,
    ).shared_dir


def main(argv: Optional[List[str]] = None, builder: Optional[Builder] = None) -> int:
    """``ocp_dtk_entrypoint dtk-build-driver``; ``builder`` (default: kbuild) is the tests' seam."""
    parser = _Parser(prog="ocp_dtk_entrypoint", description="driver-ctr, DTK side")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    sub.add_parser("dtk-build-driver", help="detect a broken DTK, build, stage, publish, idle")
    args = parser.parse_args(argv)
    env = dict(os.environ)
    try:
        fmt = logmod.choose_format(env.get("DRIVER_CTR_LOG_FORMAT") or None, sys.stdout)
        logmod.configure(fmt, level=(env.get("DRIVER_CTR_LOG_LEVEL") or "info").strip().lower(), side="dtk")
    except InvalidValue as exc:
        sys.stderr.write("ocp_dtk_entrypoint: %s\n" % exc)
        return 1
    cancel = Cancellation().install()
    shared = shared_dir_from_env(env)
    if not shared.is_dir():
        sys.stderr.write(
            "ocp_dtk_entrypoint: the shared directory %s is not mounted (a directory is expected)\n" % shared
        )
        return 1
    side: Optional[DtkSide] = None
    try:
        side = DtkSide(shared, env, cancel, builder)
        return side.run()
    except Exception as exc:  # noqa: BLE001 - whatever ends the DTK side is signalled to the driver side
        if isinstance(exc, OSError):
            exc = FileSystemError(exc, "dtk-build-driver" + innermost_step(exc))
        if not isinstance(exc, DriverCtrError):  # a bug: its traceback too, after the driver side is told
            traceback.print_exc()
        sys.stderr.write("ocp_dtk_entrypoint %s: %s\n" % (args.command, redact_url_credentials(str(exc))))
        _signal_failure(shared, exc, side.generation if side is not None else None)
        return 1


def _signal_failure(shared: Path, exc: Exception, generation: Optional[int]) -> None:
    """Tell the driver side, so it fails fast instead of waiting for its deadline.
    The flag names the generation the failure was about (None: read before any
    manifest, so it speaks of whichever is current), never a newer one. A full
    shared directory (the likeliest reason a flag cannot be written) is given
    the build log's room back once, then the flag is written again."""
    sd = proto.SharedDir(shared)
    message = first_line(exc) if isinstance(exc, DriverCtrError) else "%s: %s" % (type(exc).__name__, exc)
    flag = proto.Failed(generation=generation, phase="protocol", message=message)
    for attempt in range(2):
        try:
            sd.write_flag(flag)
            return
        except (OSError, DriverCtrError):
            if attempt == 0:
                _free_room(sd)


def _free_room(sd: proto.SharedDir) -> None:
    try:
        with open(str(sd.build_log), "r+b") as f:  # the tail is in the flag already
            f.truncate(0)
    except OSError:
        pass
