"""The two command surfaces of the reference, ``nvidia-driver`` and
``ocp_dtk_entrypoint``, with the same commands and options.

Usage errors print the usage on stderr and exit 1, as the reference does.
Settings are validated before any command runs; a :class:`DriverCtrError`
becomes one clear message on stderr and exit status 1.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Dict, List, NoReturn, Optional, Sequence

from . import __version__
from .toolkit import log as logmod
from .toolkit.errors import DriverCtrError, NotImplementedYet
from .toolkit.settings import Settings


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
    p.add_argument("-a", "--accept-license", action="store_true", help="accept the NVIDIA license (passed to nvidia-installer)")


def _add_max_threads(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--max-threads", type=_max_threads, metavar="N",
                   help="upper bound on parallel compile jobs (also bounded by the CPUs and memory the container may use)")


def _add_tag(p: argparse.ArgumentParser) -> None:
    p.add_argument("-t", "--tag", metavar="TAG", help="package tag (the DTK side uses 'builtin')")


def build_nvidia_driver_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="nvidia-driver", description="NVIDIA driver container entrypoint (driver-ctr %s)" % __version__)
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

    sub.add_parser("reload_nvidia_peermem", help="load nvidia-peermem once MOFED is ready, then wait for a signal")
    sub.add_parser("probe_nvidia_peermem", help="exit 1 when mlx5_core is loaded but nvidia-peermem is not")
    sub.add_parser("unload", help="stop the daemons and unload the NVIDIA modules (refuses when in use)")

    p = sub.add_parser("status", help="show settings, node kernel, loaded driver and protocol state")
    p.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    return parser


def build_ocp_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ocp_dtk_entrypoint", description="OpenShift Driver Toolkit two-container protocol (driver-ctr %s)" % __version__)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    p = sub.add_parser("nv-ctr-run-with-dtk", help="driver container: prepare the shared dir, wait for the DTK build, verify, load")
    p.add_argument("--dry-run", action="store_true",
                   help="stop after verifying the hand-off instead of loading (tests, diagnostics)")
    sub.add_parser("dtk-build-driver", help="DTK container: detect a broken DTK, build, stage, publish, idle")
    return parser


# ----------------------------------------------------------------------------


def _settings_and_logging(env: Optional[Dict[str, str]] = None) -> Settings:
    settings = Settings.from_env(env)
    logmod.configure(logmod.choose_format(settings.log_format or None, sys.stdout))
    return settings


def _cmd_status(args: argparse.Namespace) -> int:
    from .status import collect, render_text
    import json

    settings = _settings_and_logging()
    info = collect(settings)
    if args.json:
        sys.stdout.write(json.dumps(info, indent=2, sort_keys=True) + "\n")
    else:
        sys.stdout.write(render_text(info))
    return 0


def _placeholder(what: str) -> Callable[[argparse.Namespace], int]:
    def run(_args: argparse.Namespace) -> int:
        _settings_and_logging()
        raise NotImplementedYet(what)

    return run


def _node_command(name: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        import dataclasses

        from . import node_commands

        settings = _settings_and_logging()
        if getattr(args, "max_threads", None):  # -m wins over DRIVER_CTR_MAX_THREADS
            settings = dataclasses.replace(settings, max_threads=args.max_threads)
        if getattr(args, "accept_license", False):
            return getattr(node_commands, name)(settings, accept_license=True)
        return getattr(node_commands, name)(settings)

    return run


_NVIDIA_DRIVER_COMMANDS: Dict[str, Callable[[argparse.Namespace], int]] = {
    "init": _node_command("cmd_init"),
    "build": _placeholder("build (a build without loading, for the fallback issue)"),
    "load": _node_command("cmd_load"),
    "update": _placeholder("update (kernel-update hook rebuild)"),
    "reload_nvidia_peermem": _node_command("cmd_reload_peermem"),
    "probe_nvidia_peermem": _node_command("cmd_probe_peermem"),
    "unload": _node_command("cmd_unload"),
    "status": _cmd_status,
}


def _cmd_run_with_dtk(args: argparse.Namespace) -> int:
    from .driver_side import run_with_dtk

    return run_with_dtk(_settings_and_logging(), dry_run=args.dry_run)


def _cmd_dtk_build(args: argparse.Namespace) -> int:
    """The DTK side, run from the installed package (the pod runs the zipapp)."""
    from .toolkit.dtk_main import main

    return main(["dtk-build-driver"])


_OCP_COMMANDS: Dict[str, Callable[[argparse.Namespace], int]] = {
    "nv-ctr-run-with-dtk": _cmd_run_with_dtk,
    "dtk-build-driver": _cmd_dtk_build,
}


def _dispatch(parser: argparse.ArgumentParser, table: Dict[str, Callable[[argparse.Namespace], int]],
              argv: Optional[Sequence[str]]) -> int:
    args = parser.parse_args(argv)
    try:
        return table[args.command](args)
    except DriverCtrError as exc:
        sys.stderr.write("%s: %s\n" % (parser.prog, exc))
        return 1
    except KeyboardInterrupt:
        return 130


def nvidia_driver_main(argv: Optional[Sequence[str]] = None) -> int:
    return _dispatch(build_nvidia_driver_parser(), _NVIDIA_DRIVER_COMMANDS, argv)


def ocp_dtk_entrypoint_main(argv: Optional[Sequence[str]] = None) -> int:
    return _dispatch(build_ocp_parser(), _OCP_COMMANDS, argv)


PROGRAMS = {"nvidia-driver": nvidia_driver_main, "ocp_dtk_entrypoint": ocp_dtk_entrypoint_main}


def module_main(argv: Optional[List[str]] = None) -> int:
    """``python -m driver_ctr [nvidia-driver|ocp_dtk_entrypoint] COMMAND ...``.

    Without a program name the arguments go to ``nvidia-driver``, except the
    two ``ocp_dtk_entrypoint`` commands, which are recognised by name.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in PROGRAMS:
        return PROGRAMS[args[0]](args[1:])
    if args and args[0] in _OCP_COMMANDS:
        return ocp_dtk_entrypoint_main(args)
    return nvidia_driver_main(args)
