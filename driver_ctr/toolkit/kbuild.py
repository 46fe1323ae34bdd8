"""The real builder: NVIDIA's own Makefile (kbuild) against the target kernel's tree.

One build, as steps, each answering a small record the build's details come from:

1. **prepare** (:class:`Plan`): open the kernel trees; refuse a PREEMPT_RT kernel unless
   ``IGNORE_PREEMPT_RT_PRESENCE`` opts in; compare the kernel's compiler with the one here; locate the
   sources and choose the flavour; decide once whether nvidia-peermem is built (MOFED's tree); bound the
   jobs.
2. **compile** (:class:`Compiled`): the flavour's tree copied to a scratch directory (a killed build never
   leaves objects in the sources), ``make -j<bounded> SYSSRC= SYSOUT= NV_KERNEL_MODULES= modules`` with its
   output in the build log; nvidia-peermem left out when it lacks MOFED's peer-memory symbols.
3. **check** (:class:`Checked`): every module's vermagic against a module of the same kernel.
4. **sign** when a key is configured (the certificate's fingerprint).
5. **stage** the hand-off tree (``staging``), with NVIDIA's ``Module.symvers`` kept for the components.
"""

from __future__ import annotations

import copy
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from .builders import Builder, BuildRequest, BuildResult
from .errors import BuildFailed, CommandFailed, tail_lines
from .fsio import remove_tree
from .inputs import read_tail
from .jobs import JobPlan, plan_jobs
from .kernel_tree import KernelTree, compiler_version, open_kernel_tree, present_compiler_version
from .log import get_logger
from .modinfo import ModInfo, read_modinfo, vermagic_problem
from .mofed import find_ofa_kernel, imports_peer_memory, prepare_build
from .nvidia_modules import PEERMEM, ko_file
from .runner import Runner
from .signing import sign_modules
from .sources import DriverSources, Flavour, open_sources, resolve_flavour
from .staging import StageResult, stage_modules


def make_argv(tree: KernelTree, jobs: int, modules: Sequence[str], extra: Sequence[str] = ()) -> List[str]:
    return [
        "make",
        "-j%d" % jobs,
        "SYSSRC=%s" % tree.syssrc,
        "SYSOUT=%s" % tree.sysout,
        "NV_KERNEL_MODULES=%s" % " ".join(modules),
        *extra,
        "modules",
    ]


def first_error(lines: Iterable[str], workdir: Path) -> str:
    """The line that says why a build failed: the first compiler error, else
    the first ``***`` line (conftest, make), else the last line. ``lines`` is
    streamed (a build log of any size is read once, a line at a time)."""
    error = stars = last = None
    for raw in lines:
        line = raw.strip()
        if not line:
            continue
        last = line
        if error is None and (": error:" in line or "fatal error:" in line):
            error = line
            break
        if stars is None and "***" in line:
            stars = line
    picked = error or stars or last or "the build printed nothing"
    return picked.replace(str(workdir) + "/", "")


def _log_error_and_tail(log: Path, workdir: Path) -> Tuple[str, str]:
    """The first error of a build log (streamed) and its last 30 lines (read from its end)."""
    with open(str(log), "r", errors="replace") as f:
        why = first_error(f, workdir)
    tail = read_tail(log, "build log").decode("utf-8", "replace")
    return why, tail_lines(tail.replace(str(workdir) + "/", ""), 30)


@dataclass(frozen=True)
class Plan:
    """What the prepare step decided."""

    tree: KernelTree
    compiler: str  # the compiler here, as gcc --version says it
    sources: DriverSources
    flavour: Flavour
    modules: Tuple[str, ...]  # what make builds
    not_built: Mapping[str, str]  # optional modules left out, and why
    ofa: Optional[Path]  # MOFED's kernel tree nvidia-peermem builds against
    jobs: JobPlan


@dataclass(frozen=True)
class Compiled:
    work: Path  # the scratch copy of the flavour's tree, holding the built modules
    modules: Tuple[str, ...]  # what was built and is kept
    not_built: Mapping[str, str]
    seconds: float

    @property
    def files(self) -> List[Path]:
        return [self.work / ko_file(m) for m in self.modules]


@dataclass(frozen=True)
class Checked:
    infos: Mapping[Path, ModInfo]
    reference_vermagic: Optional[str]


