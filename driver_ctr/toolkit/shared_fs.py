"""Every path operation inside the shared directory, confined to it; and inside every other tree that must
not be left through a link (the host cache and the precompiled store, a package's scratch, the node's build
log directory).

The shared directory is written by another container (an operator-chosen,
sometimes broken Driver Toolkit image) and read by a privileged one: it is a
trust boundary. Here every path is walked one component at a time with
``O_NOFOLLOW`` directory descriptors (``openat``), so no symlink is ever
followed, at any level; only regular files and directories are accepted, and
anything else is a :class:`ProtocolError` naming the path and what was found.
Files are opened non-blocking (a FIFO never hangs a read) and read with a
size bound. Renames and removals happen relative to descriptors of
directories inside the tree, so they never touch anything outside it.

Temporary files carry the writer's tag (``.NAME.<tag>.tmp``): each side
sweeps its own at start (:meth:`Confined.sweep_temporaries`).
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import stat
import uuid
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Callable, Iterator, List, Optional, Tuple

from .errors import ProtocolError
from .inputs import LIMITS, describe_mode

RECORD_LIMIT = LIMITS["record"]  # flags, the manifest, settings.json
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def rel_ok(rel: str) -> bool:
    """A plain relative path: no leading /, no empty, . or .. segment, no NUL."""
    return (
        bool(rel)
        and "\x00" not in rel
        and not rel.startswith("/")
        and all(part not in ("", ".", "..") for part in rel.split("/"))
    )


def _parts(rel: str) -> Tuple[str, ...]:
    if not rel_ok(rel):
        raise ProtocolError(rel, "unsafe path %r: expected a plain relative path" % rel)
    return PurePosixPath(rel).parts


def _remove_tree_at(dfd: int, name: str) -> None:
    """Remove directory ``name`` of ``dfd`` and everything below it, through
    descriptors only: a symlink inside is removed as a link, never followed.
    (``shutil.rmtree(dir_fd=)`` does this from Python 3.11; the DTK side runs 3.9.)"""
    fd = os.open(name, _DIR_FLAGS, dir_fd=dfd)
    try:
        for entry in os.listdir(fd):
            st = os.stat(entry, dir_fd=fd, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                _remove_tree_at(fd, entry)
            else:
                os.unlink(entry, dir_fd=fd)
    finally:
        os.close(fd)
    os.rmdir(name, dir_fd=dfd)


class Confined:
    """A directory tree operated on without ever following a symlink."""

    def __init__(self, root: Path, tag: str = "") -> None:
        self.root = root
        self.tag = tag or "p%d" % os.getpid()  # names this writer's temporary files

    # -- descriptors ------------------------------------------------------------

    def _open_root(self) -> int:
        try:
            return os.open(str(self.root), _DIR_FLAGS)
        except OSError as exc:
            raise self._error(self.root, exc, "the tree's root") from None

    def _error(self, path: Path, exc: OSError, what: str = "") -> ProtocolError:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            try:
                found = describe_mode(os.lstat(str(path)).st_mode)
            except OSError:
                found = "not a directory"
            return ProtocolError(
                path, "%sis %s where a directory is expected (never followed)" % (what + " " if what else "", found)
            )
        return ProtocolError(path, "%s%s" % (what + ": " if what else "", exc.strerror or exc))

    @contextmanager
    def _parent(self, rel: str, create: bool = False) -> Iterator[Tuple[int, str]]:
        """A descriptor of ``rel``'s parent directory (each component opened
        without following symlinks) and ``rel``'s last component."""
        parts = _parts(rel)
        fd = self._open_root()
        path = self.root
        try:
            for part in parts[:-1]:
                path = path / part
                try:
                    nfd = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise
                    os.mkdir(part, 0o755, dir_fd=fd)
                    nfd = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except OSError as exc:
                    raise self._error(path, exc) from None
                os.close(fd)
                fd = nfd
            yield fd, parts[-1]
        finally:
            os.close(fd)

    def _lstat(self, dfd: int, name: str) -> Optional[os.stat_result]:
        try:
            return os.stat(name, dir_fd=dfd, follow_symlinks=False)
        except FileNotFoundError:
            return None

    @contextmanager
    def dir_fd(self) -> Iterator[int]:
        """A descriptor of the tree's root (never through a link), for an ``*at`` call of the caller's."""
        fd = self._open_root()
        try:
            yield fd
        finally:
            os.close(fd)

    # -- questions --------------------------------------------------------------

    def kind(self, rel: str) -> Optional[str]:
        """``"file"``, ``"dir"`` or None (absent); anything else is a ProtocolError."""
        try:
            with self._parent(rel) as (dfd, name):
                st = self._lstat(dfd, name)
        except FileNotFoundError:
            return None
        if st is None:
            return None
        if stat.S_ISREG(st.st_mode):
            return "file"
        if stat.S_ISDIR(st.st_mode):
            return "dir"
        raise ProtocolError(
            self.root / rel, "is %s where a regular file or directory is expected" % describe_mode(st.st_mode)
        )

    def stat(self, rel: str) -> Optional[os.stat_result]:
        """``lstat`` of ``rel`` (None when absent), reached without following symlinks."""
        try:
            with self._parent(rel) as (dfd, name):
                return self._lstat(dfd, name)
        except FileNotFoundError:
            return None

    def is_file(self, rel: str) -> bool:
        """A regular file is there; absent is False; a directory, symlink or special file is an error."""
        k = self.kind(rel)
        if k == "dir":
            raise ProtocolError(self.root / rel, "is a directory where a regular file is expected")
        return k == "file"

    # -- reading ----------------------------------------------------------------

    @contextmanager
    def open(self, rel: str, limit: Optional[int] = None) -> Iterator[BinaryIO]:
        """A regular file of at most ``limit`` bytes, opened for reading
        (non-blocking, never through a symlink)."""
        where = self.root / rel
        try:
            with self._parent(rel) as (dfd, name):
                fd = os.open(name, _FILE_FLAGS, dir_fd=dfd)
        except FileNotFoundError:
            raise ProtocolError(where, "is missing") from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise ProtocolError(where, "is a symlink where a regular file is expected (never followed)") from None
            raise ProtocolError(where, exc.strerror or str(exc)) from None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise ProtocolError(where, "is %s where a regular file is expected" % describe_mode(st.st_mode))
        if limit is not None and st.st_size > limit:
            os.close(fd)
            raise ProtocolError(where, "is %d bytes, over the bound of %d" % (st.st_size, limit))
        with os.fdopen(fd, "rb") as f:
            yield f

    def read_bytes(self, rel: str, limit: int = RECORD_LIMIT) -> bytes:
        with self.open(rel, limit) as f:
            data = f.read(limit + 1)
        if len(data) > limit:
            raise ProtocolError(self.root / rel, "grew over the bound of %d bytes while read" % limit)
        return data

    def walk_files(self, rel: str) -> List[str]:
        """Every regular file below directory ``rel`` (paths relative to it),
        sorted; a symlink or special file anywhere is a ProtocolError."""
        out: List[str] = []
        with self._parent(rel) as (dfd, name):
            try:
                top = os.open(name, _DIR_FLAGS, dir_fd=dfd)
            except FileNotFoundError:
                return out
            except OSError as exc:
                raise self._error(self.root / rel, exc) from None
        try:
            self._walk(top, self.root / rel, "", out)
        finally:
            os.close(top)
        return sorted(out)

    def _walk(self, fd: int, path: Path, prefix: str, out: List[str], links: bool = False) -> None:
        for name in sorted(os.listdir(fd)):
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            if stat.S_ISREG(st.st_mode) or (links and stat.S_ISLNK(st.st_mode)):
                out.append(prefix + name)
            elif stat.S_ISDIR(st.st_mode):
                sub = os.open(name, _DIR_FLAGS, dir_fd=fd)
                try:
                    self._walk(sub, path / name, prefix + name + "/", out, links)
                finally:
                    os.close(sub)
            else:
                raise ProtocolError(
                    path / name, "is %s: only regular files and directories are accepted" % describe_mode(st.st_mode)
                )

    # -- writing ----------------------------------------------------------------

    def write_atomic(self, rel: str, data: bytes, mode: int = 0o644) -> None:
        """Temp file (tagged with this writer), fsync, rename over ``rel``, fsync the directory."""
        self._publish(rel, lambda out: out.write(data), mode)

    def copy_in(self, src: Path, rel: str, mode: int = 0o644) -> None:
        """Copy the file ``src`` (from outside the tree) to ``rel``, streamed, atomically."""

        def write(out: BinaryIO) -> None:
            with open(str(src), "rb") as f:
                shutil.copyfileobj(f, out, 1 << 20)

        self._publish(rel, write, mode)

    def _publish(self, rel: str, write: Callable[[BinaryIO], object], mode: int) -> None:
        with self._parent(rel, create=True) as (dfd, name):
            st = self._lstat(dfd, name)
            if st is not None and stat.S_ISDIR(st.st_mode):
                raise ProtocolError(self.root / rel, "is a directory where a file is expected")
            tmp = ".%s.%s-%s.tmp" % (name, self.tag, uuid.uuid4().hex[:8])
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode, dir_fd=dfd)
            try:
                with os.fdopen(fd, "wb") as out:
                    write(out)
                    out.flush()
                    os.fsync(out.fileno())
                os.chmod(tmp, mode, dir_fd=dfd)
                os.replace(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
            except BaseException as exc:
                try:
                    os.unlink(tmp, dir_fd=dfd)
                except FileNotFoundError:
                    pass
                if isinstance(exc, OSError) and exc.filename is None:  # a write's error names no file: this one
                    raise OSError(exc.errno, exc.strerror, str(self.root / rel)) from exc
                raise
            os.fsync(dfd)

    def make_dirs(self, rel: str) -> None:
        """``rel`` and its parents as real directories; an existing link or file on the way is an error,
        never followed nor removed."""
        with self._parent(rel, create=True) as (dfd, name):
            st = self._lstat(dfd, name)
            if st is None:
                os.mkdir(name, 0o755, dir_fd=dfd)
            elif not stat.S_ISDIR(st.st_mode):
                raise ProtocolError(self.root / rel, "is %s where a directory is expected" % describe_mode(st.st_mode))

    @contextmanager
    def create(self, rel: str, mode: int = 0o644) -> Iterator[BinaryIO]:
        """A new regular file ``rel`` (parents made real directories) open for writing; an existing entry of
        that name is :class:`FileExistsError`, a link on the way a :class:`ProtocolError`."""
        with self._parent(rel, create=True) as (dfd, name):
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | _CLOEXEC, mode, dir_fd=dfd)
            os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as out:
            yield out

    def symlink(self, rel: str, target: str) -> None:
        """A new symbolic link ``rel`` -> ``target`` (the target is never opened)."""
        with self._parent(rel, create=True) as (dfd, name):
            os.symlink(target, name, dir_fd=dfd)

    def link(self, src: str, dst: str) -> None:
        """A new hard link ``dst`` to the regular file ``src``, both inside the tree."""
        with self._parent(src) as (sfd, sname), self._parent(dst, create=True) as (dfd, dname):
            os.link(sname, dname, src_dir_fd=sfd, dst_dir_fd=dfd, follow_symlinks=False)

    def walk_entries(self, rel: str) -> List[str]:
        """Every regular file and symbolic link below directory ``rel`` (relative to it), sorted; links are
        listed, never followed; a special file is a ProtocolError."""
        out: List[str] = []
        if rel:
            with self._parent(rel) as (dfd, name):
                try:
                    top = os.open(name, _DIR_FLAGS, dir_fd=dfd)
                except OSError as exc:
                    raise self._error(self.root / rel, exc) from None
        else:
            top = self._open_root()
        try:
            self._walk(top, self.root / rel, "", out, links=True)
        finally:
            os.close(top)
        return sorted(out)

    def ensure_dir(self, rel: str) -> None:
        """``rel`` is a real directory afterwards: anything else there (a file, a
        symlink: never followed) is removed first."""
        with self._parent(rel, create=True) as (dfd, name):
            st = self._lstat(dfd, name)
            if st is not None and stat.S_ISDIR(st.st_mode):
                return
            if st is not None:
                os.unlink(name, dir_fd=dfd)
            os.mkdir(name, 0o755, dir_fd=dfd)

    def replace(self, src: str, dst: str) -> None:
        """Rename ``src`` to ``dst`` (parents created as real directories); a
        symlink is moved as the link itself, never through it."""
        with self._parent(src) as (sfd, sname), self._parent(dst, create=True) as (dfd, dname):
            os.replace(sname, dname, src_dir_fd=sfd, dst_dir_fd=dfd)

    def remove(self, rel: str) -> None:
        """Remove a file, a symlink (the link) or a whole tree; absent is fine."""
        try:
            with self._parent(rel) as (dfd, name):
                st = self._lstat(dfd, name)
                if st is None:
                    return
                if stat.S_ISDIR(st.st_mode):
                    _remove_tree_at(dfd, name)
                else:
                    os.unlink(name, dir_fd=dfd)
        except FileNotFoundError:
            return

    def listdir(self, rel: str = "") -> List[str]:
        """Names in directory ``rel`` ("" for the root); absent is empty."""
        if not rel:
            fd = self._open_root()
        else:
            with self._parent(rel) as (dfd, name):
                try:
                    fd = os.open(name, _DIR_FLAGS, dir_fd=dfd)
                except FileNotFoundError:
                    return []
                except OSError as exc:
                    raise self._error(self.root / rel, exc) from None
        try:
            return sorted(os.listdir(fd))
        finally:
            os.close(fd)

    def try_lock(self, rel: str) -> Optional[int]:
        """An exclusive flock on file ``rel`` (created, never through a symlink): its
        descriptor, held for the life of the process; None when another holds it."""
        with self._parent(rel, create=True) as (dfd, name):
            try:
                fd = os.open(
                    name, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o644, dir_fd=dfd
                )
            except OSError as exc:
                raise ProtocolError(self.root / rel, "cannot open the lock file: %s" % exc.strerror) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return None
        return fd

    def sweep_temporaries(self, prefix: str) -> List[str]:
        """Remove the temporary files of writers whose tag starts with ``prefix``
        (this side's earlier incarnations), in the root and one level below."""
        removed = []
        subdirs = []
        for n in self.listdir():
            st = self.stat(n)
            if st is not None and stat.S_ISDIR(st.st_mode):  # a symlink here is left to whoever reads it
                subdirs.append(n)
        for d in [""] + subdirs:
            for n in self.listdir(d):
                if n.startswith(".") and n.endswith(".tmp") and (".%s" % prefix) in n:
                    rel = "%s/%s" % (d, n) if d else n
                    self.remove(rel)
                    removed.append(rel)
        return removed
