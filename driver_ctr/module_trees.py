"""Where a verified module tree comes from: the one place that decides.

Sources, each a small function that returns a verified :class:`ModuleTree`
or a :class:`Miss` saying why not:

1. ``shared_dir_build``    the shared dir's build for exactly these inputs;
2. ``precompiled_bundle``  a bundle the image carries for this kernel (``precompiled``);
3. ``host_cache_entry``    the host cache (``/var/lib/driver-ctr/cache``);
4. ``local_build``         a build in this container, when the node kernel's tree is here;
5. ``dtk_build``           the two-container protocol (``driver_side``);
6. ``fallback_build``      the entitlement-based build: install the node kernel's trees here
   (``fallback/``: apt, dnf, a node-local repository), then ``local_build``; the one place that
   raises :class:`FallbackRequired`.

The orders: ``nvidia-driver load`` takes 1, 2, 3; ``init`` takes 1, 2, 3, 4, then 6;
``nv-ctr-run-with-dtk`` takes 2 or 3 (handed over to the DTK side), 5, then 6. On the fast path
(nothing to load) ``loaded_tree`` finds the loaded driver's tree among 1, 2, 3, to publish it.
Every build is stored in the host cache by the one policy,
:func:`~driver_ctr.toolkit.host_cache.store_build`, which the DTK side calls too.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Tuple, Union

from . import precompiled
from .driver_side import DriverSide, FallbackReason
from .toolkit import nvidia_modules as nv
from .toolkit import protocol as proto
from .toolkit.build_logs import keep_build_log
from .toolkit.builders import BuildOptions, build_and_describe, request_for
from .toolkit.errors import DriverCtrError, FallbackRequired, NoKernelTree, ProtocolError
from .toolkit.fsio import remove_tree
from .toolkit.host_cache import CacheEntry, HostCache, store_build
from .toolkit.log import Logger, first_line, get_logger, phase
from .toolkit.modinfo import read_modinfo
from .toolkit.records import BuildInputs
from .toolkit.settings import Settings
from .toolkit.shared_fs import Confined
from .toolkit.signing import Signing, signing_fingerprint
from .toolkit.trees import adopt
from .toolkit.waiting import Cancellation
from .tools import Tools

MODULES = "modules"  # a local build's staged tree, in its private work directory


@dataclass(frozen=True)
class ModuleTree:
    """A verified staged tree: the content of ``/lib/modules/<kernel>`` for ``kernel``."""

    root: Path
    kernel: str
    source: str


@dataclass(frozen=True)
class Miss:
    source: str
    reason: str


Found = Union[ModuleTree, Miss]


class NoBuild(DriverCtrError):
    """No source had a verified build, and this command does not build."""


class Sources:
    """What every source needs: the settings, the inputs of a build for the
    running kernel, the host cache when mounted, the cancellation, the tools."""

    def __init__(self, settings: Settings, cancel: Cancellation, tools: Tools) -> None:
        self.settings = settings
        self.cancel = cancel
        self.tools = tools
        self.kernel = settings.running_kernel()
        self.inputs = BuildInputs.from_settings(settings, self.kernel)
        self.cache = HostCache.from_settings(settings)
        self.log: Logger = get_logger()

    def signing_fingerprint(self) -> str:
        return signing_fingerprint(Signing.from_settings(self.settings))


# -- the sources --------------------------------------------------------------------


def shared_dir_build(src: Sources) -> Found:
    shared = proto.SharedDir(src.settings.paths.shared_dir, tag="%s%d" % (proto.DRIVER_TAG, os.getpid()))
    try:
        m = shared.read_manifest()
        if m is None or m.build is None or not shared.has(proto.BUILT):
            return Miss("shared dir", "%s holds no finished build" % shared.path)
        _, tree = proto.adopt_build(
            shared, src.inputs, m.generation, src.settings.paths.adopted_trees, src.settings.module_size_limit
        )
    except ProtocolError as exc:
        return Miss("shared dir", first_line(exc))
    return ModuleTree(tree, src.kernel, "shared dir")


def host_cache_entry(src: Sources) -> Found:
    if src.cache is None:
        return Miss("host cache", "not mounted")
    entry = src.cache.lookup(src.inputs, src.signing_fingerprint(), verify=False)
    if entry is None:
        return Miss("host cache", "no entry for these inputs")
    tree = src.cache.adopt(entry, src.settings.paths.adopted_trees)
    if tree is None:
        return Miss("host cache", "the entry was corrupt (discarded)")
    return ModuleTree(tree, src.kernel, "host cache")


def precompiled_store(src: Sources) -> Union[Tuple[HostCache, CacheEntry], Miss]:
    """The image's bundle for this kernel and these inputs (unverified: adopt or hand it over), or why none."""
    s = src.settings
    if s.gds_enabled or s.gdrcopy_enabled:
        return Miss("precompiled", "GDS and GDRCopy build against this node's own build")
    store = precompiled.open_store(s)
    if store is None:
        return Miss("precompiled", "the image carries none (%s)" % precompiled.store_dir(s))
    entry = store.lookup(precompiled.bundle_inputs(s, src.kernel), src.signing_fingerprint(), verify=False)
    if entry is None:
        carried = precompiled.carried_kernels(store)
        src.log.info("no precompiled bundle for this kernel", kernel=src.kernel, image_carries=carried)
        return Miss("precompiled", "none for kernel %s (the image carries: %s)" % (src.kernel, ", ".join(carried)))
    return store, entry