class KbuildBuilder(Builder):
    name = "kbuild"

    def __init__(self, runner: Optional[Runner] = None) -> None:
        self.runner = runner or Runner()
        self.log = get_logger(builder=self.name)

    def build(self, request: BuildRequest) -> BuildResult:
        """Every child of the build (extraction, compiler checks, make, signing,
        depmod) runs bound to the request's cancellation."""
        builder = copy.copy(self)
        builder.runner = self.runner.with_cancel(request.cancel)
        with open(str(request.log_path), "ab", buffering=0) as logf:
            return builder._build(request, logf)

    def _note(self, logf: IO[bytes], text: str) -> None:
        logf.write(("driver-ctr: %s\n" % text).encode())

    def _build(self, req: BuildRequest, logf: IO[bytes]) -> BuildResult:
        started = time.monotonic()
        plan = self._prepare(req, logf)
        work = req.scratch / ("build-%d" % os.getpid())
        remove_tree(work)
        req.scratch.mkdir(parents=True, exist_ok=True)
        try:
            compiled = self._compile(req, plan, work, logf)
            checked = self._check(req, plan, compiled)
            fingerprint = self._sign(req, plan, compiled, logf)
            staged = self._stage(req, plan, compiled, checked, logf)
        finally:
            remove_tree(work)
            remove_tree(req.scratch / ("ofa_kernel-%d" % os.getpid()))
        seconds = round(time.monotonic() - started, 1)
        self._note(logf, "built %s in %.1f s" % (", ".join(compiled.modules), seconds))
        symvers = req.scratch / ("nvidia-%s.symvers" % req.target_kernel)
        return BuildResult(
            builder=self.name,
            details=_details(req, plan, compiled, checked, staged, fingerprint, seconds),
            symvers=symvers if symvers.is_file() else None,
            sources_root=plan.sources.root,
            flavour_tree=plan.sources.root / plan.flavour.subdir,
        )

    # -- 1. prepare ------------------------------------------------------------------

    def _prepare(self, req: BuildRequest, logf: IO[bytes]) -> Plan:
        o = req.options
        tree = open_kernel_tree(req.paths, req.target_kernel, req.build_tree)
        self._note(logf, "kernel %s: SYSSRC=%s SYSOUT=%s" % (req.target_kernel, tree.syssrc, tree.sysout))
        self._refuse_rt(tree, req)
        compiler = self._compiler(tree, logf)
        sources = open_sources(req.source, req.scratch, self.runner)
        flavour = resolve_flavour(o.module_type, o.driver_branch, sources, self.runner)
        modules: Tuple[str, ...] = tuple(o.modules)
        not_built: Dict[str, str] = {}
        ofa: Optional[Path] = None
        if PEERMEM in modules:
            ofa, why = find_ofa_kernel(req.paths, req.target_kernel, o.target_arch, o.use_host_mofed)
            if ofa is None:
                modules, not_built = self._leave_out(PEERMEM, why, modules, not_built, logf)
        jobs = plan_jobs(req.paths.proc, req.paths.sys, o.max_jobs)
        plan = Plan(tree, compiler, sources, flavour, modules, not_built, ofa, jobs)
        self.log.info(
            "building",
            flavour=flavour.name,
            tree=flavour.subdir,
            reason=flavour.reason,
            sources=sources.origin,
            modules=list(modules),
            jobs=jobs.jobs,
            job_limits=jobs.limits,
        )
        self._note(
            logf,
            "%s modules from %s/%s (%s), -j%d (limits %s)"
            % (flavour.name, sources.root, flavour.subdir, flavour.reason, jobs.jobs, jobs.limits),
        )
        return plan

    def _refuse_rt(self, tree: KernelTree, req: BuildRequest) -> None:
        if not tree.preempt_rt:
            return
        if not req.options.ignore_preempt_rt:
            raise BuildFailed(
                "prepare",
                "kernel %s is a PREEMPT_RT kernel (CONFIG_PREEMPT_RT=y in %s/.config), which NVIDIA does not "
                "support; set IGNORE_PREEMPT_RT_PRESENCE=1 to build anyway" % (req.target_kernel, tree.sysout),
            )
        self.log.warning(
            "building for a PREEMPT_RT kernel: IGNORE_PREEMPT_RT_PRESENCE=1 is set", kernel=req.target_kernel
        )

    def _compiler(self, tree: KernelTree, logf: IO[bytes]) -> str:
        """The compiler here (the kernel's, else gcc); a difference from the kernel's is said, not refused."""
        kernel_cc = compiler_version(tree.compiler_text)
        here_cc = present_compiler_version(self.runner, tree.compiler) or present_compiler_version(self.runner, "gcc")
        if not here_cc:
            raise BuildFailed(
                "prepare",
                "no C compiler: neither %s nor gcc runs here (the kernel was built with %r)"
                % (tree.compiler, tree.compiler_text),
            )
        if kernel_cc and here_cc != kernel_cc:
            self.log.warning(
                "compiler differs from the kernel's",
                kernel_compiler=kernel_cc,
                compiler=here_cc,
                kernel_compiler_text=tree.compiler_text,
            )
            self._note(logf, "compiler %s differs from the kernel's %s (%s)" % (here_cc, kernel_cc, tree.compiler_text))
        return here_cc

    def _leave_out(
        self, module: str, why: str, modules: Tuple[str, ...], not_built: Mapping[str, str], logf: IO[bytes]
    ) -> Tuple[Tuple[str, ...], Dict[str, str]]:
        """An optional module not built (nvidia-peermem without MOFED's tree or symbols): said, never fatal."""
        self.log.warning("%s not built" % module, reason=why)
        self._note(logf, "%s not built: %s" % (module, why))
        return tuple(m for m in modules if m != module), dict(not_built, **{module: why})

    # -- 2. compile ------------------------------------------------------------------

    def _compile(self, req: BuildRequest, plan: Plan, work: Path, logf: IO[bytes]) -> Compiled:
        shutil.copytree(str(plan.sources.root / plan.flavour.subdir), str(work), symlinks=True)
        # ASCII messages: kbuild unexports LC_ALL, so LANG and LC_* decide.
        env = dict(os.environ, LC_ALL="C", LANG="C", LC_CTYPE="C", LC_MESSAGES="C")
        env.pop("IGNORE_PREEMPT_RT_PRESENCE", None)  # conftest treats any non-empty value as yes
        if plan.tree.preempt_rt and req.options.ignore_preempt_rt:
            env["IGNORE_PREEMPT_RT_PRESENCE"] = "1"
        extra: List[str] = []
        if plan.ofa is not None:
            extra, pointed = prepare_build(plan.ofa, work, req.scratch)
            self._note(logf, "nvidia-peermem against MOFED's tree %s (conftest pointed: %s)" % (plan.ofa, pointed))
        argv = make_argv(plan.tree, plan.jobs.jobs, plan.modules, extra)
        self._note(logf, "$ " + " ".join(argv))
        started = time.monotonic()
        try:
            self.runner.run(argv, cwd=str(work), env=env, stdout_file=logf, timeout=req.options.timeout_s)
        except CommandFailed as exc:
            why, tail = _log_error_and_tail(req.log_path, work)
            raise BuildFailed("compile", why if exc.returncode is not None else exc.summary, tail) from None
        seconds = time.monotonic() - started
        missing = [ko_file(m) for m in plan.modules if not (work / ko_file(m)).is_file()]
        if missing:
            raise BuildFailed("compile", "make succeeded but did not produce %s" % ", ".join(missing))
        modules, not_built = plan.modules, plan.not_built
        if PEERMEM in modules and not imports_peer_memory(work / ko_file(PEERMEM)):
            why = "built without MOFED's peer-memory symbols (its init would fail with EINVAL): %s" % plan.ofa
            modules, not_built = self._leave_out(PEERMEM, why, modules, not_built, logf)
        return Compiled(work, modules, not_built, seconds)

    # -- 3. check, 4. sign, 5. stage -------------------------------------------------

    def _check(self, req: BuildRequest, plan: Plan, compiled: Compiled) -> Checked:
        reference = plan.tree.reference_vermagic()
        infos = {p: read_modinfo(p) for p in compiled.files}
        for p, info in infos.items():
            problem = vermagic_problem(p.name, info.vermagic, req.target_kernel, reference)
            if problem:
                raise BuildFailed("verify", problem)
        return Checked(infos, reference)

    def _sign(self, req: BuildRequest, plan: Plan, compiled: Compiled, logf: IO[bytes]) -> str:
        """The signing certificate's fingerprint; empty when unsigned."""
        signing = req.options.signing
        if signing is None:
            return ""
        fingerprint = signing.fingerprint()
        sign_modules(compiled.files, plan.tree.sign_file(), signing, self.runner, logf)
        self._note(
            logf,
            "signed %d modules (%s, certificate sha256 %s)" % (len(compiled.files), signing.hash_algo, fingerprint),
        )
        return fingerprint

    def _stage(
        self, req: BuildRequest, plan: Plan, compiled: Compiled, checked: Checked, logf: IO[bytes]
    ) -> StageResult:
        mofed = plan.ofa is not None and PEERMEM in compiled.modules
        staged = stage_modules(
            dict(checked.infos),
            plan.tree.module_dir,
            req.target_kernel,
            req.staging_dir,
            self.runner,
            symvers=plan.tree.sysout / "Module.symvers",
            log_file=logf,
            external_symvers=[plan.ofa / "Module.symvers"] if mofed and plan.ofa is not None else [],
        )
        if (compiled.work / "Module.symvers").is_file():  # for nvidia-fs (components.py)
            shutil.copyfile(
                str(compiled.work / "Module.symvers"), str(req.scratch / ("nvidia-%s.symvers" % req.target_kernel))
            )
        return staged


def _details(
    req: BuildRequest,
    plan: Plan,
    compiled: Compiled,
    checked: Checked,
    staged: StageResult,
    fingerprint: str,
    seconds: float,
) -> Dict[str, Any]:
    """What the manifest records of a kbuild build, from its steps' records."""
    return {
        "flavour": plan.flavour.name,
        "tree": plan.flavour.subdir,
        "flavour_reason": plan.flavour.reason,
        "sources": plan.sources.origin,
        "modules": list(compiled.modules),
        "not_built": dict(compiled.not_built),
        "mofed": str(plan.ofa) if plan.ofa is not None and PEERMEM in compiled.modules else "",
        "from_kernel": list(staged.from_kernel),
        "jobs": plan.jobs.jobs,
        "job_limits": plan.jobs.limits,
        "kernel_compiler": plan.tree.compiler_text,
        "compiler": plan.compiler,
        "preempt_rt": plan.tree.preempt_rt,
        "reference_vermagic": checked.reference_vermagic,
        "signed": req.options.signing is not None,
        "signing_fingerprint": fingerprint,
        "compile_seconds": round(compiled.seconds, 1),
        "seconds": seconds,
    }
