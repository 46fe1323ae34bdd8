"""``dtk-build-driver``: the DTK container's side of the protocol, top to bottom.

1. ``RHCOS_IMAGE_MISSING=true``: this container runs the driver image, not a
   DTK; the driver side falls back. Idle until signalled.
2. Read ``settings.json`` and the manifest the driver side wrote.
3. Decide whether this DTK can build for the node kernel; if not, write
   ``driver_toolkit_broken`` with the reasons and idle.
4. A complete build with the same inputs and generation is reused.
5. Otherwise write ``driver_build_started`` (before any log line or heavy
   import: the driver side is waiting for it), build into a staging
   directory, check every module's vermagic, swap it in as ``modules/``,
   write the manifest, store it in the host cache, then ``driver_built``;
   then GDS's nvidia-fs and GDRCopy's gdrdrv when enabled (``components``),
   each ending in its own built or failed flag.
6. Idle; when ``driver_built`` disappears or the generation changes, go to 2.
On a failure: ``driver_build_failed`` with the phase, message and log tail,
then exit non-zero. A stop signal (TERM, INT, HUP, QUIT, PIPE) ends the process promptly at any wait.
"""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Union

from . import components
from . import protocol as proto
from .build_logs import keep_build_log
from .builders import Builder, BuildResult, build_and_describe, default_scratch, request_for
from .dtk_decision import DtkDecision, decide, inspect_dtk
from .errors import (
    BuildFailed,
    Cancelled,
    DriverCtrError,
    FileSystemError,
    HandoffTimeout,
    ProtocolError,
    innermost_step,
    tail_lines,
)
from .host_cache import HostCache, store_build
from .inputs import read_tail
from .jobs import plan_jobs
from .kbuild import KbuildBuilder
from .kernel_tree import open_kernel_tree
from .log import Logger, first_line, get_logger, phase
from .records import BuildInputs, BuildRecord, Manifest
from .runner import Runner
from .settings import DTK_OWN_VARIABLES, Settings
from .sources import DriverSources, expose
from .waiting import Cancellation, wait_until

IDLE_RECHECK_S = 5.0


def merged_settings(shared_env: Mapping[str, str], own_env: Mapping[str, str]) -> Settings:
    env: Dict[str, str] = dict(shared_env)
    for k in DTK_OWN_VARIABLES:
        if own_env.get(k, "").strip():
            env[k] = own_env[k]
    for k, v in own_env.items():
        if k.startswith("DRIVER_CTR_"):
            env[k] = v
    return Settings.from_env(env)