def precompiled_bundle(src: Sources) -> Found:
    found = precompiled_store(src)
    if isinstance(found, Miss):
        return found
    store, entry = found
    tree = store.adopt(entry, src.settings.paths.adopted_trees)
    if tree is None:
        return Miss("precompiled", "the bundle for kernel %s was corrupt (discarded)" % src.kernel)
    return ModuleTree(tree, src.kernel, "precompiled")


def local_build(src: Sources, max_jobs: Optional[int]) -> ModuleTree:
    """Build in this container (the node kernel's tree is here) and store the
    build in the host cache. Raises :class:`NoKernelTree` when the tree is not here."""
    s = src.settings
    work = Path(tempfile.mkdtemp(prefix="driver-ctr-local-"))
    staging = work / MODULES
    staging.mkdir()
    try:
        with phase(src.log, "local build", kernel=src.kernel):
            options = BuildOptions.from_settings(s, max_jobs)
            request = request_for(s, src.kernel, staging, work / "build.log", src.cancel, options)
            build = build_and_describe(src.tools.builder(), request, s.module_size_limit).record
        store_build(src.cache, src.inputs, build, staging, src.log)
        tree = adopt(Confined(work), MODULES, build.files, src.kernel, s.paths.adopted_trees, s.module_size_limit)
    finally:
        kept = keep_build_log(s.paths, work / "build.log", src.kernel, None)
        if kept is not None:
            src.log.info("build log kept on the node", path=str(kept))
        remove_tree(work)
    return ModuleTree(tree, src.kernel, "local build")


def dtk_build(src: Sources) -> ModuleTree:
    """The two-container protocol: the image's precompiled bundle or a host-cache entry handed over to
    the DTK side as this generation's build, else the DTK builds; a broken DTK falls back."""
    side = DriverSide(src.settings, src.cancel)
    side.require_mounted()
    bundle = precompiled_store(src)
    if not isinstance(bundle, Miss) and not side.prepared_for_inputs():
        store, bundle_entry = bundle
        handed = side.hand_over(store, bundle_entry, "precompiled bundle")
        if handed is not None and handed.tree is not None:
            return ModuleTree(handed.tree, src.kernel, "precompiled")
    components = src.settings.gds_enabled or src.settings.gdrcopy_enabled
    if components and src.cache is not None:
        src.log.info("GDS or GDRCopy on: the DTK builds (their modules need this build's NVIDIA symbol versions)")
    if src.cache is not None and not components and not side.prepared_for_inputs():
        entry = src.cache.lookup(src.inputs, src.signing_fingerprint(), verify=False)
        handed = side.hand_over(src.cache, entry) if entry is not None else None
        if handed is not None and handed.tree is not None:
            return ModuleTree(handed.tree, src.kernel, "host cache")
    handoff = side.build()
    if handoff.fallback is not None:
        return fallback_build(src, handoff.fallback)
    assert handoff.manifest is not None and handoff.manifest.build is not None and handoff.tree is not None
    store_build(src.cache, src.inputs, handoff.manifest.build, handoff.tree, src.log)
    return ModuleTree(handoff.tree, src.kernel, "dtk")


