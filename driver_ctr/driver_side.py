"""The driver container's side of the two-container protocol, top to bottom.

1. Prepare the shared directory once per inputs (a new generation when the
   inputs changed or the last build failed; the old outcome is moved aside):
   the DTK program, ``settings.json``, ``drivers/``, the manifest, then
   ``dir_prepared``.
2. Wait, event-driven and with deadlines, for ``driver_build_started``, then
   ``driver_built``; ``driver_toolkit_broken`` means fall back,
   ``driver_build_failed`` means fail now with the DTK's reason.
3. Verify the manifest and every staged file before anything is used.

Or, with a host-cache entry in hand (:meth:`DriverSide.hand_over`), publish
it as this generation's build: the DTK side then finds a complete build and
does nothing. Which source is tried when is decided in ``module_trees``;
this module only speaks the protocol.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from . import payload
from .toolkit import protocol as proto
from .toolkit.errors import BuildFailed, ProtocolError
from .toolkit.host_cache import HOST_CACHE_BUILDER, CacheEntry, HostCache
from .toolkit.log import get_logger, phase
from .toolkit.modinfo import preload as preload_modinfo
from .toolkit.records import BuildInputs, Manifest, now
from .toolkit.settings import Settings
from .toolkit.waiting import Cancellation, wait_until


@dataclass(frozen=True)
class FallbackReason:
    """Why the Driver Toolkit cannot build here: the entitlement-based build must."""

    why: str
    reasons: Tuple[str, ...] = ()
    decision: Dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Handoff:
    """What the protocol ended with: a verified build (``tree``: the driver
    side's own verified copy of it), or a fallback."""

    manifest: Optional[Manifest] = None
    tree: Optional[Path] = None
    fallback: Optional[FallbackReason] = None


class DriverSide:
    def __init__(self, settings: Settings, cancel: Cancellation) -> None:
        self.settings = settings
        self.cancel = cancel
        self.paths = settings.paths
        self.shared = proto.SharedDir(self.paths.shared_dir, tag="%s%d" % (proto.DRIVER_TAG, os.getpid()))
        self.trees = self.paths.adopted_trees
        self.kernel = settings.running_kernel()
        self.inputs = BuildInputs.from_settings(settings, self.kernel)
        self.log = get_logger()

    def require_mounted(self) -> None:
        """The shared directory is a real directory; this side's leftovers (temp
        files, staging of an earlier incarnation) are swept."""
        if not self.shared.path.is_dir() or self.shared.path.is_symlink():
            raise ProtocolError(self.shared.path, "the shared directory is not mounted (a directory is expected)")
        self.shared.fs.sweep_temporaries(proto.DRIVER_TAG)
        self.shared.clean_staging(lambda tag: tag.startswith(proto.DRIVER_TAG))

    def build(self) -> Handoff:
        """Prepare, wait for the DTK side, verify."""
        self.require_mounted()
        generation = self.prepare()
        preload_modinfo()
        fallback = self.wait_started(generation)
        if fallback is not None:
            return Handoff(fallback=fallback)
        return self.wait_built(generation)

    # -- the host cache's hand-over -------------------------------------------

    def prepared_for_inputs(self) -> bool:
        """The shared dir already holds a prepared generation for these inputs
        that has not failed (a restart of this container): wait for that one."""
        try:
            m = self.shared.read_manifest()
            return (
                m is not None
                and m.inputs == self.inputs
                and self.shared.has(proto.DIR_PREPARED)
                and not self.shared.has(proto.BUILD_FAILED)
            )
        except ProtocolError:
            return False

    def hand_over(self, cache: HostCache, entry: CacheEntry, what: str = "host cache") -> Optional[Handoff]:
        """Use a cache entry: copy it into this side's own trees, verifying the
        copy (the one read of every file); then publish it as a new generation's
        build so the DTK side finds it complete and idles. A corrupt entry is
        discarded and None returned: the DTK builds."""
        sh = self.shared
        with phase(self.log, "restore from %s" % what, entry=str(entry.path)):
            tree = cache.adopt(entry, self.trees)
            if tree is None:
                return None
            gen = self._next_generation()
            self._start_generation(gen)
            staging = sh.staging("%scache-%d" % (proto.DRIVER_TAG, os.getpid()))
            sh.fs.remove(staging)
            for f in entry.record.build.files:
                sh.fs.copy_in(tree / f.path, "%s/%s" % (staging, f.path))
            sh.fs.replace(staging, proto.MODULES_DIR)
            details = dict(entry.record.build.details)
            details["host_cache_entry" if what == "host cache" else "precompiled_bundle"] = str(entry.path)
            build = replace(entry.record.build, builder=HOST_CACHE_BUILDER, finished_at=now(), details=details)
            manifest = Manifest(generation=gen, inputs=self.inputs, build=build)
            sh.write_manifest(manifest)
            sh.write_flag(proto.Built(generation=gen, files=len(build.files), source=HOST_CACHE_BUILDER))
            sh.write_flag(proto.Prepared(generation=gen))
        self.log.info("hand-off verified from the %s: no build needed" % what, generation=gen, kernel=self.kernel)
        return Handoff(manifest=manifest, tree=tree)

    # -- prepare -------------------------------------------------------------

    def prepare(self) -> int:
        sh = self.shared
        try:
            manifest = sh.read_manifest()
        except ProtocolError as exc:
            self.log.warning("unreadable manifest: starting a new generation", reason=str(exc))
            manifest = None
        if manifest is not None and sh.has(proto.DIR_PREPARED) and manifest.inputs == self.inputs:
            failed = sh.read_flag(proto.Failed)
            if failed is None:
                self.log.info("shared directory already prepared for these inputs", generation=manifest.generation)
                return manifest.generation
            self.log.warning(
                "the last build of these inputs failed: asking the DTK for a new attempt", failure=failed.message
            )
        gen = self._next_generation(manifest)
        with phase(self.log, "prepare", generation=gen, shared_dir=str(sh.path)):
            self._start_generation(gen, manifest)
            self._copy_drivers()
            sh.write_manifest(Manifest(generation=gen, inputs=self.inputs))
            sh.write_flag(proto.Prepared(generation=gen))
        return gen

    def _next_generation(self, manifest: Optional[Manifest] = None) -> int:
        if manifest is None:
            generation = self.shared.generation()
        else:
            generation = manifest.generation
        return (generation if generation is not None else self.shared.highest_stale_generation()) + 1

    def _start_generation(self, gen: int, manifest: Optional[Manifest] = None) -> None:
        """Move the last generation's outcome aside; install the DTK program and settings."""
        sh = self.shared
        if manifest is not None and manifest.inputs != self.inputs:
            self.log.warning(
                "shared directory holds another configuration's build: never used, moved aside",
                old_inputs=manifest.inputs.to_json(),
                inputs=self.inputs.to_json(),
            )
        sh.move_aside(gen - 1)
        payload.install(sh)
        sh.write_settings(self.settings.shared())

    def _copy_drivers(self) -> None:
        """Copy /drivers (the .run and the *.conf parameter files) for the DTK side."""
        src = self.paths.drivers_dir
        if not src.is_dir():
            return
        fs = self.shared.fs
        fs.ensure_dir(proto.DRIVERS_DIR)
        for f in sorted(src.iterdir()):
            if f.is_file() and (f.name.endswith(".run") or f.name.endswith(".conf")):
                rel = "%s/%s" % (proto.DRIVERS_DIR, f.name)
                have, want = fs.stat(rel), f.stat()
                if have is not None and have.st_size == want.st_size and have.st_mtime >= want.st_mtime:
                    continue
                fs.copy_in(f, rel)

    # -- waits ---------------------------------------------------------------

    def _outcome(self, generation: int) -> Optional[FallbackReason]:
        """The DTK's broken verdict (a fallback), or raise its build failure, for this generation."""
        sh = self.shared
        broken = sh.read_flag(proto.Broken)
        if broken is not None:
            reasons = list(broken.reasons) or ["no reason given (reference-style flag)"]
            if broken.likely_cause:
                reasons.append("likely cause: %s" % broken.likely_cause)
            return FallbackReason(
                "the Driver Toolkit cannot build for node kernel %s" % self.kernel,
                tuple(reasons),
                dict(broken.decision),
            )
        failed = sh.read_flag(proto.Failed)
        if failed is not None and failed.of(generation):
            raise BuildFailed("DTK %s" % failed.phase, failed.message, failed.log_tail)
        return None

    def wait_started(self, generation: int) -> Optional[FallbackReason]:
        def check() -> Optional[Tuple[Optional[FallbackReason]]]:
            fallback = self._outcome(generation)
            if fallback is not None or self.shared.has(proto.BUILD_STARTED) or self.shared.has(proto.BUILT):
                return (fallback,)
            return None

        with phase(self.log, "wait build start", generation=generation):
            (fallback,) = wait_until(
                check,
                directory=self.shared.path,
                what="the openshift-driver-toolkit-ctr container to start the build",
                timeout_s=self.settings.start_timeout_s,
                cancel=self.cancel,
                log=self.log,
            )
        return fallback

    def wait_built(self, generation: int) -> Handoff:
        def check() -> Optional[Handoff]:
            fallback = self._outcome(generation)
            if fallback is not None:
                return Handoff(fallback=fallback)
            built = self.shared.read_flag(proto.Built)
            if built is None or not built.of(generation):
                return None  # not yet, or an older generation's flag being replaced
            manifest, tree = proto.adopt_build(
                self.shared, self.inputs, generation, self.trees, self.settings.module_size_limit
            )
            return Handoff(manifest=manifest, tree=tree)

        with phase(self.log, "wait build", generation=generation) as extra:
            handoff = wait_until(
                check,
                directory=self.shared.path,
                what="the openshift-driver-toolkit-ctr container to build the driver",
                timeout_s=self.settings.build_timeout_s,
                cancel=self.cancel,
                log=self.log,
            )
            if handoff.manifest is not None and handoff.manifest.build is not None:
                extra["files"] = len(handoff.manifest.build.files)
        if handoff.manifest is not None and handoff.manifest.build is not None:
            self.log.info(
                "hand-off verified: every staged file matches the manifest and the node kernel",
                generation=generation,
                kernel=self.kernel,
                modules=[f.path for f in handoff.manifest.build.modules],
            )
        return handoff