class DtkSide:
    def __init__(
        self, shared_dir: Path, own_env: Mapping[str, str], cancel: Cancellation, builder: Optional[Builder] = None
    ) -> None:
        self.shared = proto.SharedDir(shared_dir, tag="%s%d" % (proto.DTK_TAG, os.getpid()))
        self.own_env = dict(own_env)
        self.cancel = cancel
        self.builder = builder or KbuildBuilder()
        self.log = get_logger()
        self.generation: Optional[int] = None  # the generation being worked on, once read

    # -- helpers -----------------------------------------------------------

    def _idle(self, why: str, until: Optional[Callable[[], bool]] = None) -> None:
        """Wait for a signal (or for ``until()`` to become true)."""
        self.log.info("idle", reason=why)

        def check() -> Optional[bool]:
            return True if until is not None and until() else None

        wait_until(
            check,
            directory=self.shared.path,
            what=why,
            timeout_s=None,
            cancel=self.cancel,
            recheck_s=IDLE_RECHECK_S,
            progress_s=3600,
        )

    def _generation_changed(self, generation: int) -> bool:
        return self.shared.generation() != generation

    def _built_gone_or_changed(self, generation: int) -> bool:
        return not self.shared.has(proto.BUILT) or self._generation_changed(generation)

    # -- main --------------------------------------------------------------

    def run(self) -> int:
        try:
            return self._run()
        except Cancelled as exc:
            self.log.info("stopping", reason=str(exc))
            return 0

    def _run(self) -> int:
        own_missing = self.own_env.get("RHCOS_IMAGE_MISSING", "").strip().lower() == "true"
        if own_missing:
            self.log.warning(
                "RHCOS image tag missing: this container runs the driver image, not a DTK; "
                "the driver container takes the entitlement-based fallback",
                rhcos_version=self.own_env.get("RHCOS_VERSION", ""),
            )
            self._idle("RHCOS_IMAGE_MISSING=true: nothing to build here")
            return 0
        self._take_lock()
        self.shared.fs.sweep_temporaries(proto.DTK_TAG)
        self.shared.clean_staging(lambda tag: tag.startswith(proto.DTK_TAG))
        while True:
            settings = merged_settings(self.shared.read_settings(), self.own_env)
            manifest = self.shared.read_manifest()
            if manifest is None:
                # The driver side is starting a new generation (it moved the
                # last one aside and writes the manifest next).
                self._idle(
                    "waiting for the driver side's new manifest", until=lambda: self.shared.manifest_path.exists()
                )
                continue
            generation = self.generation = manifest.generation
            kernel = settings.running_kernel()
            inputs = BuildInputs.from_settings(settings, kernel)
            diff = manifest.inputs.differences(inputs)
            if diff:
                self._wait_for_new_generation(generation, diff, settings.start_timeout_s)
                continue
            facts = inspect_dtk(settings.paths, kernel)
            decision = decide(kernel, facts, settings.rhcos_version)
            if decision.broken:
                self.shared.write_flag(
                    proto.Broken(
                        generation=generation,
                        reasons=decision.reasons,
                        likely_cause=decision.likely_cause,
                        decision=decision.as_dict(),
                    )
                )
                self.log.warning(
                    "broken Driver Toolkit image detected: informing the driver container to fall back",
                    **decision.as_dict(),
                )
                self._idle("broken DTK", until=partial(self._generation_changed, generation))
                continue
            failed = self.shared.read_flag(proto.Failed)
            if failed is not None and failed.generation == generation:
                self.log.warning(
                    "the build of this generation failed before; waiting for the driver side to request a retry",
                    generation=generation,
                )
                self._idle("failed build", until=partial(self._generation_changed, generation))
                continue
            if self.shared.has(proto.BUILT) and self._reusable(inputs, generation, settings.module_size_limit):
                self.log.info("NVIDIA drivers already built for these inputs, nothing to do", generation=generation)
            elif not self._build(settings, inputs, generation, decision, facts.build_tree):
                return 1
            self._idle(
                "built; watching driver_built",
                until=partial(self._built_gone_or_changed, generation),
            )
            self.log.warning("driver_built disappeared or a new generation was prepared: rebuilding")

    def _take_lock(self) -> None:
        """Be the one DTK side at work: a restarted container may overlap its
        predecessor, which ends on its SIGTERM; wait for that (cancellably)."""
        told = False
        while self.shared.fs.try_lock(proto.DTK_LOCK) is None:
            if not told:
                self.log.info("another DTK side holds the shared directory: waiting for it to stop")
                told = True
            self.cancel.check()
            self.cancel.sleep(0.5)
        self.cancel.check()

    def _wait_for_new_generation(self, generation: int, diff: List[str], timeout_s: float) -> None:
        """The prepared generation is for other inputs: most often the last
        generation before a node reboot onto a new kernel (the shared dir
        survived it), which the driver side is about to replace. Wait for that;
        only when no new generation comes is it an error (the two containers
        disagree), and it never fails a generation it did not read."""
        self.log.info(
            "the prepared generation is for other inputs: waiting for the driver side's new one",
            generation=generation,
            differences=diff,
        )
        try:
            wait_until(
                lambda: True if self._generation_changed(generation) else None,
                directory=self.shared.path,
                what="the driver side to prepare a generation for this node",
                timeout_s=timeout_s,
                cancel=self.cancel,
                recheck_s=IDLE_RECHECK_S,
                log=self.log,
            )
        except HandoffTimeout:
            raise ProtocolError(
                self.shared.manifest_path,
                "inputs of generation %d are not this node's: %s" % (generation, "; ".join(diff)),
            ) from None

    def _reusable(self, inputs: BuildInputs, generation: int, limit: int) -> bool:
        try:
            proto.verify_build(self.shared, inputs, generation, limit)
            return True
        except ProtocolError as exc:
            self.log.warning("existing build not reusable, rebuilding", reason=str(exc))
            return False

    def _build(
        self,
        settings: Settings,
        inputs: BuildInputs,
        generation: int,
        decision: DtkDecision,
        build_tree: Optional[str],
    ) -> bool:
        """Build this generation into a private staging directory, publish it as ``modules/`` with the
        manifest and ``driver_built``, then the optional components. A failure of any step (a full disk
        included) is ``driver_build_failed`` with its phase; False then."""
        sh = self.shared
        self._start(generation, decision)
        staging_name = sh.staging("%s%d-%d" % (proto.DTK_TAG, generation, os.getpid()))
        kernel = inputs.kernel_release
        step = "build"
        try:
            with phase(self.log, "build", generation=generation, kernel=kernel, builder=self.builder.name):
                sh.fs.remove(staging_name)
                sh.fs.ensure_dir(staging_name)
                request = request_for(
                    settings,
                    kernel,
                    sh.path / staging_name,
                    sh.build_log,
                    self.cancel,
                    search_dirs=[sh.drivers],
                    build_tree=Path(build_tree) if build_tree else None,
                )
                built = build_and_describe(
                    self.builder, request, settings.module_size_limit, dtk_kernels=decision.dtk_kernels
                )
            step = "publish"
            with phase(self.log, "publish", generation=generation):
                if not self._publish(staging_name, settings, inputs, generation, built.record):
                    return True
            self._components(settings, built.result, kernel, build_tree, generation)
            self._keep_log(settings, kernel, generation)
            return True
        except Cancelled:
            sh.fs.remove(staging_name)
            raise
        except (DriverCtrError, OSError) as exc:  # a full disk, EACCES: signalled like any failed build
            sh.fs.remove(staging_name)
            self._signal_failed(settings, kernel, generation, step, exc)
            return False

    def _start(self, generation: int, decision: DtkDecision) -> None:
        """Clear the outcome of an earlier build, then ``driver_build_started``, then an empty build log."""
        sh = self.shared
        for flag in (
            proto.BUILT,
            proto.NVIDIA_FS_BUILT,
            proto.GDRCOPY_BUILT,
            proto.BUILD_FAILED,
            proto.NVIDIA_FS_BUILD_FAILED,
            proto.GDRCOPY_BUILD_FAILED,
        ):
            sh.remove_flag(flag)
        sh.write_flag(proto.Started(generation=generation, pid=os.getpid(), builder=self.builder.name))
        for note in decision.notes:
            self.log.info("dtk note", note=note)
        sh.fs.write_atomic(proto.BUILD_LOG, b"")

    def _publish(
        self, staging_name: str, settings: Settings, inputs: BuildInputs, generation: int, build: BuildRecord
    ) -> bool:
        """Swap the staged tree in as ``modules/``, write the manifest, store the build in the host cache,
        then ``driver_built``. False when a new generation was prepared meanwhile (the build is discarded)."""
        sh = self.shared
        if self._generation_changed(generation):
            self.log.warning("a new generation was prepared during the build: discarding this one")
            sh.fs.remove(staging_name)
            return False
        old = sh.staging("%sold-%d" % (proto.DTK_TAG, os.getpid()))
        if sh.fs.kind(proto.MODULES_DIR) is not None:
            sh.fs.replace(proto.MODULES_DIR, old)
        sh.fs.replace(staging_name, proto.MODULES_DIR)
        sh.fs.remove(old)
        sh.write_manifest(Manifest(generation=generation, inputs=inputs, build=build))
        # Before driver_built: the driver side then finds it stored.
        store_build(HostCache.from_settings(settings), inputs, build, sh.modules, self.log)
        sh.write_flag(proto.Built(generation=generation, files=len(build.files)))
        return True

    def _signal_failed(
        self, settings: Settings, kernel: str, generation: int, step: str, exc: Union[DriverCtrError, OSError]
    ) -> None:
        """``driver_build_failed`` with the phase, the message and the build log's tail."""
        sh = self.shared
        if isinstance(exc, OSError):
            exc = FileSystemError(exc, step + innermost_step(exc))
        if isinstance(exc, BuildFailed):
            phase_name, message, log_tail = exc.phase, exc.message, exc.log_tail or _log_tail(sh.build_log)
        else:
            phase_name, message, log_tail = step, first_line(exc), _log_tail(sh.build_log)
        self.log.error("build failed", phase=phase_name, message=message, generation=generation)
        sh.write_flag(proto.Failed(generation=generation, phase=phase_name, message=message, log_tail=log_tail))
        self._keep_log(settings, kernel, generation)

    def _keep_log(self, settings: Settings, kernel: str, generation: int) -> None:
        kept = keep_build_log(settings.paths, self.shared.build_log, kernel, generation)
        if kept is not None:
            self.log.info("build log kept on the node", path=str(kept))

    def _components(
        self, settings: Settings, result: BuildResult, kernel: str, build_tree: Optional[str], generation: int
    ) -> None:
        """GDS's nvidia-fs and GDRCopy's gdrdrv, when enabled, after the GPU driver is published: each
        ends in its own flag, built or failed; none ever fails the GPU driver's generation."""
        wanted = [
            (c, built, failed)
            for c, on, built, failed in (
                (components.NVIDIA_FS, settings.gds_enabled, proto.NvidiaFsBuilt, proto.NvidiaFsFailed),
                (components.GDRCOPY, settings.gdrcopy_enabled, proto.GdrcopyBuilt, proto.GdrcopyFailed),
            )
            if on
        ]
        if not wanted:
            return
        sh = self.shared
        expose_sources(settings, result, self.log)
        for component, built_flag, failed_flag in wanted:
            try:
                with phase(self.log, "build %s" % component.name, generation=generation):
                    inputs = components.Inputs(
                        tree=open_kernel_tree(settings.paths, kernel, Path(build_tree) if build_tree else None),
                        nvidia_symvers=result.symvers,
                        nvidia_src=result.flavour_tree,
                        scratch=default_scratch(),
                        jobs=plan_jobs(settings.paths.proc, settings.paths.sys, settings.max_threads).jobs,
                    )
                    with open(str(sh.build_log), "ab", buffering=0) as logf:
                        rel = components.build_component(component, sh.fs, inputs, Runner(self.cancel), logf)
                sh.write_flag(built_flag(generation=generation))
                self.log.info("%s built" % component.name, module=rel)
            except (DriverCtrError, OSError) as exc:  # an optional component never fails the GPU driver
                if isinstance(exc, OSError):
                    exc = FileSystemError(exc, "build %s" % component.name + innermost_step(exc))
                message = exc.message if isinstance(exc, BuildFailed) else first_line(exc)
                failed_phase = exc.phase if isinstance(exc, BuildFailed) else "build"
                self.log.error(
                    "%s not built: its sidecar is told why; the GPU driver is not concerned" % component.name,
                    reason=message,
                )
                sh.write_flag(
                    failed_flag(
                        generation=generation,
                        component=component.name,
                        phase=failed_phase,
                        message=message,
                        log_tail=_log_tail(sh.build_log),
                    )
                )


def expose_sources(settings: Settings, result: BuildResult, log: Logger) -> None:
    """``/usr/src/nvidia-<version>``: NVIDIA's sources of this build (``sources.expose``)."""
    if result.sources_root is None:
        return
    link = expose(settings.paths, settings.driver_version.raw, DriverSources(result.sources_root, "this build"))
    if link is not None:
        log.info("NVIDIA sources exposed", path=str(link), sources=str(result.sources_root))


def _log_tail(path: Path) -> str:
    """The last lines of the build log, read from its end (a log of any size costs 64 KiB)."""
    try:
        return tail_lines(read_tail(path, "build log").decode("utf-8", "replace"), 30)
    except (OSError, ProtocolError):
        return ""
