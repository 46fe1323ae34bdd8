"""Package contents are a trust boundary: a kernel's .debs and RPMs, unpacked under rules, installed narrowly.

A package is whatever a repository, a mirror or a node-local directory served, and the driver container's root
holds the DaemonSet's host mounts (``/run/nvidia``, ``/var/lib/driver-ctr``, ``/var/log``). So a package is

1. **unpacked into private scratch**, as its archive streams (``dpkg-deb --fsys-tarfile``, ``rpm2cpio``),
   member by member under these rules, each broken one refused by name before anything of it is written:
   only regular files, directories, symbolic and hard links; no device, FIFO or socket; no setuid or setgid
   bit; a plain relative name; a link whose target, read with the package's tree as ``/``, stays inside the
   paths a kernel's build tree needs (:data:`WANTED`); a hard link to a member already unpacked; at most
   :data:`BOUND` bytes in all (a 0.5 MiB .deb of compressed zeros unpacks no 512 MiB file). Every write opens
   its parents without following links (an archive's own link is never written through) and checks the
   cancellation between chunks;
2. **installed into the root** only where a kernel's build tree lives (:data:`WANTED`: the headers under
   ``usr/src``, ``lib/modules/<k>``, Debian's ``usr/lib/linux-kbuild-*``, the kernel's ``/boot`` files),
   never the DaemonSet's host mounts, file by file by renames through directory descriptors: nothing is
   ever written through an existing link, except the root's own merged-usr links (``lib -> usr/lib``),
   which are resolved by name.

An install is marked incomplete (:data:`INCOMPLETE`, in the kernel's module directory) before its first file
lands and unmarked only once complete, so a half-install is redone, never trusted (``kernel_tree``).
"""

from __future__ import annotations

import os
import posixpath
import re
import stat
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Dict, Iterator, List, Optional, Protocol, Tuple

from ..toolkit.errors import DriverCtrError, ProtocolError
from ..toolkit.fsio import atomic_write_text
from ..toolkit.inputs import describe_mode
from ..toolkit.kernel_tree import INCOMPLETE
from ..toolkit.log import Logger
from ..toolkit.paths import HostPaths
from ..toolkit.shared_fs import Confined
from ..toolkit.waiting import check_cancelled
from .base import FallbackFailed

BOUND = 2 << 30  # bytes a package may unpack to: a kernel's image or modules package is ~0.5 GiB
CHUNK = 1 << 20
_MERGED_USR = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")


class UnsafePackage(DriverCtrError):
    """A package holds what a kernel's packages never hold (a device, a setuid file, a link out of its
    tree, a name that climbs out, more than the size bound): nothing of it is installed."""

    def __init__(self, package: str, member: str, why: str) -> None:
        self.package = package
        self.member = member
        super().__init__("package %s: %s %s: refused" % (package, member, why))


def wanted(kernel: str) -> List[str]:
    """The paths (relative, ``/``-separated) a kernel's build tree lives at; nothing else is installed."""
    return [
        "usr/src/",
        "lib/modules/%s/" % kernel,
        "usr/lib/modules/%s/" % kernel,
        "usr/lib/linux-kbuild-",  # Debian's kbuild tools, linked from the headers
        "boot/vmlinuz-%s" % kernel,  # the compiler banner (fallback.kernel_compiler)
        "boot/config-%s" % kernel,
        "boot/System.map-%s" % kernel,
        "usr/include/",  # an RPM's libelf headers (elfutils-libelf-devel)
        "usr/lib64/libelf",
        "usr/lib64/pkgconfig/libelf",
    ]


def is_wanted(rel: str, prefixes: List[str]) -> bool:
    return any(rel == p.rstrip("/") or rel.startswith(p) for p in prefixes)


@dataclass(frozen=True)
class Member:
    """One entry of a package's archive, as the archive says it."""

    name: str  # relative, normalised
    kind: str  # file, dir, symlink, hardlink, or what is refused: a character device, a FIFO, ...
    mode: int
    size: int
    link: str  # a symlink's target, a hard link's member


