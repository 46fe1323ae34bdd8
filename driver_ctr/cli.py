"""The two command surfaces of the reference, ``nvidia-driver`` and
``ocp_dtk_entrypoint``, with the same commands and options.

Usage errors print the usage on stderr and exit 1, as the reference does.
Each command's arguments become its typed options (``commands/options.py``);
the table below maps the command to the function that imports only that
command's module. Settings are validated before any command runs; an error
class maps to an exit status (:data:`EXIT_STATUS`), a :class:`DriverCtrError`
with one clear message on stderr.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Dict, List, NoReturn, Optional, Sequence, Tuple, Type

from . import __version__
from .commands import options as opts
from .toolkit import log as logmod
from .toolkit.errors import Cancelled, DriverCtrError, FileSystemError, innermost_step
from .toolkit.redact import redact_url_credentials
from .toolkit.settings import BUILD_ONLY_VARIABLES, Settings


class _Parser(argparse.ArgumentParser):
    """argparse with the reference's exit status 1 for usage errors."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(1, "%s: error: %s\n" % (self.prog, message))


def _max_threads(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError("expected a whole number of at least 1, got %r" % text)
    return int(text)


def _add_accept(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-a", "--accept-license", action="store_true", help="accept the NVIDIA license (passed to nvidia-installer)"
    )


def _add_max_threads(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-m",
        "--max-threads",
        type=_max_threads,
        metavar="N",
        help="upper bound on parallel compile jobs (also bounded by the CPUs and memory the container may use)",
    )


def _add_tag(p: argparse.ArgumentParser) -> None:
    p.add_argument("-t", "--tag", metavar="TAG", help="package tag (the DTK side uses 'builtin')")


def build_nvidia_driver_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="nvidia-driver", description="NVIDIA driver container entrypoint (driver-ctr %s)" % __version__
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser("init", help="build (or take from the cache) and load the driver, then wait for a signal")
    _add_accept(p)
    _add_max_threads(p)

    p = sub.add_parser("build", help="build the kernel modules for the node kernel")
    _add_accept(p)
    _add_tag(p)
    _add_max_threads(p)

    sub.add_parser("load", help="load the built modules, start the daemons, wait for a signal")

    p = sub.add_parser("update", help="rebuild for a kernel (kernel-update hook path)")
    p.add_argument("-k", "--kernel", metavar="VER", help="kernel release to build for (default: the node kernel)")
    p.add_argument("-s", "--sign", metavar="KEYID", help="sign the modules with this key")
    _add_tag(p)
    _add_max_threads(p)
    p.add_argument("--check", action="store_true", help="build in a scratch directory, report, store nothing")

    sub.add_parser("reload_nvidia_peermem", help="load nvidia-peermem once MOFED is ready, then wait for a signal")
    sub.add_parser("probe_nvidia_peermem", help="exit 1 when mlx5_core is loaded but nvidia-peermem is not")
    sub.add_parser("unload", help="stop the daemons and unload the NVIDIA modules (refuses when in use)")

    p = sub.add_parser("status", help="show settings, node kernel, loaded driver and protocol state")
    p.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    return parser


def build_ocp_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="ocp_dtk_entrypoint",
        description="OpenShift Driver Toolkit two-container protocol (driver-ctr %s)" % __version__,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    p = sub.add_parser(
        "nv-ctr-run-with-dtk", help="driver container: prepare the shared dir, wait for the DTK build, verify, load"
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="stop after verifying the hand-off instead of loading (tests, diagnostics)",
    )
    sub.add_parser("dtk-build-driver", help="DTK container: detect a broken DTK, build, stage, publish, idle")
    return parser


# -- typed options, then one explicit table per program -------------------------


def _settings(args: argparse.Namespace, builds: bool = True) -> Settings:
    """Settings from the environment, validated once; logging configured from them. A command that never
    builds ignores a bad value of a variable only builds read (``BUILD_ONLY_VARIABLES``)."""
    settings = Settings.from_env(unused=() if builds else BUILD_ONLY_VARIABLES)
    fmt = logmod.choose_format(settings.log_format or None, sys.stdout)
    logmod.configure(fmt, level=settings.log_level, side="driver")
    return settings


def _init(args: argparse.Namespace) -> int:
    from .commands import init

    return init.run(_settings(args), opts.InitOptions(accept_license=args.accept_license, max_threads=args.max_threads))


def _build(args: argparse.Namespace) -> int:
    from .commands import build

    return build.build(
        _settings(args),
        opts.BuildOptions(accept_license=args.accept_license, tag=args.tag, max_threads=args.max_threads),
    )


def _update(args: argparse.Namespace) -> int:
    from .commands import build

    return build.update(
        _settings(args),
        opts.UpdateOptions(
            kernel=args.kernel, sign=args.sign, tag=args.tag, max_threads=args.max_threads, check=args.check
        ),
    )


def _load(args: argparse.Namespace) -> int:
    from .commands import load

    return load.run(_settings(args, builds=False), opts.NoOptions())


def _unload(args: argparse.Namespace) -> int:
    from .commands import unload

    return unload.run(_settings(args, builds=False), opts.NoOptions())


def _reload_peermem(args: argparse.Namespace) -> int:
    from .commands import peermem

    return peermem.reload(_settings(args, builds=False), opts.NoOptions())


def _probe_peermem(args: argparse.Namespace) -> int:
    from .commands import peermem

    return peermem.probe(_settings(args, builds=False), opts.NoOptions())


def _status(args: argparse.Namespace) -> int:
    from .commands import status

    return status.run(_settings(args, builds=False), opts.StatusOptions(json=args.json))


def _run_with_dtk(args: argparse.Namespace) -> int:
    from .commands import run_with_dtk

    return run_with_dtk.run(_settings(args), opts.RunWithDtkOptions(dry_run=args.dry_run))


def _dtk_build(args: argparse.Namespace) -> int:
    """The DTK side, run from the installed package (the pod runs the zipapp)."""
    from .toolkit.dtk_main import main

    return main(["dtk-build-driver"])


Command = Callable[[argparse.Namespace], int]

NVIDIA_DRIVER_COMMANDS: Dict[str, Command] = {
    "init": _init,
    "build": _build,
    "load": _load,
    "update": _update,
    "reload_nvidia_peermem": _reload_peermem,
    "probe_nvidia_peermem": _probe_peermem,
    "unload": _unload,
    "status": _status,
}

OCP_COMMANDS: Dict[str, Command] = {
    "nv-ctr-run-with-dtk": _run_with_dtk,
    "dtk-build-driver": _dtk_build,
}

# Error class -> exit status, first match wins. A stop by SIGTERM is a clean
# exit; every error a user can act on is 1 (the reference's status); anything
# else is a bug and shows its traceback.
EXIT_STATUS: Tuple[Tuple[Type[BaseException], int], ...] = (
    (Cancelled, 0),
    (DriverCtrError, 1),
    (KeyboardInterrupt, 130),
)


def _dispatch(parser: argparse.ArgumentParser, table: Dict[str, Command], argv: Optional[Sequence[str]]) -> int:
    args = parser.parse_args(argv)
    try:
        try:
            return table[args.command](args)
        except OSError as exc:  # a full disk, a name too long, EACCES: named, never a traceback
            raise FileSystemError(exc, args.command + innermost_step(exc)) from exc
    except tuple(cls for cls, _ in EXIT_STATUS) as exc:
        status = next(code for cls, code in EXIT_STATUS if isinstance(exc, cls))
        if isinstance(exc, DriverCtrError) and status != 0:  # a child's output may hold a proxy's credentials
            sys.stderr.write("%s: %s\n" % (parser.prog, redact_url_credentials(str(exc))))
        return status


def nvidia_driver_main(argv: Optional[Sequence[str]] = None) -> int:
    return _dispatch(build_nvidia_driver_parser(), NVIDIA_DRIVER_COMMANDS, argv)


def ocp_dtk_entrypoint_main(argv: Optional[Sequence[str]] = None) -> int:
    return _dispatch(build_ocp_parser(), OCP_COMMANDS, argv)


PROGRAMS = {"nvidia-driver": nvidia_driver_main, "ocp_dtk_entrypoint": ocp_dtk_entrypoint_main}


def module_main(argv: Optional[List[str]] = None) -> int:
    """``python -m driver_ctr [nvidia-driver|ocp_dtk_entrypoint] COMMAND ...``.

    Without a program name the arguments go to ``nvidia-driver``, except the
    two ``ocp_dtk_entrypoint`` commands, which are recognised by name.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in PROGRAMS:
        return PROGRAMS[args[0]](args[1:])
    if args and args[0] in OCP_COMMANDS:
        return ocp_dtk_entrypoint_main(args)
    return nvidia_driver_main(args)
