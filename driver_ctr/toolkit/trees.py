"""Module trees as files: described (sha256, and modinfo for modules), verified
against a listing, adopted (copied out of another's reach, the copy verified).

A tree is the content of ``/lib/modules/<kernel>`` for one kernel. Every read
is bounded by the module size limit (``DRIVER_CTR_MODULE_SIZE_LIMIT``, passed
in: :data:`~driver_ctr.toolkit.settings.DEFAULT_MODULE_SIZE_LIMIT` by default)
and goes through :class:`Confined` (no symlink followed).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import BinaryIO, List, Optional, Sequence, Tuple

from .errors import ProtocolError
from .fsio import remove_tree
from .modinfo import read_modinfo, vermagic_problem
from .nvidia_modules import is_module
from .records import FileRecord
from .shared_fs import Confined
from .waiting import check_cancelled


def _record(rel: str, digest: str, size: int, path: Path) -> FileRecord:
    """The record of a file already hashed; modinfo read from ``path`` (a copy we own, or the staging tree)."""
    if not is_module(rel):
        return FileRecord(path=rel, sha256=digest, size=size)
    info = read_modinfo(path)
    return FileRecord(
        path=rel,
        sha256=digest,
        size=size,
        name=info.name,
        version=info.version,
        vermagic=info.vermagic,
        signed=info.signed,
    )


def _copy_hashing(src: BinaryIO, dest: Optional[Path]) -> Tuple[str, int]:
    """sha256 and size of ``src``, streamed (and written to ``dest`` when given)."""
    h = hashlib.sha256()
    size = 0
    out = open(str(dest), "wb") if dest is not None else None
    try:
        for chunk in iter(lambda: src.read(1 << 20), b""):
            check_cancelled()  # a 1 GiB bundle is copied in seconds: a SIGTERM is not kept waiting
            h.update(chunk)
            size += len(chunk)
            if out is not None:
                out.write(chunk)
    finally:
        if out is not None:
            out.close()
    return h.hexdigest(), size


def describe_tree(root: Path, limit: int) -> Tuple[FileRecord, ...]:
    """Every file under ``root`` with sha256, and vermagic/name/version for
    modules; symlinks and special files are refused."""
    fs = Confined(root.parent)
    out: List[FileRecord] = []
    for rel in fs.walk_files(root.name):
        with fs.open("%s/%s" % (root.name, rel), limit) as f:
            digest, size = _copy_hashing(f, None)
        out.append(_record(rel, digest, size, root / rel))
    return tuple(out)


class VerificationError(ProtocolError):
    """A built manifest or staged tree does not match what the driver side needs."""


def _check_listing(root: Path, present: Sequence[str], files: Sequence[FileRecord]) -> None:
    listed = {f.path for f in files}
    unlisted = [p for p in present if p not in listed]
    if unlisted:
        raise VerificationError(
            root / unlisted[0],
            "not listed in the manifest (%d unlisted file(s): every file of the tree must be)" % len(unlisted),
        )
    missing = sorted(listed - set(present))
    if missing:
        raise VerificationError(root / missing[0], "listed in the manifest but missing")


def _check_file(where: Path, f: FileRecord, digest: str, record: FileRecord, target_kernel: str) -> None:
    if digest != f.sha256:
        raise VerificationError(where, "sha256 differs from the manifest (corrupt or replaced)")
    if record.is_module:
        problem = vermagic_problem(where, record.vermagic, target_kernel)
        if problem:
            raise VerificationError(where, problem)


def verify_files(fs: Confined, rel: str, files: Sequence[FileRecord], target_kernel: str, limit: int) -> None:
    """Every file of directory ``rel`` of ``fs`` listed, with its sha256, every
    module built for ``target_kernel``, nothing unlisted; in place."""
    root = fs.root / rel
    if fs.kind(rel) != "dir":
        raise VerificationError(root, "is missing or not a directory")
    _check_listing(root, fs.walk_files(rel), files)
    for f in files:
        with fs.open("%s/%s" % (rel, f.path), limit) as src:
            digest, size = _copy_hashing(src, None)
        _check_file(root / f.path, f, digest, _record(f.path, digest, size, root / f.path), target_kernel)


def adopt_tree(fs: Confined, rel: str, files: Sequence[FileRecord], target_kernel: str, dest: Path, limit: int) -> None:
    """Copy directory ``rel`` of ``fs`` to ``dest`` (a new directory the caller
    owns, outside anyone else's reach), verifying the copy: what is checked is
    exactly what will be loaded. ``dest`` is complete or absent."""
    root = fs.root / rel
    if fs.kind(rel) != "dir":
        raise VerificationError(root, "is missing or not a directory")
    _check_listing(root, fs.walk_files(rel), files)
    tmp = dest.parent / (".%s.partial-%d" % (dest.name, os.getpid()))
    remove_tree(tmp)
    try:
        for f in files:
            out = tmp / f.path
            out.parent.mkdir(parents=True, exist_ok=True)
            with fs.open("%s/%s" % (rel, f.path), limit) as src:
                digest, size = _copy_hashing(src, out)
            _check_file(root / f.path, f, digest, _record(f.path, digest, size, out), target_kernel)
        remove_tree(dest)
        os.replace(str(tmp), str(dest))
    finally:
        remove_tree(tmp)


def tree_name(kernel: str, files: Sequence[FileRecord]) -> str:
    """The name of an adopted tree: the kernel and a digest of its listing."""
    h = hashlib.sha256()
    for f in sorted(files, key=lambda f: f.path):
        h.update(("%s\0%s\n" % (f.path, f.sha256)).encode())
    return "%s-%s" % (kernel, h.hexdigest()[:12])


def adopt(fs: Confined, rel: str, files: Sequence[FileRecord], target_kernel: str, trees: Path, limit: int) -> Path:
    """:func:`adopt_tree` into ``trees/<tree_name>``; the two newest adopted
    trees are kept (the one loaded and its predecessor). Returns the tree."""
    dest = trees / tree_name(target_kernel, files)
    trees.mkdir(parents=True, exist_ok=True)
    adopt_tree(fs, rel, files, target_kernel, dest, limit)
    olds = sorted(
        (d for d in trees.iterdir() if d.is_dir() and d != dest and not d.name.startswith(".")),
        key=lambda d: d.stat().st_mtime,
        reverse=True,
    )
    for old in olds[1:]:
        remove_tree(old)
    return dest
