"""``nvidia-driver init | load | unload | reload_nvidia_peermem | probe_nvidia_peermem``
and the load step of ``nv-ctr-run-with-dtk``.

Where the modules come from, in order: the shared dir's build for exactly
these inputs (verified), the host cache (verified), and for ``init`` a build
in this container when the node kernel's build tree is here. Anything else
is an error that says which of them was missing.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Callable, Optional

from .daemons import stop_daemons
from .driver_load import Loader, ModuleTree, Service, userspace_install
from .fast_path import decide_fast_path
from .node_state import set_daemons_status
from .toolkit import protocol as proto
from .toolkit.builders import BuildRequest
from .toolkit.errors import Cancelled, DriverCtrError, FallbackRequired, NoKernelTree, ProtocolError
from .toolkit.fsio import remove_tree
from .toolkit.host_cache import MODULES as CACHE_MODULES
from .toolkit.host_cache import HostCache
from .toolkit.kbuild import KbuildBuilder
from .toolkit.log import get_logger, phase
from .toolkit.runner import Runner
from .toolkit.settings import Settings
from .toolkit.signing import signing_fingerprint
from .toolkit.waiting import Cancellation
from .unload import unload


class NoBuild(DriverCtrError):
    pass


def shared_dir_tree(settings: Settings) -> Optional[ModuleTree]:
    shared = proto.SharedDir(settings.paths.shared_dir)
    kernel = settings.kernel_release()
    try:
        m = shared.read_manifest()
        if m is None or m.get("build") is None or not shared.has(proto.BUILT):
            return None
        proto.verify_build(shared, proto.build_inputs(settings, kernel), m["generation"])
    except ProtocolError as exc:
        get_logger(side="driver").info("the shared dir holds no usable build", reason=str(exc).splitlines()[0])
        return None
    return ModuleTree(shared.path / proto.MODULES_DIR, kernel)


def cache_tree(settings: Settings) -> Optional[ModuleTree]:
    cache = HostCache.from_settings(settings)
    if cache is None:
        return None
    kernel = settings.kernel_release()
    entry = cache.lookup(proto.build_inputs(settings, kernel), signing_fingerprint(settings))
    return ModuleTree(entry.modules, kernel) if entry is not None else None


def local_build(settings: Settings, cancel: Cancellation) -> ModuleTree:
    """Build in this container (the node kernel's tree is here), store in the
    host cache when mounted, and return the tree."""
    log = get_logger(side="driver")
    kernel = settings.kernel_release()
    work = Path(tempfile.mkdtemp(prefix="driver-ctr-local-"))
    staging = work / "modules"
    staging.mkdir()
    try:
        with phase(log, "local build", kernel=kernel):
            result = KbuildBuilder().build(BuildRequest(settings, kernel, work, staging, work / "build.log",
                                                        cancel=cancel))
    except BaseException:
        remove_tree(work)
        raise
    cache = HostCache.from_settings(settings)
    if cache is None:
        return ModuleTree(staging, kernel)
    details = result.details or {}
    entry = cache.store(proto.build_inputs(settings, kernel), details.get("signing_fingerprint", ""), staging,
                        {"files": proto.describe_tree(staging), "details": details})
    remove_tree(work)
    return ModuleTree(entry / CACHE_MODULES, kernel)


def find_tree(settings: Settings, cancel: Cancellation, allow_build: bool) -> ModuleTree:
    for source in (shared_dir_tree, cache_tree):
        tree = source(settings)
        if tree is not None:
            get_logger(side="driver").info("modules found", source=source.__name__, tree=str(tree.root))
            return tree
    if allow_build:
        try:
            return local_build(settings, cancel)
        except NoKernelTree as exc:
            raise FallbackRequired("no build for kernel %s and no kernel build tree in this container: "
                                   "the entitlement-based fallback (not implemented yet) would install it"
                                   % settings.kernel_release(), [exc.message]) from None
    raise NoBuild("no verified build for kernel %s: none in the shared dir %s for these inputs, none in the host "
                  "cache; run nvidia-driver init or the DTK flow (ocp_dtk_entrypoint nv-ctr-run-with-dtk)"
                  % (settings.kernel_release(), settings.paths.shared_dir))


def _load_and_serve(service: Service, tree: ModuleTree) -> int:
    service.unload_existing()
    report = Loader(service.settings, service.runner).load_tree(tree)
    service.log.info("NVIDIA modules loaded", modules=report.loaded, params=report.params, firmware=report.firmware)
    service.serve()
    return service.wait_for_signal()


def _run_service(settings: Settings, cancel: Cancellation, body: Callable[[Service], int]) -> int:
    """Take the pid lock, say NotReady, run ``body``; any failure before the wait
    undoes what was done (reference: trap _shutdown EXIT). NotReady comes after
    the lock, so a second instance never overwrites the first one's Ready."""
    service = Service(settings, cancel)
    service.acquire()
    set_daemons_status(settings.paths, "NotReady")
    try:
        return body(service)
    except Cancelled:
        service.shutdown()
        return 0
    except BaseException:
        try:
            service.shutdown()
        except DriverCtrError as exc:
            service.log.warning("cleanup after the failure was incomplete", reason=str(exc))
        raise


def cmd_load(settings: Settings) -> int:
    """The reference's load never said NotReady: a stale Ready of a killed pod stayed."""
    cancel = Cancellation().install()
    return _run_service(settings, cancel,
                        lambda service: _load_and_serve(service, find_tree(settings, cancel, allow_build=False)))


def load_handoff(settings: Settings, cancel: Cancellation, tree: Optional[ModuleTree]) -> int:
    """nv-ctr-run-with-dtk after the hand-off (``tree`` None: the fast path)."""

    def body(service: Service) -> int:
        userspace_install(settings, service.runner, service.log)
        if tree is None:
            service.serve()
            return service.wait_for_signal()
        return _load_and_serve(service, tree)

    return _run_service(settings, cancel, body)


def cmd_init(settings: Settings, accept_license: bool = False) -> int:
    cancel = Cancellation().install()

    def body(service: Service) -> int:
        fp = decide_fast_path(settings)
        userspace_install(settings, service.runner, service.log, accept_license=accept_license)
        if fp.applies:
            service.log.info("fast path: the driver is loaded with this configuration", **fp.facts)
            service.serve()
            return service.wait_for_signal()
        service.log.info("fast path not taken", reason=fp.reason)
        return _load_and_serve(service, find_tree(settings, cancel, allow_build=True))

    return _run_service(settings, cancel, body)


def cmd_unload(settings: Settings) -> int:
    """Stop the daemons (they hold the devices open), then unload; refuse when in use."""
    log = get_logger(side="driver")
    stop_daemons(settings.paths, log)
    unload(settings.paths.sys, Runner(), log)
    return 0


def _peermem_ready(settings: Settings) -> bool:
    paths = settings.paths
    ctr_ready = (paths.validations_dir / ".driver-ctr-ready").is_file()
    if settings.use_host_mofed:
        return ctr_ready and (paths.sys / "module/mlx5_core").is_dir()
    return ctr_ready and paths.host("/run/mellanox/drivers/.driver-ready").is_file()


def cmd_reload_peermem(settings: Settings) -> int:
    """Wait for MOFED and the driver, load nvidia-peermem in the driver root, wait for a signal."""
    from .toolkit.waiting import wait_until

    cancel = Cancellation().install()  # before any wait (the reference's trap came too late)
    log = get_logger(side="driver")
    try:
        wait_until(lambda: True if _peermem_ready(settings) else None, directory=settings.paths.validations_dir,
                   what="the MOFED driver and the NVIDIA driver container to be ready", timeout_s=float("inf"),
                   cancel=cancel, recheck_s=10.0, progress_s=300, log=log)
        if (settings.paths.sys / "module/nvidia_peermem/refcnt").exists():
            log.info("nvidia-peermem module already loaded, skipping modprobe")
        else:
            Runner().run(["chroot", str(settings.paths.driver_root), "modprobe", "nvidia-peermem"], timeout=300)
            log.info("successfully loaded nvidia-peermem module, now waiting for signal")
        while not cancel.cancelled:
            cancel.sleep(0.5)
    except Cancelled:
        pass
    return 0


def cmd_probe_peermem(settings: Settings) -> int:
    sysmod = settings.paths.sys / "module"
    log = get_logger(side="driver")
    if not (sysmod / "mlx5_core").is_dir():
        log.info("MOFED drivers are not ready, skipping probe to avoid container restarts...")
        return 0
    if not (sysmod / "nvidia_peermem").is_dir():
        log.error("nvidia-peermem module is not loaded")
        return 1
    return 0
