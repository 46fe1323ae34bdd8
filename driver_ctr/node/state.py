"""What the driver container leaves on the node, and takes back on shutdown.

- ``/run/nvidia/nvidia-driver.pid``: locked (flock) *before* it is truncated,
  so a second instance cannot wipe the first one's PID; the reference's
  message on a second instance.
- ``/run/nvidia/nvidia-driver.state``: the config digest, one line, atomic.
- ``/run/nvidia/validations/.driver-daemons-status``: NotReady -> Ready.
- ``/run/nvidia/driver``: an rbind of the container root (``/sys`` made
  runbindable and private first), relabelled for containers when the host
  enforces SELinux (detected through ``/proc/1`` as the reference does).
  A mount left by a killed container (its root, now gone) is replaced by this
  container's root: unmounted, then mounted again.
- ``/lib/modules/<kver>`` of the container (so of the driver root): the loaded
  tree, so that ``chroot /run/nvidia/driver modprobe nvidia-peermem`` (the RDMA
  sidecar) and other readers of the driver root find NVIDIA's modules. A link
  to the verified tree when the container has no tree of that kernel; beside
  the kernel's own modules, indexed by ``depmod``, when it has (the fallback's).
- the firmware search path (reference §2.5).
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import IO, List, Mapping, Optional

from ..toolkit import nvidia_modules as nv
from ..toolkit.builders import default_scratch, find_source
from ..toolkit.errors import CommandFailed, DriverCtrError
from ..toolkit.fsio import atomic_write_text, replace_symlink
from ..toolkit.log import Logger
from ..toolkit.paths import HostPaths
from ..toolkit.runner import Runner
from ..toolkit.settings import Settings
from ..toolkit.shared_fs import Confined
from ..toolkit.sources import expose, open_sources

SECOND_INSTANCE = "An instance of the NVIDIA driver is already running, aborting"
DAEMONS_STATUS = ".driver-daemons-status"
FIRMWARE_DIR = "/run/nvidia/driver/lib/firmware"


class AlreadyRunning(DriverCtrError):
    pass


class PidLock:
    """Exclusive ownership of the pid file for the life of the process."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file: Optional[IO[str]] = None

    def acquire(self) -> "PidLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(str(self.path), "a+")  # no truncation before the lock is ours
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.close()
            raise AlreadyRunning(SECOND_INSTANCE) from None
        f.seek(0)
        f.truncate()
        f.write("%d\n" % os.getpid())
        f.flush()
        self.file = f
        return self

    def release(self, remove: bool = True) -> None:
        if self.file is None:
            return
        if remove:
            try:
                self.path.unlink()
            except OSError:
                pass
        self.file.close()
        self.file = None


def write_state(paths: HostPaths, digest: str) -> None:
    atomic_write_text(paths.state_file, digest + "\n")


def remove_state(paths: HostPaths) -> None:
    try:
        paths.state_file.unlink()
    except OSError:
        pass


def set_daemons_status(paths: HostPaths, status: str) -> None:
    atomic_write_text(paths.validations_dir / DAEMONS_STATUS, status + "\n")


def clear_daemons_status(paths: HostPaths) -> None:
    """Nothing is ready any more (what the pod's preStop hook also does)."""
    try:
        (paths.validations_dir / DAEMONS_STATUS).unlink()
    except OSError:
        pass


def configure_firmware_path(paths: HostPaths, nvidia_params: Mapping[str, str], log: Logger) -> str:
    """The reference rule: set the firmware search path only when it is empty,
    skip when GSP firmware is off. Returns what was done."""
    if nvidia_params.get("NVreg_EnableGpuFirmware") == "0":
        log.info("GSP firmware disabled (NVreg_EnableGpuFirmware=0): firmware search path left alone")
        return "skipped"
    p = paths.firmware_search_path
    try:
        current = p.read_text().strip()
    except OSError:
        current = None
    if current:
        log.warning(
            "a firmware search path is already configured; retaining the current configuration",
            path=str(p),
            value=current,
        )
        return "retained"
    try:
        p.write_text(FIRMWARE_DIR)
    except OSError as exc:
        log.warning("failed to configure the firmware search path", path=str(p), reason=exc.strerror)
        return "failed"
    log.info("firmware search path set", value=FIRMWARE_DIR)
    return "set"


def host_selinux_enabled(paths: HostPaths) -> bool:
    """Reference §2.9: /proc/1/mounts lists selinuxfs and /proc/1/root/sys/fs/selinux/enforce exists."""
    try:
        mounts = (paths.proc / "1" / "mounts").read_text()
    except OSError:
        return False
    return "selinuxfs" in mounts and (paths.proc / "1/root/sys/fs/selinux/enforce").exists()


