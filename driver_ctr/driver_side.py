"""``nv-ctr-run-with-dtk``: the driver container's side of the protocol, top to bottom.

1. ``RHCOS_IMAGE_MISSING=true``: no DTK for this RHCOS; fall back.
2. Fast path, decided once: the loaded driver is ours and its digest matches.
3. Host cache: a verified tree built earlier for the same inputs is put in
   the shared directory as this generation's build (the DTK side then finds
   a complete build and does nothing).
4. Otherwise prepare the shared directory once per inputs (a new generation when the
   inputs changed or the last build failed; the old outcome is moved aside).
5. Wait, event-driven and with deadlines, for ``driver_build_started``, then
   ``driver_built``; ``driver_toolkit_broken`` means fall back,
   ``driver_build_failed`` means fail now with the DTK's reason.
6. Verify the manifest and every staged file before anything is used, and
   store a DTK build in the host cache.
7. Hand over to loading (``--dry-run`` stops after the verification).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from typing import Any, Dict, Optional

from . import payload
from .fast_path import FastPath, decide_fast_path
from .toolkit import protocol as proto
from .toolkit.errors import BuildFailed, Cancelled, DriverCtrError, FallbackRequired, ProtocolError
from .toolkit.fsio import remove_tree
from .toolkit.host_cache import CacheEntry, HostCache
from .toolkit.log import get_logger, phase
from .toolkit.modinfo import preload as preload_modinfo
from .toolkit.settings import Settings
from .toolkit.signing import signing_fingerprint
from .toolkit.waiting import Cancellation, wait_until

FALLBACK_NOTE = "the entitlement-based build in the driver container (not implemented yet: the fallback issue)"


@dataclass(frozen=True)
class Handoff:
    """What the driver side learned: the verified manifest, or the fast path."""

    fast_path: Optional[FastPath]
    manifest: Optional[Dict[str, Any]]
    generation: int = 0
    from_cache: bool = False


class DriverSide:
    def __init__(self, settings: Settings, cancel: Cancellation) -> None:
        self.settings = settings
        self.cancel = cancel
        self.paths = settings.paths
        self.shared = proto.SharedDir(self.paths.shared_dir)
        self.kernel = settings.kernel_release()
        self.inputs = proto.build_inputs(settings, self.kernel)
        self.log = get_logger(side="driver")
        self.cache = HostCache.from_settings(settings)

    def run(self) -> Handoff:
        s = self.settings
        if s.rhcos_image_missing:
            self.log.warning("RHCOS image tag missing, using entitlement-based fallback", rhcos_version=s.rhcos_version)
            raise FallbackRequired("RHCOS %r image tag missing in the driver-toolkit imagestream: falling back to %s"
                                   % (s.rhcos_version, FALLBACK_NOTE))
        fp = decide_fast_path(s)
        if fp.applies:
            self.log.info("fast path: the driver is loaded with this configuration; userspace-only install", **fp.facts)
            return Handoff(fast_path=fp, manifest=None)
        self.log.info("fast path not taken: building driver and modules", reason=fp.reason)
        if not self.shared.path.is_dir():
            raise ProtocolError(self.shared.path, "the shared directory is not mounted (a directory is expected)")
        if self.cache is not None and not self._prepared_for_inputs():
            entry = self.cache.lookup(self.inputs, signing_fingerprint(s), verify=False)
            if entry is not None:
                handoff = self.from_cache(entry)
                if handoff is not None:
                    return handoff
        generation = self.prepare()
        preload_modinfo()
        self.wait_started(generation)
        manifest = self.wait_built(generation)
        self._store_in_cache(manifest)
        return Handoff(fast_path=None, manifest=manifest, generation=generation)

    # -- host cache ------------------------------------------------------------

    def _prepared_for_inputs(self) -> bool:
        """The shared dir already holds a prepared generation for these inputs
        that has not failed (a restart of this container): use that."""
        try:
            m = self.shared.read_manifest()
            return (m is not None and m["inputs"] == self.inputs and self.shared.has(proto.DIR_PREPARED)
                    and not self.shared.has(proto.BUILD_FAILED))
        except ProtocolError:
            return False

    def from_cache(self, entry: CacheEntry) -> Optional[Handoff]:
        """Hand over a cache entry as a new generation's build; the copy in the
        shared dir is verified (the one read of every file). A corrupt entry is
        discarded, its generation moved aside, and None returned: the DTK builds."""
        sh = self.shared
        gen = self._next_generation()
        with phase(self.log, "restore from host cache", generation=gen, entry=str(entry.path)):
            self._start_generation(gen)
            staging = sh.path / (proto.STAGING_PREFIX + "cache-%d" % os.getpid())
            remove_tree(staging)
            assert self.cache is not None
            self.cache.restore(entry, staging)
            os.replace(str(staging), str(sh.path / proto.MODULES_DIR))
            details = dict(entry.data.get("details") or {})
            details["host_cache_entry"] = str(entry.path)
            sh.write_manifest({"protocol": proto.PROTOCOL_VERSION, "generation": gen, "inputs": self.inputs,
                               "build": {"builder": "host-cache", "components": ["nvidia"], "dtk_kernels": {},
                                         "finished_at": proto.now(), "details": details, "files": entry.files}})
            try:
                manifest = proto.verify_build(sh, self.inputs, gen)
            except ProtocolError as exc:
                self.cache.discard(entry, str(exc))
                sh.move_aside(gen)
                return None
            sh.write_flag(proto.BUILT, generation=gen, files=len(entry.files), source="host-cache")
            sh.write_flag(proto.DIR_PREPARED, generation=gen)
        self.log.info("hand-off verified from the host cache: no build needed", generation=gen, kernel=self.kernel)
        return Handoff(fast_path=None, manifest=manifest, generation=gen, from_cache=True)

    def _store_in_cache(self, manifest: Dict[str, Any]) -> None:
        if self.cache is None or manifest["build"].get("builder") == "host-cache":
            return
        fingerprint = (manifest["build"].get("details") or {}).get("signing_fingerprint", "")
        try:
            if not self.cache.contains(self.inputs, fingerprint):
                self.cache.store(self.inputs, fingerprint, self.shared.path / proto.MODULES_DIR, manifest["build"])
        except (OSError, DriverCtrError) as exc:
            self.log.warning("could not store the build in the host cache (the build itself is fine)", reason=str(exc))

    # -- prepare -------------------------------------------------------------

    def prepare(self) -> int:
        sh = self.shared
        try:
            manifest = sh.read_manifest()
        except ProtocolError as exc:
            self.log.warning("unreadable manifest: starting a new generation", reason=str(exc))
            manifest = None
        prepared = sh.has(proto.DIR_PREPARED)
        if manifest is not None and prepared and manifest["inputs"] == self.inputs:
            gen = manifest["generation"]
            if sh.has(proto.BUILD_FAILED):
                self.log.warning("the last build of these inputs failed: asking the DTK for a new attempt",
                                 failure=sh.read_flag(proto.BUILD_FAILED).get("message", ""))
            else:
                self.log.info("shared directory already prepared for these inputs", generation=gen)
                return gen
        gen = self._next_generation(manifest)
        with phase(self.log, "prepare", generation=gen, shared_dir=str(sh.path)):
            self._start_generation(gen, manifest)
            self._copy_drivers()
            sh.write_manifest({"protocol": proto.PROTOCOL_VERSION, "generation": gen, "inputs": self.inputs})
            sh.write_flag(proto.DIR_PREPARED, generation=gen)
        return gen

    def _next_generation(self, manifest: Optional[Dict[str, Any]] = None) -> int:
        if manifest is None:
            try:
                manifest = self.shared.read_manifest()
            except ProtocolError:
                manifest = None
        return (manifest["generation"] if manifest is not None else self._stale_generation()) + 1

    def _start_generation(self, gen: int, manifest: Optional[Dict[str, Any]] = None) -> None:
        """Move the last generation's outcome aside; install the DTK program and settings."""
        sh = self.shared
        if manifest is not None and manifest["inputs"] != self.inputs:
            self.log.warning("shared directory holds another configuration's build: never used, moved aside",
                             old_inputs=manifest["inputs"], inputs=self.inputs)
        sh.move_aside(gen - 1)
        payload.install(sh.path)
        sh.write_settings(self.settings.shared())

    def _stale_generation(self) -> int:
        """Highest generation seen in stale/ (so numbers never repeat after a lost manifest)."""
        best = 0
        stale = self.shared.path / proto.STALE_DIR
        if stale.is_dir():
            for d in stale.iterdir():
                parts = d.name.split("-")
                if len(parts) >= 2 and parts[1].isdigit():
                    best = max(best, int(parts[1]))
        return best

    def _copy_drivers(self) -> None:
        """Copy /drivers (the .run and the *.conf parameter files) for the DTK side."""
        src = self.paths.drivers_dir
        if not src.is_dir():
            return
        dest = self.shared.path / "drivers"
        dest.mkdir(exist_ok=True)
        for f in sorted(src.iterdir()):
            if f.is_file() and (f.name.endswith(".run") or f.name.endswith(".conf")):
                target = dest / f.name
                if target.is_file() and target.stat().st_size == f.stat().st_size and target.stat().st_mtime >= f.stat().st_mtime:
                    continue
                tmp = dest / (".%s.tmp" % f.name)
                shutil.copy2(str(f), str(tmp))
                tmp.replace(target)

    # -- waits ---------------------------------------------------------------

    def _outcome_check(self, generation: int) -> None:
        """Raise on the DTK's failure or broken signals of this generation."""
        sh = self.shared
        if sh.has(proto.TOOLKIT_BROKEN):
            body = sh.read_flag(proto.TOOLKIT_BROKEN)
            self.log.warning("broken driver toolkit detected, using entitlement-based fallback", **body)
            reasons = list(body.get("reasons") or [body.get("message", "no reason given (reference-style flag)")])
            if body.get("likely_cause"):
                reasons.append("likely cause: %s" % body["likely_cause"])
            raise FallbackRequired("the Driver Toolkit cannot build for node kernel %s; falling back to %s"
                                   % (self.kernel, FALLBACK_NOTE), reasons)
        if sh.has(proto.BUILD_FAILED):
            body = sh.read_flag(proto.BUILD_FAILED)
            if body.get("generation") in (generation, None):
                raise BuildFailed("DTK %s" % body.get("phase", "build"), body.get("message", "no reason given"),
                                  body.get("log_tail", ""))

    def wait_started(self, generation: int) -> None:
        def check() -> Optional[bool]:
            self._outcome_check(generation)
            if self.shared.has(proto.BUILD_STARTED) or self.shared.has(proto.BUILT):
                return True
            return None

        with phase(self.log, "wait build start", generation=generation):
            wait_until(check, directory=self.shared.path, what="the openshift-driver-toolkit-ctr container to start the build",
                       timeout_s=self.settings.start_timeout_s, cancel=self.cancel, log=self.log)

    def wait_built(self, generation: int) -> Dict[str, Any]:
        def check() -> Optional[Dict[str, Any]]:
            self._outcome_check(generation)
            if not self.shared.has(proto.BUILT):
                return None
            body = self.shared.read_flag(proto.BUILT)
            if body.get("generation") not in (generation, None):
                return None  # an older generation's flag being replaced
            return proto.verify_build(self.shared, self.inputs, generation)

        with phase(self.log, "wait build", generation=generation) as extra:
            manifest = wait_until(check, directory=self.shared.path,
                                  what="the openshift-driver-toolkit-ctr container to build the driver",
                                  timeout_s=self.settings.build_timeout_s, cancel=self.cancel, log=self.log)
            extra["files"] = len(manifest["build"]["files"])
        self.log.info("hand-off verified: every staged file matches the manifest and the node kernel",
                      generation=generation, kernel=self.kernel,
                      modules=[f["path"] for f in manifest["build"]["files"] if proto.is_module(f["path"])])
        return manifest


def run_with_dtk(settings: Settings, dry_run: bool) -> int:
    cancel = Cancellation().install()
    try:
        handoff = DriverSide(settings, cancel).run()
    except Cancelled as exc:
        get_logger(side="driver").info("stopping", reason=str(exc))
        return 0
    if dry_run:
        get_logger(side="driver").info("dry run: stopping before loading", fast_path=handoff.fast_path is not None,
                                       generation=handoff.generation)
        return 0
    from .driver_load import ModuleTree
    from .node_commands import load_handoff

    tree = None if handoff.fast_path is not None else ModuleTree(settings.paths.shared_dir / proto.MODULES_DIR,
                                                                 settings.kernel_release())
    return load_handoff(settings, cancel, tree)
