"""``nvidia-driver reload_nvidia_peermem`` and ``probe_nvidia_peermem``: the RDMA
sidecar's command and its startup/liveness probe.

The probe runs periodically on every GPU node with RDMA: its healthy path
reads two directories and logs nothing, so it imports nothing heavy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, List, Optional

from ..toolkit.errors import Cancelled
from ..toolkit.log import Logger, get_logger
from ..toolkit.nvidia_modules import PEERMEM, normalize
from ..toolkit.settings import Settings
from .options import NoOptions

if TYPE_CHECKING:
    from ..tools import Tools


def _ready(settings: Settings) -> bool:
    paths = settings.paths
    ctr_ready = (paths.validations_dir / ".driver-ctr-ready").is_file()
    if settings.use_host_mofed:
        return ctr_ready and (paths.sys / "module/mlx5_core").is_dir()
    return ctr_ready and paths.host("/run/mellanox/drivers/.driver-ready").is_file()


def reload(settings: Settings, options: NoOptions, tools: Optional["Tools"] = None) -> int:
    """Wait for MOFED and the driver, load nvidia-peermem in the driver root, wait for a signal."""
    from ..toolkit.waiting import Cancellation, wait_until
    from ..tools import Tools

    runner = (tools or Tools()).runner

    cancel = Cancellation().install()  # before any wait: a signal during it ends the command at once
    log = get_logger()
    try:
        wait_until(
            lambda: True if _ready(settings) else None,
            directory=settings.paths.validations_dir,
            what="the MOFED driver and the NVIDIA driver container to be ready",
            timeout_s=None,
            cancel=cancel,
            recheck_s=10.0,
            progress_s=300,
            log=log,
        )
        if (settings.paths.sys / "module" / normalize(PEERMEM) / "refcnt").exists():
            log.info("nvidia-peermem module already loaded, skipping modprobe")
        else:
            words = checked_parameters(settings, log)
            runner.run(
                ["chroot", str(settings.paths.driver_root), "modprobe", PEERMEM, *words], timeout=300, cancel=cancel
            )
            log.info("successfully loaded nvidia-peermem module, now waiting for signal")
        while not cancel.cancelled:
            cancel.sleep(0.5)
    except Cancelled:
        pass
    return 0


def checked_parameters(settings: Settings, log: Logger) -> List[str]:
    """``nvidia-peermem.conf``'s parameters as the load path takes them (``module_params.usable``): read from
    the module the chroot's modprobe will load (the driver root's ``/lib/modules/<kernel>``), an unknown
    one dropped with a warning, a bad value refused before modprobe runs, naming the file and line. Only
    the names are logged."""
    from ..node import module_params
    from ..toolkit.modinfo import read_modinfo
    from ..toolkit.nvidia_modules import PEERMEM, module_name
    from ..toolkit.paths import reroot
    from ..toolkit.staging import KernelModules

    params = module_params.read_param_files(settings.paths.drivers_dir, (PEERMEM,)).get(PEERMEM, [])
    if not params:
        return []
    module_dir = reroot(settings.paths.driver_root, "/lib/modules/%s" % settings.running_kernel())
    rel = KernelModules.read(module_dir).paths.get(module_name(PEERMEM))
    if rel is None:
        raise module_params.ParameterError(
            "%s: the parameters cannot be checked: nvidia-peermem is not among the driver root's modules (%s)"
            % (params[0].source.split(":")[0], module_dir)
        )
    kept = module_params.usable({PEERMEM: params}, {PEERMEM: read_modinfo(module_dir / rel)}, log)[PEERMEM]
    log.info("module parameters for nvidia-peermem", parameters=[p.name for p in kept])
    return [p.word for p in kept]


def probe(settings: Settings, options: NoOptions) -> int:
    """Exit 1 when mlx5_core is loaded but nvidia-peermem is not."""
    sysmod = settings.paths.sys / "module"
    if not (sysmod / "mlx5_core").is_dir():
        get_logger().info("MOFED drivers are not ready, skipping probe to avoid container restarts...")
        return 0
    if not (sysmod / normalize(PEERMEM)).is_dir():
        get_logger().error("nvidia-peermem module is not loaded")
        return 1
    return 0