def mounted(target: Path, proc: Path) -> bool:
    try:
        return any(line.split()[1] == str(target) for line in (proc / "self/mounts").read_text().splitlines())
    except OSError:
        return False


def mount_rootfs(paths: HostPaths, runner: Runner, log: Logger) -> None:
    target = paths.driver_root
    if mounted(target, paths.proc):
        # a killed container's root (or this one's, from a shutdown that did not finish): mount this root again
        log.info("driver root already mounted: mounting this container's root again", target=str(target))
        runner.run(["umount", "-l", "-R", str(target)], timeout=60)
    target.mkdir(parents=True, exist_ok=True)
    for argv in (
        ["mount", "--make-runbindable", str(paths.sys)],
        ["mount", "--make-private", str(paths.sys)],
        ["mount", "--rbind", str(paths.host("/")), str(target)],
    ):
        runner.run(argv, timeout=60)
    if host_selinux_enabled(paths):
        runner.run(["chcon", "-R", "-t", "container_file_t", str(target / "dev")], timeout=300)
        log.info("SELinux: relabelled the driver root's /dev for containers")
    log.info("driver root mounted", target=str(target))


def unmount_rootfs(paths: HostPaths, runner: Runner, log: Logger) -> None:
    target = paths.driver_root
    if not mounted(target, paths.proc):
        return
    try:
        runner.run(["umount", "-l", "-R", str(target)], timeout=60)
        log.info("driver root unmounted", target=str(target))
    except CommandFailed as exc:
        log.warning("could not unmount the driver root", target=str(target), reason=exc.summary)


def expose_driver_sources(settings: Settings, runner: Runner, log: Logger) -> None:
    """With GDS or GDRCopy on, NVIDIA's sources at ``/usr/src/nvidia-<version>`` of this container (so the
    driver root's ``/run/nvidia/driver/usr/src/nvidia-<version>``, where those sidecars build), on every path
    (a build here, the DTK's, a cache hit, the fast path), as the reference's ``_prepare``. The ``.run`` is
    extracted once into the scratch directory. An optional component never takes the driver down: a
    failure is a warning naming it."""
    if not (settings.gds_enabled or settings.gdrcopy_enabled):
        return
    version = settings.driver_version.raw
    try:
        source = find_source(settings.source_dir, [settings.paths.drivers_dir], settings.target_arch, version)
        sources = open_sources(source, default_scratch(), runner)
        link = expose(settings.paths, version, sources)
    except (DriverCtrError, OSError) as exc:
        log.warning(
            "NVIDIA sources not exposed in the driver root: the GDS/GDRCopy sidecars will wait", reason=str(exc)
        )
        return
    if link is not None:
        log.info("NVIDIA sources exposed in the driver root", path=str(link), sources=str(sources.root))


def publish_modules(paths: HostPaths, tree: Path, kernel: str, runner: Runner, log: Logger) -> None:
    """Make ``/lib/modules/<kernel>`` of this container hold the loaded ``tree`` (see the module docstring)."""
    target = paths.module_dir(kernel)
    if target.is_symlink() or not target.exists():
        replace_symlink(target, tree)
        log.info("module tree linked into the driver root", path=str(target), tree=str(tree))
        return
    # the kernel's own tree (a package's, a DTK image's): written through its descriptors, never through a
    # link inside it (a link there is an error: nothing lands outside the tree)
    fs = Confined(target)
    fs.make_dirs(nv.SUBDIR)
    for f in sorted((tree / nv.SUBDIR).iterdir()):
        if nv.is_module(f.name):
            fs.copy_in(f, "%s/%s" % (nv.SUBDIR, f.name))
    runner.run(["depmod", "-b", str(paths.host("/")), kernel], timeout=600)
    log.info("NVIDIA modules copied beside the kernel's in the driver root", path=str(target / nv.SUBDIR))


def withdraw_modules(paths: HostPaths, tree: Path, kernel: str) -> None:
    """Undo :func:`publish_modules` where it linked (copies die with the container)."""
    target = paths.module_dir(kernel)
    if target.is_symlink() and os.readlink(str(target)) == str(tree):
        target.unlink()


def mellanox_present(paths: HostPaths) -> bool:
    """A Mellanox PCI device (vendor 0x15b3) on the node."""
    return bool(pci_devices(paths, "0x15b3"))


def pci_devices(paths: HostPaths, vendor: str) -> List[str]:
    base = paths.sys / "bus/pci/devices"
    out = []
    try:
        for d in sorted(base.iterdir()):
            try:
                if (d / "vendor").read_text().strip().lower() == vendor:
                    out.append(d.name)
            except OSError:
                continue
    except OSError:
        pass
    return out
