"""The optional components the DTK side builds after the GPU driver: GDS's ``nvidia-fs`` and GDRCopy's
``gdrdrv``.

Their sidecars (``nvidia-fs-ctr``, ``nvidia-gdrcopy-ctr``) put the sources in the shared directory
(``gds-nvidia-fs/src``, ``gdrcopy``) and wait for ``nvidia_fs_built`` / ``gdrcopy_built``; the reference
builds them in place (``make -C <dir>``, ``make -C <dir> driver``) once NVIDIA's modules are built. Here:

- each builds in a scratch copy of its sources (read through :class:`Confined`: no link followed, only
  regular files), against the target kernel's tree, with this build's own NVIDIA ``Module.symvers``
  (nvidia-fs needs the ``nvidia_p2p_*`` symbol versions; its ``create_nv.symvers.sh`` would look for an
  installed nvidia.ko) and ``NVIDIA_SRC_DIR`` (``nv-p2p.h``) from this build's sources;
- the module is checked (vermagic against the kernel) and put where the in-place build would have left it,
  then the component's flag is written;
- sources missing or a build failing: the component's own failure flag (``nvidia_fs_build_failed``,
  ``gdrcopy_build_failed``, with the reason and the log's tail), so its sidecar can fail fast with the
  reason. The GPU driver is built and published before: it never waits for, nor fails with, a component.
- NVIDIA's sources are exposed at ``/usr/src/nvidia-<version>`` as the reference's ``_prepare`` leaves
  them, for the sidecars and for the components' own Makefiles.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Callable, List, Optional

from . import nvidia_modules as nv
from .errors import BuildFailed, CommandFailed, ProtocolError
from .fsio import remove_tree
from .kernel_tree import KernelTree
from .modinfo import read_modinfo, vermagic_problem
from .runner import Runner
from .shared_fs import Confined

SOURCE_LIMIT = 64 << 20  # one source file


@dataclass(frozen=True)
class Inputs:
    """What a component build takes from the GPU driver's build."""

    tree: KernelTree
    nvidia_symvers: Optional[Path]  # NVIDIA's Module.symvers of this build
    nvidia_src: Optional[Path]  # the flavour tree (kernel/ or kernel-open/) the modules came from
    scratch: Path
    jobs: int


@dataclass(frozen=True)
class Component:
    name: str  # as the reference names it: nvidia-fs, gdrcopy
    setting: str  # the variable that turns it on
    shared_src: str  # where its sidecar puts the sources, in the shared dir
    module: str  # the .ko the in-place build leaves, relative to shared_src
    make_args: Callable[[Inputs, Path], List[str]]  # the make command line in the scratch copy
    prepare: Callable[[Inputs, Path], None]  # adapt the scratch copy to the build here


def _nv_p2p_dir(inputs: Inputs) -> Path:
    if inputs.nvidia_src is not None:
        for rel in ("nvidia/nv-p2p.h", "nvidia-peermem/nv-p2p.h"):
            if (inputs.nvidia_src / rel).is_file():
                return (inputs.nvidia_src / rel).parent
    raise BuildFailed("prepare", "no nv-p2p.h in NVIDIA's sources of this build (%s)" % inputs.nvidia_src)


def _prepare_nvidia_fs(inputs: Inputs, work: Path) -> None:
    if inputs.nvidia_symvers is None or not inputs.nvidia_symvers.is_file():
        raise BuildFailed(
            "prepare", "nvidia-fs needs NVIDIA's Module.symvers of this build, which the builder kept not"
        )
    lines = [line for line in inputs.nvidia_symvers.read_text(errors="replace").splitlines() if "\tnvidia_p2p_" in line]
    if not lines:
        raise BuildFailed(
            "prepare", "NVIDIA's Module.symvers (%s) exports no nvidia_p2p_ symbol" % inputs.nvidia_symvers
        )
    (work / "nv.symvers").write_text("".join(line + "\n" for line in lines))
    script = work / "create_nv.symvers.sh"  # its job (nv.symvers from the nvidia module) is done above
    if script.is_file():
        script.write_text("#!/bin/sh\n# driver-ctr: nv.symvers comes from this build's Module.symvers\nexit 0\n")
    configure = work / "configure"  # looks for /lib/modules/$KVER/build of the image
    if configure.is_file():
        text = configure.read_text(errors="surrogateescape")
        configure.write_text(
            text.replace("export MODULES_DIR=/lib/modules/$KVER", "export MODULES_DIR=%s" % inputs.tree.module_dir),
            errors="surrogateescape",
        )


