"""The userspace daemons: nvidia-persistenced, the grid daemons of a vGPU guest
(``vgpu``), and the fabric manager on
NVSwitch (``/proc/driver/nvidia-nvswitch/devices/*``) and NVLink5 (VPD
``SW_MNG``) systems. Started without a shell; stopped through their pid
files, but only after checking the pid belongs to the expected program
(psutil), so a stale pid file on a hostPath never hits a host process.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import psutil

from ..toolkit.errors import CommandFailed, DriverCtrError
from ..toolkit.fsio import atomic_write_text
from ..toolkit.log import Logger
from ..toolkit.paths import HostPaths
from ..toolkit.runner import Runner
from ..toolkit.settings import Settings
from ..toolkit.waiting import Cancellation, wait_until

FM_CONFIG = "/usr/share/nvidia/nvswitch/fabricmanager.cfg"


@dataclass(frozen=True)
class Daemon:
    label: str
    program: str  # process name as psutil reports it (comm, first 15 chars)
    pid_file: str


FABRIC_MANAGER = Daemon(
    "NVIDIA fabric manager daemon", "nv-fabricmanager", "/var/run/nvidia-fabricmanager/nv-fabricmanager.pid"
)
NVLSM = Daemon("NVLink Subnet Manager daemon", "nvlsm", "/var/run/nvidia-fabricmanager/nvlsm.pid")
DAEMONS = (
    Daemon("NVIDIA persistence daemon", "nvidia-persistenced", "/var/run/nvidia-persistenced/nvidia-persistenced.pid"),
    Daemon("NVIDIA Grid daemon", "nvidia-gridd", "/var/run/nvidia-gridd/nvidia-gridd.pid"),
    Daemon("NVIDIA topology daemon", "nvidia-topologyd", "/var/run/nvidia-topologyd/nvidia-topologyd.pid"),
    FABRIC_MANAGER,
    NVLSM,
)


class DaemonError(DriverCtrError):
    pass


def nvswitch_present(paths: HostPaths) -> bool:
    d = paths.proc / "driver/nvidia-nvswitch/devices"
    return d.is_dir() and any(d.iterdir())


def nvlink5_present(paths: HostPaths) -> bool:
    for vpd in sorted((paths.sys / "class/infiniband").glob("*/device/vpd")):
        try:
            if b"SW_MNG" in vpd.read_bytes():
                return True
        except OSError:
            continue
    return False


def configure_fabric_manager(config: Path, nvfm_config: Sequence[Tuple[str, str]]) -> List[str]:
    """Apply ``NVFM_CONFIG_<FIELD>=value`` (as settings parsed them: (FIELD, value))
    to the fabric manager config: replace ``FIELD=`` lines, append the others.
    No shell, no sed escaping."""
    fields = dict(nvfm_config)
    if not fields:
        return []
    lines = config.read_text().splitlines() if config.is_file() else []
    done = set()
    for i, line in enumerate(lines):
        m = re.match(r"^([A-Za-z0-9_]+)=", line)
        if m and m.group(1) in fields:
            lines[i] = "%s=%s" % (m.group(1), fields[m.group(1)])
            done.add(m.group(1))
    lines += ["%s=%s" % (k, v) for k, v in fields.items() if k not in done]
    atomic_write_text(config, "\n".join(lines) + "\n")
    return sorted(fields)


def _pid_matches(pid: int, program: str) -> bool:
    try:
        p = psutil.Process(pid)
        names = {p.name()}
        try:
            exe = p.exe()
            names.add(Path(exe).name)
        except (psutil.AccessDenied, psutil.ZombieProcess, OSError):
            pass
        return any(n == program or n == program[:15] for n in names)
    except psutil.NoSuchProcess:
        return False


def stop_daemons(paths: HostPaths, log: Logger, timeout_s: float = 5.0) -> None:
    for d in DAEMONS:
        pf = paths.host(d.pid_file)
        try:
            pid = int(pf.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue
        if not _pid_matches(pid, d.program):
            log.warning("stale pid file: the pid is not %s; not signalled" % d.program, pid_file=str(pf), pid=pid)
            continue
        p = psutil.Process(pid)
        p.terminate()
        try:
            p.wait(timeout=timeout_s)
        except psutil.TimeoutExpired:
            raise DaemonError("Could not stop %s (pid %d)" % (d.label, pid)) from None
        log.info("stopped", daemon=d.program, pid=pid)


def start_daemons(settings: Settings, runner: Runner, log: Logger, cancel: Optional[Cancellation] = None) -> List[str]:
    """Start what this node needs; returns the names started. On NVLink5 systems
    first wait (cancellable) for mlx5_core and ib_umad, as the reference does."""
    paths = settings.paths
    started = []
    if shutil.which("nvidia-persistenced"):
        runner.run(["nvidia-persistenced", "--persistence-mode"], timeout=60)
        started.append("nvidia-persistenced")
    else:
        log.info("nvidia-persistenced is not installed here: not started")
    if settings.driver_type == "vgpu":
        from .vgpu import start_grid_daemons

        started += start_grid_daemons(settings, runner, log)
    nvlink5 = nvlink5_present(paths)
    if nvlink5 and cancel is not None:
        wait_until(
            lambda: True if all((paths.sys / "module" / m).is_dir() for m in ("mlx5_core", "ib_umad")) else None,
            directory=paths.sys / "module",
            what="the mlx5_core and ib_umad kernel modules to be loaded",
            timeout_s=None,
            cancel=cancel,
            recheck_s=10.0,
            progress_s=60,
            log=log,
        )
    fm_needed = nvlink5 or nvswitch_present(paths)
    if fm_needed:
        cfg = paths.host(FM_CONFIG)
        changed = configure_fabric_manager(cfg, settings.nvfm_config)
        if changed:
            log.info("fabric manager configured", fields=changed)
        if nvlink5:
            argv = [
                "/usr/bin/nvidia-fabricmanager-start.sh",
                "--mode",
                "start",
                "--fm-config-file",
                str(cfg),
                "--fm-pid-file",
                FABRIC_MANAGER.pid_file,
                "--nvlsm-config-file",
                "/usr/share/nvidia/nvlsm/nvlsm.conf",
                "--nvlsm-pid-file",
                NVLSM.pid_file,
            ]
        else:
            argv = ["nv-fabricmanager", "-c", str(cfg)]
        try:
            runner.run(argv, timeout=300)
        except CommandFailed as exc:
            raise DaemonError("the fabric manager did not start: %s" % exc.summary) from None
        started.append("fabric-manager")
        if nvlink5 and dict(settings.nvfm_config).get("FABRIC_MODE") == "1":
            runner.run(["nvidia-smi", "-r"], timeout=600)  # reference 88a0ec2: reset after FM start in mode 1
    return started