def fallback_build(src: Sources, reason: FallbackReason, max_jobs: Optional[int] = None) -> ModuleTree:
    """The entitlement-based build: the node kernel's trees installed here by the
    package manager of the node's OS, then the same kbuild builder; the build is
    stored in the host cache like any other, so the next start needs no package
    manager. The reason is logged once, with NVIDIA's support note."""
    from .fallback import SUPPORT_NOTE, FallbackFailed, install_kernel_tree

    src.log.warning(
        "falling back to the entitlement-based build",
        why=reason.why,
        reasons=list(reason.reasons),
        decision=reason.decision,
        note=SUPPORT_NOTE,
    )
    try:
        install_kernel_tree(src.settings, src.kernel, src.tools.runner.with_cancel(src.cancel), src.log)
    except (FallbackFailed, ProtocolError) as exc:
        raise FallbackRequired(
            "%s: falling back to the entitlement-based build, which cannot install the kernel's "
            "build tree: %s" % (reason.why, exc),
            reason.reasons,
        ) from None
    return local_build(src, max_jobs)


# -- the orders ---------------------------------------------------------------------


def _first(src: Sources, *sources: Callable[[Sources], Found]) -> Union[ModuleTree, List[Miss]]:
    """The first source that has a tree, else every source's reason."""
    misses: List[Miss] = []
    for source in sources:
        f = source(src)
        if isinstance(f, ModuleTree):
            src.log.info("modules found", source=f.source, tree=str(f.root))
            return f
        misses.append(f)
    return misses


def loaded_tree(settings: Settings, cancel: Cancellation, tools: Tools) -> Union[ModuleTree, Miss]:
    """On the fast path: the verified tree of the driver that is loaded, from a source that never builds
    (the shared dir, the image's bundle, the host cache), recognised by ``nvidia.ko``'s srcversion against
    the kernel's ``/sys/module/nvidia/srcversion``. A restarted container lost the tree it published in
    ``/lib/modules``, which a chroot modprobe (the nvidia-peermem sidecar) needs."""
    src = Sources(settings, cancel, tools)
    try:
        loaded = (settings.paths.sys / "module/nvidia/srcversion").read_text().strip()
    except OSError as exc:
        return Miss("loaded driver", "its srcversion is unreadable (%s)" % exc.strerror)
    reasons = []
    for source in (shared_dir_build, precompiled_bundle, host_cache_entry):
        f = source(src)
        if isinstance(f, Miss):
            reasons.append("%s: %s" % (f.source, f.reason))
            continue
        built = read_modinfo(f.root / nv.staged_path("nvidia")).srcversion
        if built == loaded:
            return f
        reasons.append("%s: nvidia.ko is srcversion %s, the loaded one %s" % (f.source, built or "(none)", loaded))
    return Miss("loaded driver", "; ".join(reasons))


def for_load(settings: Settings, cancel: Cancellation, tools: Tools) -> ModuleTree:
    """``nvidia-driver load``: a build made earlier, never a new one (the shared dir's, the bundle ``build``
    stored in the image, the host cache's)."""
    src = Sources(settings, cancel, tools)
    found = _first(src, shared_dir_build, precompiled_bundle, host_cache_entry)
    if isinstance(found, ModuleTree):
        return found
    raise NoBuild(
        "no verified build for kernel %s: %s; run nvidia-driver init or the DTK flow "
        "(ocp_dtk_entrypoint nv-ctr-run-with-dtk)"
        % (src.kernel, "; ".join("%s: %s" % (m.source, m.reason) for m in found))
    )


def for_init(settings: Settings, cancel: Cancellation, tools: Tools, max_jobs: Optional[int]) -> ModuleTree:
    """``nvidia-driver init``: a build made earlier, else build here, else fall back."""
    src = Sources(settings, cancel, tools)
    found = _first(src, shared_dir_build, precompiled_bundle, host_cache_entry)
    if isinstance(found, ModuleTree):
        return found
    try:
        return local_build(src, max_jobs)
    except NoKernelTree as exc:
        reason = FallbackReason(
            "no build for kernel %s and no kernel build tree in this container" % src.kernel, (exc.message,)
        )
        return fallback_build(src, reason, max_jobs)


def for_dtk(settings: Settings, cancel: Cancellation, tools: Tools) -> ModuleTree:
    """``nv-ctr-run-with-dtk``: the Driver Toolkit builds (or the host cache
    serves), unless the operator says there is no DTK for this RHCOS."""
    src = Sources(settings, cancel, tools)
    if settings.rhcos_image_missing:
        return fallback_build(
            src, FallbackReason("RHCOS %r image tag missing in the driver-toolkit imagestream" % settings.rhcos_version)
        )
    return dtk_build(src)