def _nvidia_fs_args(inputs: Inputs, work: Path) -> List[str]:
    # its Makefile appends nv.symvers to $(M)/Module.symvers, which today's modpost does not read: hand it
    # to modpost the supported way, for the versions that link nvidia_p2p_* (2.13 looks them up at run time)
    return [
        "KBUILD_EXTRA_SYMBOLS=%s" % (work / "nv.symvers"),
        "KVER=%s" % inputs.tree.release,
        "KDIR=%s" % inputs.tree.sysout,
        "NVIDIA_SRC_DIR=%s" % _nv_p2p_dir(inputs),
        "module",
    ]


def _gdrcopy_args(inputs: Inputs, work: Path) -> List[str]:
    return [
        "KVER=%s" % inputs.tree.release,
        "KDIR=%s" % inputs.tree.sysout,
        "NVIDIA_SRC_DIR=%s" % _nv_p2p_dir(inputs),
        "driver",
    ]


NVIDIA_FS = Component(
    nv.NVIDIA_FS, "GDS_ENABLED", "gds-nvidia-fs/src", nv.ko_file(nv.NVIDIA_FS), _nvidia_fs_args, _prepare_nvidia_fs
)
GDRCOPY = Component(
    "gdrcopy", "GDRCOPY_ENABLED", "gdrcopy", "src/gdrdrv/" + nv.ko_file(nv.GDRDRV), _gdrcopy_args, lambda i, w: None
)


def copy_out(fs: Confined, rel: str, dest: Path) -> int:
    """The regular files under ``rel`` of the shared dir into ``dest`` (modes kept for scripts)."""
    files = fs.walk_files(rel)
    for f in files:
        target = dest / f
        target.parent.mkdir(parents=True, exist_ok=True)
        with fs.open("%s/%s" % (rel, f), SOURCE_LIMIT) as src, open(str(target), "wb") as out:
            shutil.copyfileobj(src, out)
        st = fs.stat("%s/%s" % (rel, f))
        if st is not None and st.st_mode & 0o111:
            os.chmod(str(target), 0o755)
    return len(files)


def build_component(component: Component, fs: Confined, inputs: Inputs, runner: Runner, log_file: IO[bytes]) -> str:
    """Build ``component`` from its sources in the shared dir and put the module where the in-place build
    leaves it; returns that path (relative to the shared dir). :class:`BuildFailed` names what went wrong."""
    if fs.kind(component.shared_src) != "dir":
        raise BuildFailed(
            "sources",
            "no %s sources at %s/%s: its sidecar container puts them there (is it running?)"
            % (component.name, fs.root, component.shared_src),
        )
    work = inputs.scratch / ("%s-%d" % (component.name, os.getpid()))
    remove_tree(work)
    work.mkdir(parents=True)
    try:
        try:
            count = copy_out(fs, component.shared_src, work)
        except ProtocolError as exc:
            raise BuildFailed("sources", "%s sources: %s" % (component.name, exc)) from None
        component.prepare(inputs, work)
        argv = ["make", "-j%d" % inputs.jobs, "-C", str(work)] + component.make_args(inputs, work)
        log_file.write(
            ("driver-ctr: %s from %d source files: $ %s\n" % (component.name, count, " ".join(argv))).encode()
        )
        env = dict(os.environ, LC_ALL="C", LANG="C")
        try:
            runner.run(argv, env=env, stdout_file=log_file, timeout=1800)
        except CommandFailed as exc:
            raise BuildFailed("compile", "%s: %s" % (component.name, exc.summary)) from None
        built = work / component.module
        if not built.is_file():
            raise BuildFailed(
                "compile", "%s: make succeeded but did not produce %s" % (component.name, component.module)
            )
        problem = vermagic_problem(built.name, read_modinfo(built).vermagic, inputs.tree.release, None)
        if problem:
            raise BuildFailed("verify", "%s: %s" % (component.name, problem))
        rel = "%s/%s" % (component.shared_src, component.module)
        fs.copy_in(built, rel)
        return rel
    finally:
        remove_tree(work)