class Readable(Protocol):
    def read(self, n: int = -1) -> bytes: ...


MemberData = Tuple[Member, Optional[Readable]]  # a member and its data stream (files only)


# -- reading archives -----------------------------------------------------------------------------------------


def tar_members(stream: IO[bytes]) -> Iterator[MemberData]:
    """``(Member, data stream or None)`` of a tar stream (a .deb's data, from ``dpkg-deb --fsys-tarfile``)."""
    with tarfile.open(fileobj=stream, mode="r|*") as tar:
        for info in tar:
            kind = (
                "file"
                if info.isreg()
                else "dir"
                if info.isdir()
                else "symlink"
                if info.issym()
                else "hardlink"
                if info.islnk()
                else "a character device"
                if info.ischr()
                else "a block device"
                if info.isblk()
                else "a FIFO"
                if info.isfifo()
                else "a special file"
            )
            yield (
                Member(info.name, kind, info.mode, info.size, info.linkname),
                (tar.extractfile(info) if kind == "file" else None),
            )


_CPIO_MAGIC = (b"070701", b"070702")


def cpio_members(stream: IO[bytes]) -> Iterator[MemberData]:
    """``(Member, data stream or None)`` of a newc cpio stream (an RPM's payload, from ``rpm2cpio``). The
    names of a hard-link set come as hard links to the one that carries the data (cpio puts it last)."""
    reader = _Reader(stream)
    pending: Dict[int, List[Member]] = {}  # inode -> the set's names seen before its data
    while True:
        header = reader.exact(110)
        if header[:6] not in _CPIO_MAGIC:
            raise ProtocolError("cpio", "not a newc cpio archive (header %r)" % header[:6])
        fields = [int(header[6 + 8 * i : 14 + 8 * i], 16) for i in range(13)]
        ino, mode, nlink, size, namesize = fields[0], fields[1], fields[4], fields[6], fields[11]
        name = reader.exact(namesize)[:-1].decode("utf-8", "surrogateescape")
        reader.align(4)
        if name == "TRAILER!!!":
            break
        link = ""
        if stat.S_ISLNK(mode):
            link = reader.exact(size).decode("utf-8", "surrogateescape")
            reader.align(4)
            size = 0
        kind = {
            stat.S_IFREG: "file",
            stat.S_IFDIR: "dir",
            stat.S_IFLNK: "symlink",
            stat.S_IFCHR: "a character device",
            stat.S_IFBLK: "a block device",
            stat.S_IFIFO: "a FIFO",
            stat.S_IFSOCK: "a socket",
        }.get(stat.S_IFMT(mode), "a special file")
        member = Member(name, kind, mode, size, link)
        if kind == "file" and nlink > 1 and size == 0:
            pending.setdefault(ino, []).append(member)
            continue
        data = _Limited(reader, size) if kind == "file" else None
        yield member, data
        if data is not None:
            data.drain()
            reader.align(4)
        for other in pending.pop(ino, []) if kind == "file" else []:
            yield Member(other.name, "hardlink", other.mode, 0, name), None
    for members in pending.values():  # a set whose names are all empty files
        for m in members:
            yield m, _Limited(reader, 0)


