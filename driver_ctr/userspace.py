"""The NVIDIA userspace (libraries, nvidia-smi, the daemons) from the driver's ``.run``."""

from __future__ import annotations

from typing import Optional

from .toolkit.log import Logger
from .toolkit.runner import Runner
from .toolkit.settings import Settings
from .toolkit.sources import run_file_name
from .toolkit.waiting import Cancellation


def userspace_install(
    settings: Settings, runner: Runner, log: Logger, accept_license: bool = False, cancel: Optional[Cancellation] = None
) -> bool:
    """nvidia-installer's userspace install from the .run (reference §2.4 flags);
    skipped, with a log line, when no installer is present (tests)."""
    paths = settings.paths
    run = paths.drivers_dir / run_file_name(settings.target_arch, settings.driver_version.raw)
    if not run.is_file():
        log.info("no driver installer here: userspace install skipped", looked_for=str(run))
        return False
    argv = [
        "sh",
        str(run),
        "--silent",
        "--no-kernel-module",
        "--no-nouveau-check",
        "--no-nvidia-modprobe",
        "--no-rpms",
        "--no-backup",
        "--no-check-for-alternate-installs",
        "--no-libglx-indirect",
        "--no-install-libglvnd",
        "--x-prefix=/tmp/null",
        "--x-module-path=/tmp/null",
        "--x-library-path=/tmp/null",
        "--x-sysconfig-path=/tmp/null",
    ]
    if settings.target_arch == "x86_64":
        argv.append("--install-compat32-libs")
    if accept_license:
        argv.append("--accept-license")
    runner.run(argv, timeout=1800, cancel=cancel)
    log.info("userspace driver installed", installer=str(run))
    return True
