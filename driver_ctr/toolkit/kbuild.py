"""The real builder: NVIDIA's own Makefile (kbuild) against the target kernel's tree.

One build, in order: open the kernel trees; refuse a PREEMPT_RT kernel unless
``IGNORE_PREEMPT_RT_PRESENCE`` opts in; compare the kernel's compiler with the
one here; locate the sources and choose the flavour; copy that tree to a
scratch directory (a killed build never leaves objects in the sources);
``make -j<bounded> SYSSRC= SYSOUT= NV_KERNEL_MODULES= modules`` with its
output in the build log; check every module's vermagic against a module of
the same kernel; sign when a key is configured; stage the hand-off tree.
"""

from __future__ import annotations

import copy
import os
import shutil
import time
from pathlib import Path
from typing import IO, Any, Dict, Iterable, List, Optional, Sequence, Tuple

from .builders import Builder, BuildRequest, BuildResult
from .errors import BuildFailed, CommandFailed, tail_lines
from .fsio import remove_tree
from .inputs import read_tail
from .jobs import plan_jobs
from .kernel_tree import KernelTree, compiler_version, open_kernel_tree, present_compiler_version
from .log import get_logger
from .modinfo import read_modinfo, vermagic_problem
from .mofed import find_ofa_kernel, imports_peer_memory, prepare_build
from .nvidia_modules import PEERMEM, ko_file
from .runner import Runner
from .signing import sign_modules
from .sources import open_sources, resolve_flavour
from .staging import stage_modules


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
        o = req.options
        kernel = req.target_kernel
        started = time.monotonic()
        tree = open_kernel_tree(req.paths, kernel, req.build_tree)
        self._note(logf, "kernel %s: SYSSRC=%s SYSOUT=%s" % (kernel, tree.syssrc, tree.sysout))
        if tree.preempt_rt:
            if not o.ignore_preempt_rt:
                raise BuildFailed(
                    "prepare",
                    "kernel %s is a PREEMPT_RT kernel (CONFIG_PREEMPT_RT=y in %s/.config), which "
                    "NVIDIA does not support; set IGNORE_PREEMPT_RT_PRESENCE=1 to build anyway" % (kernel, tree.sysout),
                )
            self.log.warning("building for a PREEMPT_RT kernel: IGNORE_PREEMPT_RT_PRESENCE=1 is set", kernel=kernel)
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

        sources = open_sources(req.source, req.scratch, self.runner)
        flavour = resolve_flavour(o.module_type, o.driver_branch, sources, self.runner)
        modules = list(o.modules)
        skipped: Dict[str, str] = {}  # optional modules not built, and why
        ofa = None
        if PEERMEM in modules:
            ofa, why = find_ofa_kernel(req.paths, kernel, o.target_arch, o.use_host_mofed)
            if ofa is None:
                modules.remove(PEERMEM)
                skipped[PEERMEM] = why
                self.log.warning("nvidia-peermem not built: GPUDirect RDMA needs MOFED's kernel tree", reason=why)
                self._note(logf, "nvidia-peermem not built: %s" % why)
        plan = plan_jobs(req.paths.proc, req.paths.sys, o.max_jobs)
        self.log.info(
            "building",
            flavour=flavour.name,
            tree=flavour.subdir,
            reason=flavour.reason,
            sources=sources.origin,
            modules=modules,
            jobs=plan.jobs,
            job_limits=plan.limits,
        )
        self._note(
            logf,
            "%s modules from %s/%s (%s), -j%d (limits %s)"
            % (flavour.name, sources.root, flavour.subdir, flavour.reason, plan.jobs, plan.limits),
        )

        work = req.scratch / ("build-%d" % os.getpid())
        remove_tree(work)
        req.scratch.mkdir(parents=True, exist_ok=True)
        try:
            shutil.copytree(str(sources.root / flavour.subdir), str(work), symlinks=True)
            # ASCII messages: kbuild unexports LC_ALL, so LANG and LC_* decide.
            env = dict(os.environ, LC_ALL="C", LANG="C", LC_CTYPE="C", LC_MESSAGES="C")
            env.pop("IGNORE_PREEMPT_RT_PRESENCE", None)  # conftest treats any non-empty value as yes
            if tree.preempt_rt and o.ignore_preempt_rt:
                env["IGNORE_PREEMPT_RT_PRESENCE"] = "1"
            extra: List[str] = []
            if ofa is not None:
                extra, pointed = prepare_build(ofa, work, req.scratch)
                self._note(logf, "nvidia-peermem against MOFED's tree %s (conftest pointed: %s)" % (ofa, pointed))
            argv = make_argv(tree, plan.jobs, modules, extra)
            self._note(logf, "$ " + " ".join(argv))
            compile_start = time.monotonic()
            try:
                self.runner.run(argv, cwd=str(work), env=env, stdout_file=logf, timeout=o.timeout_s, cancel=req.cancel)
            except CommandFailed as exc:
                why, tail = _log_error_and_tail(req.log_path, work)
                raise BuildFailed("compile", why if exc.returncode is not None else exc.summary, tail) from None
            compile_s = time.monotonic() - compile_start
            built = [work / ko_file(m) for m in modules]
            missing = [p.name for p in built if not p.is_file()]
            if missing:
                raise BuildFailed("compile", "make succeeded but did not produce %s" % ", ".join(missing))
            if PEERMEM in modules and not imports_peer_memory(work / ko_file(PEERMEM)):
                why = "built without MOFED's peer-memory symbols (its init would fail with EINVAL): %s" % ofa
                built.remove(work / ko_file(PEERMEM))
                modules.remove(PEERMEM)
                skipped[PEERMEM] = why
                self.log.warning("nvidia-peermem left out", reason=why)
                self._note(logf, "nvidia-peermem left out: %s" % why)
            reference = tree.reference_vermagic()
            infos = {p: read_modinfo(p) for p in built}
            for p, info in infos.items():
                problem = vermagic_problem(p.name, info.vermagic, kernel, reference)
                if problem:
                    raise BuildFailed("verify", problem)
            fingerprint = ""
            if o.signing is not None:
                fingerprint = o.signing.fingerprint()
                sign_modules(built, tree.sign_file(), o.signing, self.runner, logf)
                self._note(
                    logf,
                    "signed %d modules (%s, certificate sha256 %s)" % (len(built), o.signing.hash_algo, fingerprint),
                )
            staged = stage_modules(
                infos,
                tree.module_dir,
                kernel,
                req.staging_dir,
                self.runner,
                symvers=tree.sysout / "Module.symvers",
                log_file=logf,
                external_symvers=[ofa / "Module.symvers"] if ofa is not None and PEERMEM in modules else [],
            )
            symvers = req.scratch / ("nvidia-%s.symvers" % kernel)  # for nvidia-fs (components.py)
            if (work / "Module.symvers").is_file():
                shutil.copyfile(str(work / "Module.symvers"), str(symvers))
        finally:
            remove_tree(work)
            remove_tree(req.scratch / ("ofa_kernel-%d" % os.getpid()))
        details: Dict[str, Any] = {
            "flavour": flavour.name,
            "tree": flavour.subdir,
            "flavour_reason": flavour.reason,
            "sources": sources.origin,
            "modules": modules,
            "not_built": skipped,
            "mofed": str(ofa) if ofa is not None and PEERMEM in modules else "",
            "from_kernel": list(staged.from_kernel),
            "jobs": plan.jobs,
            "job_limits": plan.limits,
            "kernel_compiler": tree.compiler_text,
            "compiler": here_cc,
            "preempt_rt": tree.preempt_rt,
            "reference_vermagic": reference,
            "signed": o.signing is not None,
            "signing_fingerprint": fingerprint,
            "compile_seconds": round(compile_s, 1),
            "seconds": round(time.monotonic() - started, 1),
        }
        self._note(logf, "built %s in %.1f s" % (", ".join(modules), details["seconds"]))
        return BuildResult(
            builder=self.name,
            details=details,
            symvers=symvers if symvers.is_file() else None,
            sources_root=sources.root,
            flavour_tree=sources.root / flavour.subdir,
        )
