"""Where the NVIDIA kernel sources come from, and which flavour is built.

Sources: ``DRIVER_CTR_SOURCE_DIR`` (an extracted tree holding ``kernel/``
and/or ``kernel-open/``), else ``NVIDIA-Linux-<arch>-<version>.run`` from the
shared dir's ``drivers/`` or ``/drivers``, extracted with ``sh FILE -x`` into
a scratch directory. Extraction goes to a temporary directory renamed into
place with a completion marker, so a crash mid-extraction leaves nothing that
a restart would trust.

Flavour (``KERNEL_MODULE_TYPE``): ``open`` -> ``kernel-open/``,
``proprietary`` -> ``kernel/``; ``auto`` asks the installer
(``--print-recommended-kernel-module-type``) and, without one or when it
fails, takes the branch rule of the reference: >= 560 open, else proprietary.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

from .errors import BuildFailed, CommandFailed
from .fsio import atomic_write_text, remove_tree, replace_symlink
from .paths import HostPaths
from .runner import Runner

SUBDIRS = {"proprietary": "kernel", "open": "kernel-open"}
OPEN_DEFAULT_BRANCH = 560
EXTRACTED_MARKER = ".driver-ctr-extracted"


@dataclass(frozen=True)
class DriverSources:
    root: Path  # holds kernel/ and/or kernel-open/
    origin: str  # what the tree came from, for logs and the manifest
    installer: Optional[Path] = None

    def flavours(self) -> Tuple[str, ...]:
        return tuple(f for f, sub in sorted(SUBDIRS.items()) if (self.root / sub / "Makefile").is_file())


def run_file_name(arch: str, version: str) -> str:
    return "NVIDIA-Linux-%s-%s.run" % (arch, version)


def open_sources(source: Path, scratch: Path, runner: Runner) -> DriverSources:
    """The driver tree at ``source``: a directory holding ``kernel/`` and/or
    ``kernel-open/`` as it is, a ``.run`` extracted into ``scratch``."""
    if source.is_dir():
        src = DriverSources(root=source, origin="DRIVER_CTR_SOURCE_DIR=%s" % source)
        if not src.flavours():
            raise BuildFailed(
                "sources",
                "DRIVER_CTR_SOURCE_DIR=%s: expected a directory holding kernel/ and/or "
                "kernel-open/ (each with NVIDIA's Makefile), as an extracted .run does" % source,
            )
        return src
    if source.is_file():
        return extract_run(source, scratch, runner)
    raise BuildFailed("sources", "the NVIDIA driver sources %s do not exist" % source)


def expose(paths: HostPaths, version: str, sources: DriverSources) -> Optional[Path]:
    """``/usr/src/nvidia-<version>``: NVIDIA's sources where the reference's ``_prepare`` leaves them (the GDS
    and GDRCopy sidecars build against ``/run/nvidia/driver/usr/src/nvidia-<version>``, the driver root). A
    relative link, so that it resolves inside the driver root too; the image's own directory is kept.
    Returns the link, or None when the image's own directory is there."""
    link = paths.host("/usr/src/nvidia-%s" % version)
    if link.exists() and not link.is_symlink():
        return None  # the image's own
    replace_symlink(link, Path(os.path.relpath(str(sources.root), str(link.parent))))
    return link


def _fingerprint(run: Path) -> str:
    st = run.stat()
    return json.dumps({"name": run.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns}, sort_keys=True)


def extract_run(run: Path, scratch: Path, runner: Runner) -> DriverSources:
    """``sh run -x`` into ``scratch/<name>``; reused while the .run is unchanged."""
    scratch.mkdir(parents=True, exist_ok=True)
    final = scratch / run.name[: -len(".run")]
    marker = final / EXTRACTED_MARKER
    if marker.is_file() and marker.read_text() == _fingerprint(run):
        return _extracted(final, run)
    for leftover in scratch.glob(".extract-*"):
        remove_tree(leftover)  # an earlier crash mid-extraction
    tmp = scratch / (".extract-%d" % os.getpid())
    try:
        runner.run(["sh", str(run), "-x", "--target", str(tmp)], timeout=600)
    except CommandFailed as exc:
        remove_tree(tmp)
        raise BuildFailed("sources", "extracting %s failed: %s" % (run, exc.summary), exc.tail) from None
    atomic_write_text(tmp / EXTRACTED_MARKER, _fingerprint(run))
    remove_tree(final)
    os.replace(str(tmp), str(final))
    return _extracted(final, run)


def _extracted(root: Path, run: Path) -> DriverSources:
    installer = root / "nvidia-installer"
    src = DriverSources(root=root, origin=str(run), installer=installer if installer.is_file() else None)
    if not src.flavours():
        raise BuildFailed("sources", "%s holds neither kernel/ nor kernel-open/ after extraction" % run)
    return src


@dataclass(frozen=True)
class Flavour:
    name: str  # "open" or "proprietary"
    reason: str

    @property
    def subdir(self) -> str:
        return SUBDIRS[self.name]


def resolve_flavour(requested: str, branch: int, sources: DriverSources, runner: Runner) -> Flavour:
    if requested in SUBDIRS:
        flavour = Flavour(requested, "KERNEL_MODULE_TYPE=%s" % requested)
    else:
        flavour = _auto(branch, sources, runner)
    if flavour.name not in sources.flavours():
        raise BuildFailed(
            "sources",
            "%s asks for the %s modules but %s has no %s/ (it has: %s)"
            % (
                flavour.reason,
                flavour.name,
                sources.root,
                flavour.subdir,
                ", ".join(SUBDIRS[f] + "/" for f in sources.flavours()) or "neither",
            ),
        )
    return flavour


def _auto(branch: int, sources: DriverSources, runner: Runner) -> Flavour:
    if sources.installer is not None:
        try:
            out = runner.run([str(sources.installer), "--print-recommended-kernel-module-type"], timeout=120)
            word = out.stdout.strip()
            return Flavour(
                "open" if word == "open" else "proprietary",
                "KERNEL_MODULE_TYPE=auto: nvidia-installer recommends %r" % word,
            )
        except CommandFailed:
            pass
        why = "nvidia-installer could not tell the recommended type"
    else:
        why = "no nvidia-installer in the sources"
    if branch >= OPEN_DEFAULT_BRANCH:
        return Flavour("open", "KERNEL_MODULE_TYPE=auto: %s; branch %d >= %d" % (why, branch, OPEN_DEFAULT_BRANCH))
    return Flavour("proprietary", "KERNEL_MODULE_TYPE=auto: %s; branch %d < %d" % (why, branch, OPEN_DEFAULT_BRANCH))
