"""The hand-off module tree: NVIDIA's modules plus what they need from the kernel.

Layout is relative to ``/lib/modules/<kver>``:

- ``kernel/drivers/video/nvidia*.ko`` (where nvidia-installer puts them);
- the dependency closure from the target kernel's own modules (``drm``,
  ``video``, … as ``modules.dep`` of the kernel names them), compressed files
  kept as they are, at their own relative paths;
- the kernel's ``modules.order``/``modules.builtin``/``modules.builtin.modinfo``
  and the indexes the real ``depmod -b`` generates, so the loader can run
  ``modprobe -d <tree>``;
- ``insmod_nvidia``: ``modprobe --show-depends`` of the reference's module
  list, for consumers of the reference layout.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Dict, List, Mapping, Optional, Sequence, Set, Tuple

from .errors import BuildFailed, CommandFailed
from .fsio import remove_tree
from .inputs import read_input_text
from .modinfo import ModInfo
from .nvidia_modules import COMPANIONS, SUBDIR, module_name, normalize
from .runner import Runner

INSMOD_LIST = "insmod_nvidia"
KERNEL_INDEX_FILES = ("modules.order", "modules.builtin", "modules.builtin.modinfo")
_UNKNOWN_SYMBOL = re.compile(r"(\S+\.ko\S*) needs unknown symbol (\S+)")


@dataclass(frozen=True)
class KernelModules:
    """What ``/lib/modules/<k>`` of the target kernel provides."""

    root: Path
    paths: Dict[str, str] = field(default_factory=dict)  # name -> path relative to root
    deps: Dict[str, Tuple[str, ...]] = field(default_factory=dict)  # name -> names
    builtin: Set[str] = field(default_factory=set)

    @classmethod
    def read(cls, module_dir: Path) -> "KernelModules":
        paths: Dict[str, str] = {}
        deps: Dict[str, Tuple[str, ...]] = {}
        dep_file = module_dir / "modules.dep"
        if dep_file.is_file():
            for line in read_input_text(dep_file, "kernel tree file").splitlines():
                target, sep, rest = line.partition(":")
                if not sep:
                    continue
                name = module_name(target.strip())
                paths[name] = target.strip()
                deps[name] = tuple(module_name(d) for d in rest.split())
        builtin: Set[str] = set()
        b = module_dir / "modules.builtin"
        if b.is_file():
            builtin = {module_name(l.strip()) for l in read_input_text(b, "kernel tree file").splitlines() if l.strip()}
        return cls(root=module_dir, paths=paths, deps=deps, builtin=builtin)

    def provides(self, name: str) -> bool:
        return name in self.paths or name in self.builtin


def dependency_closure(built: Dict[str, List[str]], kernel: KernelModules, release: str) -> List[str]:
    """Kernel-module names (not built ones, not built-ins) that ``built`` needs,
    directly or through each other; ``built`` maps name -> modinfo depends."""
    need: List[str] = []
    seen: Set[str] = set(built)
    stack = [(name, d) for name, ds in built.items() for d in ds]
    while stack:
        parent, dep = stack.pop()
        dep = normalize(dep)
        if dep in seen:
            continue
        seen.add(dep)
        if dep in kernel.paths:
            need.append(dep)
            stack.extend((dep, d) for d in kernel.deps.get(dep, ()))
        elif dep in kernel.builtin:
            continue
        else:
            where = kernel.root / "modules.dep"
            raise BuildFailed(
                "stage",
                "%s depends on %s, which kernel %s has neither as a module (%s%s) nor built in"
                % (parent, dep, release, where, "" if where.is_file() else ": missing"),
            )
    return sorted(need)


@dataclass(frozen=True)
class StageResult:
    modules: Tuple[str, ...]  # relative paths of every staged module
    from_kernel: Tuple[str, ...]  # names taken from the kernel's own modules
    warnings: Tuple[str, ...] = ()


def stage_modules(
    built_infos: Mapping[Path, ModInfo],
    module_dir: Path,
    release: str,
    staging: Path,
    runner: Runner,
    symvers: Optional[Path] = None,
    log_file: Optional[IO[bytes]] = None,
    external_symvers: Sequence[Path] = (),
) -> StageResult:
    """Fill the empty directory ``staging`` with the hand-off tree; ``built_infos``
    maps each built module to its modinfo (read once by the builder).

    ``external_symvers``: the ``Module.symvers`` of modules another driver container loads (MOFED's
    ``ib_core`` for nvidia-peermem): what they export is known to depmod's check, and they are never
    taken from the kernel's own modules (the node runs MOFED's, not the inbox ones)."""
    kernel = KernelModules.read(module_dir)
    built = list(built_infos)
    infos = {module_name(p.name): i for p, i in built_infos.items()}
    external = symvers_modules(external_symvers)
    closure = dependency_closure(
        {n: [d for d in i.depends if normalize(d) not in external] for n, i in infos.items()}, kernel, release
    )
    companions = [c for c in COMPANIONS if c in kernel.paths and c not in closure]
    for c in list(companions):
        companions.extend(
            d
            for d in dependency_closure({c: list(kernel.deps.get(c, ()))}, kernel, release)
            if d not in closure and d not in companions
        )
    root = staging.parent / (staging.name + ".root")
    remove_tree(root)
    kdir = root / "lib" / "modules" / release
    try:
        (kdir / SUBDIR).mkdir(parents=True)
        staged: List[str] = []
        for p in built:
            rel = "%s/%s" % (SUBDIR, p.name)
            shutil.copyfile(str(p), str(kdir / rel))
            staged.append(rel)
        for name in sorted(set(closure) | set(companions)):
            rel = kernel.paths[name]
            (kdir / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(str(module_dir / rel), str(kdir / rel))
            staged.append(rel)
        for f in KERNEL_INDEX_FILES:
            if (module_dir / f).is_file():
                shutil.copyfile(str(module_dir / f), str(kdir / f))
            else:
                (kdir / f).write_text("")
        if external_symvers and symvers is not None and symvers.is_file():
            # depmod takes one symbol file and reads only vmlinux's lines from it: the external modules'
            # exports stand as the kernel's for its check (another container loads them first)
            merged = root / "Module.symvers"
            lines = [re.sub(r"^([^\t]*\t[^\t]*\t)[^\t]*", r"\1vmlinux", line) for line in _lines(external_symvers)]
            merged.write_text(symvers.read_text(errors="replace") + "".join(line + "\n" for line in lines))
            symvers = merged
        warnings = _depmod(runner, root, release, symvers, log_file)
        unknown = [w for w in warnings if _UNKNOWN_SYMBOL.search(w) and SUBDIR in w]
        if unknown:
            raise BuildFailed("stage", "depmod: " + "; ".join(_short(u, root) for u in unknown[:5]))
        wanted = list(COMPANIONS) + [module_name(p.name) for p in built]
        names = [n for n in wanted if n in infos or kernel.provides(n)]
        (kdir / INSMOD_LIST).write_text(_show_depends(runner, root, release, names))
        os.rmdir(str(staging))
        os.replace(str(kdir), str(staging))
    finally:
        remove_tree(root)
    return StageResult(
        modules=tuple(sorted(staged)),
        from_kernel=tuple(sorted(set(closure) | set(companions))),
        warnings=tuple(_short(w, root) for w in warnings),
    )


def _lines(files: Sequence[Path]) -> List[str]:
    return [line for f in files for line in read_input_text(f, "kernel tree file").splitlines() if line.strip()]


def symvers_modules(files: Sequence[Path]) -> Set[str]:
    """The module names (kernel spelling) that export the symbols of ``Module.symvers`` files."""
    out: Set[str] = set()
    for line in _lines(files):
        parts = line.split("\t")
        if len(parts) >= 3 and parts[2]:
            out.add(module_name(parts[2]))
    return out


def _short(line: str, root: Path) -> str:
    return line.replace(str(root), "")


def _depmod(
    runner: Runner, root: Path, release: str, symvers: Optional[Path], log_file: Optional[IO[bytes]]
) -> List[str]:
    argv = ["depmod", "-b", str(root)]
    if symvers is not None and symvers.is_file():
        argv += ["-e", "-E", str(symvers)]
    argv.append(release)
    try:
        res = runner.run(argv, timeout=300)
    except CommandFailed as exc:
        raise BuildFailed("stage", "depmod failed: %s" % exc.summary, exc.tail) from None
    lines = [l for l in (res.stdout + res.stderr).splitlines() if l.strip()]
    if log_file is not None:
        log_file.write(("".join(l + "\n" for l in lines)).encode())
    return lines


def _show_depends(runner: Runner, root: Path, release: str, names: Sequence[str]) -> str:
    """``modprobe --show-depends`` over the staged tree, paths rewritten to
    ``/lib/modules/<k>/...`` as the reference's file has them."""
    argv = ["modprobe", "-C", "/dev/null", "-d", str(root), "-S", release, "--show-depends", "-a"] + list(names)
    try:
        res = runner.run(argv, timeout=120)
    except CommandFailed as exc:
        raise BuildFailed("stage", "modprobe --show-depends failed: %s" % exc.summary, exc.tail) from None
    return res.stdout.replace(str(root) + "/lib/modules/", "/lib/modules/")
