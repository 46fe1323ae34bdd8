"""The NVIDIA userspace (libraries, nvidia-smi, the daemons) from the driver's ``.run``.

Never a silent half-install: without the ``.run`` in ``/drivers`` and without NVIDIA's userspace in the
image (``nvidia-smi`` and ``nvidia-persistenced``), the command stops with one error naming the file it
expected, before any module is loaded (the reference logged a line and the pod then waited out its
21-minute startup probe). After an install, ``nvidia-persistenced`` must be there. ``DRIVER_CTR_USERSPACE=none``
says on purpose that this container loads modules only (the test suite; a node whose userspace comes
from elsewhere).
"""

from __future__ import annotations

import shutil
from typing import Optional

from ..toolkit.errors import DriverCtrError
from ..toolkit.log import Logger
from ..toolkit.runner import Runner
from ..toolkit.settings import Settings
from ..toolkit.sources import run_file_name
from ..toolkit.waiting import Cancellation


class UserspaceMissing(DriverCtrError):
    """No NVIDIA userspace to serve the loaded driver: the message names what was expected."""


def _present(settings: Settings, program: str) -> bool:
    return bool(shutil.which(program)) or settings.paths.host("/usr/bin/%s" % program).is_file()


def userspace_install(
    settings: Settings, runner: Runner, log: Logger, accept_license: bool = False, cancel: Optional[Cancellation] = None
) -> bool:
    """nvidia-installer's userspace install from the .run (reference §2.4 flags); the image's own
    userspace when there is no .run; else :class:`UserspaceMissing` (see the module docstring)."""
    paths = settings.paths
    if settings.userspace == "none":
        log.info("DRIVER_CTR_USERSPACE=none: kernel modules only, no userspace install")
        return False
    run = paths.drivers_dir / run_file_name(settings.target_arch, settings.driver_version.raw)
    if not run.is_file():
        if _present(settings, "nvidia-smi") and _present(settings, "nvidia-persistenced"):
            log.info("no driver installer: the image carries NVIDIA's userspace", looked_for=str(run))
            return False
        raise UserspaceMissing(
            "no NVIDIA userspace: expected the driver installer %s (the driver image carries it in /drivers) "
            "or an image with NVIDIA's userspace installed (nvidia-smi, nvidia-persistenced); nothing was "
            "loaded" % run
        )
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
    if not _present(settings, "nvidia-persistenced"):
        raise UserspaceMissing(
            "the userspace install from %s left no nvidia-persistenced (not on PATH, not in /usr/bin): the "
            "installer is incomplete or for another driver type" % run
        )
    log.info("userspace driver installed", installer=str(run))
    return True