class _Reader:
    def __init__(self, stream: IO[bytes]) -> None:
        self.stream = stream
        self.offset = 0

    def read(self, n: int) -> bytes:
        data = self.stream.read(n)
        self.offset += len(data)
        return data

    def exact(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            more = self.read(n - len(data))
            if not more:
                raise ProtocolError("cpio", "the archive ends inside a member")
            data += more
        return data

    def align(self, n: int) -> None:
        pad = -self.offset % n
        if pad:
            self.exact(pad)


class _Limited:
    def __init__(self, reader: _Reader, size: int) -> None:
        self.reader = reader
        self.left = size

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        data = self.reader.exact(n) if n else b""
        self.left -= len(data)
        return data

    def drain(self) -> None:
        while self.left:
            self.read(CHUNK)


# -- unpacking into scratch -----------------------------------------------------------------------------------


def _plain(name: str) -> Optional[str]:
    """The archive's name as a plain relative path (``./usr/x`` -> ``usr/x``; '' for the top); None when it
    climbs out or is absolute after its ``./``."""
    if "\x00" in name:
        return None
    norm = posixpath.normpath(name.lstrip("/") if name.startswith("./") else name)
    if norm in (".", ""):
        return ""
    if name.startswith("/") or norm.startswith("../") or norm == ".." or norm.startswith("/"):
        return None
    return norm


def _link_target(rel: str, target: str) -> str:
    """A symlink's target resolved with the package's tree as ``/`` (lexically); '' when it climbs out."""
    joined = target if target.startswith("/") else posixpath.join("/", posixpath.dirname(rel), target)
    parts: List[str] = []
    for part in joined.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not parts:
                return ""
            parts.pop()
        else:
            parts.append(part)
    return "/".join(parts)


def unpack(
    package: str, members: Iterator[MemberData], scratch: Confined, prefixes: List[str], bound: int = BOUND
) -> int:
    """Unpack an archive's members into ``scratch`` under the rules of the module docstring; the bytes
    written. Members outside ``prefixes`` are checked like the others but not written."""
    total = 0
    for member, data in members:
        check_cancelled()
        rel = _plain(member.name)
        if rel is None:
            raise UnsafePackage(package, repr(member.name), "is a name that climbs out of the package's tree")
        if rel == "":
            continue
        if member.kind not in ("file", "dir", "symlink", "hardlink"):
            raise UnsafePackage(package, rel, "is %s" % member.kind)
        if member.kind != "dir" and member.mode & (stat.S_ISUID | stat.S_ISGID):
            raise UnsafePackage(package, rel, "has the %s bit" % ("setuid" if member.mode & stat.S_ISUID else "setgid"))
        if member.kind == "symlink":
            target = _link_target(rel, member.link)
            if not target:
                raise UnsafePackage(package, rel, "is a link out of the package's tree (-> %s)" % member.link)
            if is_wanted(rel, prefixes) and not is_wanted(target, prefixes):
                raise UnsafePackage(package, rel, "is a link out of the kernel's build tree (-> %s)" % member.link)
        total += member.size if member.kind == "file" else 0
        if total > bound:
            raise UnsafePackage(package, rel, "takes the package over the bound of %d bytes" % bound)
        if not is_wanted(rel, prefixes) and not any(p.startswith(rel + "/") for p in prefixes):
            continue
        _write(package, scratch, rel, member, data)
    return total


def _write(package: str, scratch: Confined, rel: str, member: Member, data: Optional[Readable]) -> None:
    try:
        if member.kind == "dir":
            scratch.make_dirs(rel)
        elif member.kind == "symlink":
            scratch.symlink(rel, member.link)
        elif member.kind == "hardlink":
            source = _plain(member.link)
            if not source or scratch.kind(source) != "file":
                raise UnsafePackage(package, rel, "is a hard link to %r, not a file unpacked before" % member.link)
            scratch.link(source, rel)
        else:
            assert data is not None
            with scratch.create(rel, member.mode & 0o755) as out:
                while True:
                    chunk = data.read(CHUNK)
                    if not chunk:
                        break
                    check_cancelled()
                    out.write(chunk)
    except FileExistsError:
        raise UnsafePackage(package, rel, "appears twice in the archive") from None
    except ProtocolError as exc:  # a parent that is the archive's own link: never written through
        raise UnsafePackage(package, rel, "would be written through a link (%s)" % exc.message) from None


# -- installing into the root ---------------------------------------------------------------------------------


def merged_usr(root: Path) -> Dict[str, str]:
    """The root's own top-level links into ``usr`` (``lib -> usr/lib``): the only links an install goes
    through, resolved here by name."""
    out = {}
    for name in _MERGED_USR:
        try:
            target = os.readlink(str(root / name))
        except OSError:
            continue
        norm = posixpath.normpath(target.lstrip("/"))
        if re.fullmatch(r"usr/[A-Za-z0-9]+", norm):
            out[name] = norm
    return out


def mark_incomplete(root: Path, kernel: str, packages: List[str]) -> None:
    """Before the first file of ``kernel``'s packages lands in ``root``: the install is incomplete until
    :func:`mark_complete` (``kernel_tree`` refuses a tree so marked, and the fallback installs it again)."""
    marker = HostPaths(root=str(root)).module_dir(kernel) / INCOMPLETE
    marker.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(marker, "installing %s\n" % " ".join(packages))


def mark_complete(root: Path, kernel: str, nothing_written: bool = False) -> None:
    """The install is complete; or, with ``nothing_written``, it failed before writing anything (the
    marker and the directories made for it go again)."""
    module_dir = HostPaths(root=str(root)).module_dir(kernel)
    try:
        (module_dir / INCOMPLETE).unlink()
    except FileNotFoundError:
        pass
    if nothing_written:
        try:
            module_dir.rmdir()
        except OSError:
            pass


def mirror_merged_usr(like: Path, root: Path) -> None:
    """Give the new root ``root`` the merged-usr links of ``like`` (a Debian 13 image's ``lib -> usr/lib``):
    a preflight's scratch root then lays out a kernel's trees where the image would."""
    root.mkdir(parents=True, exist_ok=True)
    for name, target in merged_usr(like).items():
        if not os.path.lexists(str(root / name)):
            (root / target).mkdir(parents=True, exist_ok=True)
            os.symlink(target, str(root / name))


def install(scratch: Confined, root: Confined, prefixes: List[str]) -> List[str]:
    """Move every file and link of ``scratch`` under ``prefixes`` into ``root`` (renames within one
    filesystem: scratch lives in the root), never through an existing link; the paths installed."""
    usr = merged_usr(root.root)
    installed = []
    scratch_rel = str(scratch.root.relative_to(root.root))
    for rel in scratch.walk_entries(""):
        if not is_wanted(rel, prefixes):
            continue
        first, _, rest = rel.partition("/")
        dest = "%s/%s" % (usr[first], rest) if first in usr and rest else rel
        root.replace("%s/%s" % (scratch_rel, rel), dest)
        installed.append(dest)
    return installed


def private_scratch(root: Path) -> Path:
    """A new directory only root may enter, inside the root's ``var/tmp`` (the same filesystem as the trees
    it is installed into: moved by rename, never copied twice)."""
    base = Confined(root)
    base.make_dirs("var/tmp")
    return Path(tempfile.mkdtemp(prefix="driver-ctr-unpack-", dir=str(root / "var/tmp")))


def local_archives(repo: Optional[Path], suffix: str, log: Logger) -> List[Path]:
    """The archives (``.deb``, ``.rpm``) of the node-local repository: none when it is not set or not there;
    a repository that is something else than a directory is a named error; an entry of that suffix that is
    not a regular file (a FIFO would stall the reader) is skipped with a warning naming it."""
    if repo is None or not os.path.lexists(str(repo)):
        return []
    st = os.stat(str(repo)) if os.path.exists(str(repo)) else os.lstat(str(repo))
    if not stat.S_ISDIR(st.st_mode):
        raise FallbackFailed(
            "the node-local repository DRIVER_CTR_LOCAL_REPO=%s is %s, not a directory"
            % (repo, describe_mode(st.st_mode))
        )
    out = []
    for entry in sorted(repo.iterdir()):
        if not entry.name.endswith(suffix):
            continue
        try:
            mode = os.stat(str(entry)).st_mode
        except OSError as exc:
            log.warning("node-local repository entry skipped", entry=str(entry), reason=exc.strerror)
            continue
        if not stat.S_ISREG(mode):
            log.warning("node-local repository entry skipped", entry=str(entry), reason="is %s" % describe_mode(mode))
            continue
        out.append(entry)
    return out
