"""Host paths, re-rootable.

Every absolute path the program touches on the node goes through
:class:`HostPaths`, so that a whole command can run against a temporary
directory: ``DRIVER_CTR_ROOT=/tmp/x`` turns ``/run/nvidia`` into
``/tmp/x/run/nvidia``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

DEFAULT_SHARED_DIR = "/mnt/shared-nvidia-driver-toolkit"

PathLike = Union[str, "os.PathLike[str]"]


def reroot(root: Optional[PathLike], path: PathLike) -> Path:
    """Join the absolute ``path`` under ``root`` (``None`` or ``/`` mean no change)."""
    p = Path(path)
    if not p.is_absolute():
        raise ValueError("host path must be absolute: %s" % p)
    if root is None or str(root) in ("", "/"):
        return p
    return Path(root) / p.relative_to("/")


@dataclass(frozen=True)
class HostPaths:
    """The node and container paths of the reference contract, under ``root``."""

    root: Optional[str] = None
    shared_dir_override: Optional[str] = None

    def host(self, path: PathLike) -> Path:
        return reroot(self.root, path)

    @property
    def shared_dir(self) -> Path:
        if self.shared_dir_override:
            return Path(self.shared_dir_override)
        return self.host(DEFAULT_SHARED_DIR)

    @property
    def run_nvidia(self) -> Path:
        return self.host("/run/nvidia")

    @property
    def driver_root(self) -> Path:
        """``/run/nvidia/driver``: the rbind of the container root."""
        return self.host("/run/nvidia/driver")

    @property
    def adopted_trees(self) -> Path:
        """Where the driver side keeps the verified copies of module trees it loads from."""
        return self.host("/run/nvidia/driver-ctr/trees")

    @property
    def validations_dir(self) -> Path:
        return self.host("/run/nvidia/validations")

    @property
    def state_file(self) -> Path:
        return self.host("/run/nvidia/nvidia-driver.state")

    @property
    def pid_file(self) -> Path:
        return self.host("/run/nvidia/nvidia-driver.pid")

    @property
    def drivers_dir(self) -> Path:
        return self.host("/drivers")

    @property
    def lib_modules(self) -> Path:
        return self.host("/lib/modules")

    @property
    def usr_src(self) -> Path:
        return self.host("/usr/src")

    @property
    def kernels_src(self) -> Path:
        """``/usr/src/kernels``: where RHEL's kernel-devel puts its trees."""
        return self.host("/usr/src/kernels")

    @property
    def sys(self) -> Path:
        return self.host("/sys")

    @property
    def proc(self) -> Path:
        return self.host("/proc")

    @property
    def kmsg(self) -> Path:
        """``/dev/kmsg``: the kernel log a module load failure is explained from."""
        return self.host("/dev/kmsg")

    @property
    def modprobe_d(self) -> Path:
        return self.host("/etc/modprobe.d")

    @property
    def dtk_release_json(self) -> Path:
        return self.host("/etc/driver-toolkit-release.json")

    @property
    def os_release(self) -> Path:
        return self.host("/etc/os-release")

    @property
    def host_os_release(self) -> Path:
        """The node's os-release as the DaemonSet mounts it."""
        return self.host("/host-etc/os-release")

    @property
    def firmware_search_path(self) -> Path:
        return self.host("/sys/module/firmware_class/parameters/path")

    def follow(self, link: Path) -> Path:
        """Where ``link`` points: an absolute symlink target names a path of this
        root (an image's ``/lib/modules/<k>/build -> /usr/src/kernels/<k>``)."""
        if link.is_symlink() and self.root and str(self.root) != "/":
            target = os.readlink(str(link))
            if target.startswith("/"):
                return Path(os.path.realpath(str(self.host(target))))
        return Path(os.path.realpath(str(link)))

    def module_dir(self, kernel_release: str) -> Path:
        return self.lib_modules / kernel_release
