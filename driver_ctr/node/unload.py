"""Unloading the NVIDIA modules: dependants first, refcounts counted, never forced.

Order: nvidia_peermem, gdrdrv, nvidia_fs, nvidia_drm, nvidia_modeset,
nvidia_uvm, nvidia. A module may be removed when every reference to it comes
from a module that is removed before it; anything else (an open
``/dev/nvidia*``, another module) means "in use", and the holders are named:
processes (psutil) with an NVIDIA device open, and holding modules.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import psutil

from ..toolkit.errors import CommandFailed, DriverCtrError
from ..toolkit.log import Logger
from ..toolkit.nvidia_modules import UNLOAD_ORDER
from ..toolkit.paths import HostPaths
from ..toolkit.runner import Runner

DEVICE_PREFIXES = ("/dev/nvidia", "/dev/dri/")


class DriverInUse(DriverCtrError):
    """The NVIDIA modules are in use: nothing was unloaded."""


@dataclass(frozen=True)
class ModuleState:
    name: str
    refcnt: int
    holders: Sequence[str] = ()


@dataclass(frozen=True)
class Holder:
    pid: int
    name: str
    devices: Sequence[str] = field(default_factory=tuple)

    def __str__(self) -> str:
        return "pid %d (%s) has %s open" % (self.pid, self.name, ", ".join(self.devices))


def module_state(sys_dir: Path, name: str) -> Optional[ModuleState]:
    d = sys_dir / "module" / name
    try:
        refcnt = int((d / "refcnt").read_text().strip())
    except (OSError, ValueError):
        return None  # not loaded (or built in)
    try:
        holders = tuple(sorted(os.listdir(str(d / "holders"))))
    except OSError:
        holders = ()
    return ModuleState(name, refcnt, holders)


def loaded_nvidia_modules(sys_dir: Path) -> Dict[str, ModuleState]:
    out = {}
    for name in UNLOAD_ORDER:
        st = module_state(sys_dir, name)
        if st is not None:
            out[name] = st
    return out


def device_holders(proc_dir: Path) -> List[Holder]:
    """Processes with an NVIDIA device open (read from /proc/<pid>/fd)."""
    out = []
    for p in psutil.process_iter(["pid", "name"]):
        pid = p.info["pid"]
        fd_dir = proc_dir / str(pid) / "fd"
        devices = set()
        try:
            for fd in os.listdir(str(fd_dir)):
                try:
                    target = os.readlink(str(fd_dir / fd))
                except OSError:
                    continue
                if target.startswith(DEVICE_PREFIXES):
                    devices.add(target)
        except OSError:
            continue
        if devices and pid != os.getpid():
            out.append(Holder(pid, p.info["name"] or "?", tuple(sorted(devices))))
    return out


def in_use_reasons(mods: Dict[str, ModuleState]) -> List[str]:
    """Why each loaded module could not be removed after the ones before it."""
    reasons = []
    removed_first = set()
    for name in UNLOAD_ORDER:
        st = mods.get(name)
        if st is None:
            continue
        ours = [h for h in st.holders if h in mods and h in removed_first]
        others = [h for h in st.holders if h not in ours]
        extra = st.refcnt - len(ours) - len(others)
        if others:
            reasons.append("%s is used by module(s) %s" % (name, ", ".join(others)))
        if extra > 0:
            reasons.append("%s has %d reference(s) besides its dependent modules" % (name, extra))
        removed_first.add(name)
    return reasons


def unload(paths: HostPaths, runner: Runner, log: Logger) -> List[str]:
    """Remove the loaded NVIDIA modules; raise DriverInUse (naming holders) without forcing."""
    sys_dir = paths.sys
    mods = loaded_nvidia_modules(sys_dir)
    if not mods:
        return []
    reasons = in_use_reasons(mods)
    if reasons:
        holders = device_holders(paths.proc)
        lines = ["Could not unload NVIDIA driver kernel modules, driver is in use"]
        lines += ["  - %s" % r for r in reasons]
        lines += ["  - %s" % h for h in holders] or ["  - no process has /dev/nvidia* open (a kernel user holds it)"]
        raise DriverInUse("\n".join(lines))
    names = [n for n in UNLOAD_ORDER if n in mods]
    try:
        runner.run(["rmmod", *names], timeout=120)
    except CommandFailed as exc:
        still = loaded_nvidia_modules(sys_dir)
        raise DriverInUse(
            "Could not unload NVIDIA driver kernel modules: %s (still loaded: %s)"
            % (exc.summary, ", ".join(still) or "none")
        ) from None
    log.info("unloaded NVIDIA modules", modules=names)
    return names
