"""Built module trees kept on the host, so a restart or a reboot into the same
kernel does not rebuild.

Layout under the cache directory (a hostPath, default
``/var/lib/driver-ctr/cache``; the cache is off when it is not a directory)::

    <kernel release>/<key>/entry.json   inputs, signing fingerprint, files (sha256, vermagic)
    <kernel release>/<key>/modules/     the staged tree, as handed over
    .tmp-*                              entries being written, each flocked by its writer

``key`` digests the build inputs (kernel, driver version, module type, the
operator's config digest, features, arch) and the signing certificate's
fingerprint. An entry is published by renaming a complete temporary
directory, and verified on every use (sha256 and vermagic of every file, no
unlisted module): a corrupt entry is discarded with a warning, never used.
The newest ``keep`` kernels are kept; the current kernel is never pruned.

The store is a hostPath that the DTK container mounts too: every read, publish,
discard and sweep goes through the store directory's descriptors
(:class:`~.shared_fs.Confined`), so a link planted anywhere in it is never
followed (a link where a kernel's directory belongs is replaced, never written
through). A writer holds a flock on its temporary directory for as long as it
writes; a temporary that nobody holds is a dead writer's, swept whatever its age
(a lock, unlike a pid, is seen across the two containers' pid namespaces). Two
writers of the same entry converge: the second finds the first's and keeps it.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import stat
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, List, Optional

from .errors import DriverCtrError, ProtocolError
from .log import Logger, get_logger
from .records import BuildInputs, BuildRecord, CacheRecord, FileRecord, now
from .settings import DEFAULT_MODULE_SIZE_LIMIT
from .shared_fs import RECORD_LIMIT, Confined
from .trees import adopt, describe_tree, verify_files

if TYPE_CHECKING:
    from .settings import Settings

ENTRY_JSON = "entry.json"
MODULES = "modules"
HOST_CACHE_BUILDER = "host-cache"  # the builder name of a build restored from the cache


def cache_key(inputs: BuildInputs, signing_fingerprint: str) -> str:
    blob = json.dumps({"inputs": inputs.to_json(), "signing": signing_fingerprint}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


@dataclass(frozen=True)
class CacheEntry:
    path: Path
    record: CacheRecord

    @property
    def modules(self) -> Path:
        return self.path / MODULES

    @property
    def files(self) -> List[FileRecord]:
        return list(self.record.build.files)


class HostCache:
    def __init__(self, directory: Path, keep: int = 3, limit: int = DEFAULT_MODULE_SIZE_LIMIT) -> None:
        self.dir = directory
        # the store is where its configured path leads (a hostPath, a test's link to a kept directory);
        # inside it, nothing is ever followed
        self.fs = Confined(Path(os.path.realpath(str(directory))))
        self.keep = keep
        self.limit = limit  # the largest file an entry may hold (DRIVER_CTR_MODULE_SIZE_LIMIT)
        self.log = get_logger(cache=str(directory))

    @classmethod
    def from_settings(cls, settings: "Settings") -> Optional["HostCache"]:
        """The cache when its directory is mounted, else None."""
        if not settings.cache_dir:
            return None
        d = settings.paths.host(settings.cache_dir)
        if not d.is_dir():
            get_logger().info("host cache off: the directory is not mounted", cache=str(d))
            return None
        return cls(d, settings.cache_keep, settings.module_size_limit)

    def entry_rel(self, kernel: str, key: str) -> str:
        """``<kernel>/<key>``, the entry's path inside the store."""
        if "/" in kernel or kernel in ("", ".", "..") or kernel.startswith(".") or "\x00" in kernel:
            raise ValueError("kernel release %r cannot name a cache directory" % kernel)
        return "%s/%s" % (kernel, key)

    def entry_dir(self, kernel: str, key: str) -> Path:
        return self.dir / self.entry_rel(kernel, key)

    def kernels(self) -> List[str]:
        """The kernels the store holds entries for (real directories only: a link is never followed)."""
        out = []
        for name in self.fs.listdir():
            st = self.fs.stat(name)
            if not name.startswith(".") and st is not None and stat.S_ISDIR(st.st_mode):
                out.append(name)
        return out

    # -- read ------------------------------------------------------------------

    def contains(self, inputs: BuildInputs, signing_fingerprint: str) -> bool:
        """An entry exists (unverified: use :meth:`lookup` before using one)."""
        rel = self.entry_rel(inputs.kernel_release, cache_key(inputs, signing_fingerprint))
        try:
            return self.fs.is_file("%s/%s" % (rel, ENTRY_JSON))
        except ProtocolError:
            return False  # a link or a special file: not an entry (lookup discards it)

    def lookup(self, inputs: BuildInputs, signing_fingerprint: str, verify: bool = True) -> Optional[CacheEntry]:
        """The entry for these inputs, or None; a corrupt one is discarded.

        ``verify=False`` checks only ``entry.json``: for a caller that copies
        the tree and verifies the copy (and calls :meth:`discard` when that
        fails), so each file is read once.
        """
        kernel = inputs.kernel_release
        key = cache_key(inputs, signing_fingerprint)
        rel = self.entry_rel(kernel, key)
        try:
            if self.fs.kind(rel) is None:
                self.log.info("host cache miss", kernel=kernel, digest=key)
                return None
            raw = self.fs.read_bytes("%s/%s" % (rel, ENTRY_JSON), RECORD_LIMIT)
            record = CacheRecord.from_json(self.dir / rel / ENTRY_JSON, _json(self.dir / rel / ENTRY_JSON, raw))
            if record.key != key or record.inputs != inputs:
                raise ProtocolError(self.dir / rel / ENTRY_JSON, "not an entry for these inputs")
            if verify:
                verify_files(self.fs, "%s/%s" % (rel, MODULES), record.build.files, kernel, self.limit)
        except DriverCtrError as exc:
            self._discard_bad(kernel, rel, str(exc))
            return None
        self._touch(kernel)
        self.log.info("host cache hit", kernel=kernel, digest=key, files=len(record.build.files))
        return CacheEntry(self.dir / rel, record)

    def discard(self, path: Path, reason: str) -> None:
        """Discard the entry at ``path`` (one of this store's ``<kernel>/<key>``)."""
        rel = str(path.relative_to(self.dir))
        self._discard_bad(rel.split("/", 1)[0], rel, reason)

    def _discard_bad(self, kernel: str, rel: str, reason: str) -> None:
        self.log.warning(
            "host cache entry is corrupt: discarded, never loaded", entry=str(self.dir / rel), reason=reason
        )
        try:
            if self.fs.kind(kernel) != "dir":
                raise ProtocolError(self.dir / kernel, "not a directory")
            self._discard(rel)
        except ProtocolError:  # a link or a file where the kernel's directory belongs: removed as itself
            self.fs.remove(kernel)

    # -- write -----------------------------------------------------------------

    def store(self, inputs: BuildInputs, build: BuildRecord, modules: Path) -> CacheEntry:
        """Publish ``modules`` (a verified staged tree described by ``build``) for these inputs. When another
        writer published the same entry meanwhile, theirs is kept (the same inputs: the same modules)."""
        kernel = inputs.kernel_release
        fingerprint = build.signing_fingerprint
        key = cache_key(inputs, fingerprint)
        rel = self.entry_rel(kernel, key)
        self.clean_temporaries()
        with self._temporary(key) as tmp:
            shutil.copytree(str(modules), str(self.fs.root / tmp / MODULES))
            files = describe_tree(self.fs.root / tmp / MODULES, self.limit)
            if build.files and {f.path: f.sha256 for f in build.files} != {f.path: f.sha256 for f in files}:
                raise DriverCtrError("the tree copied into the host cache differs from the verified build")
            record = CacheRecord(
                key=key,
                inputs=inputs,
                signing_fingerprint=fingerprint,
                stored_at=now(),
                build=replace(build, files=files),
            )
            self.fs.write_atomic("%s/%s" % (tmp, ENTRY_JSON), (json.dumps(record.to_json(), indent=2) + "\n").encode())
            self.fs.ensure_dir(kernel)  # a link planted there is replaced by a real directory, never followed
            if self.fs.kind(rel) is not None:
                self._discard(rel)
            try:
                self.fs.replace(tmp, rel)
            except OSError as exc:
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
                self.log.info("another writer stored the same entry meanwhile: theirs kept", kernel=kernel, digest=key)
        self._touch(kernel)
        self.log.info("stored in the host cache", kernel=kernel, digest=key, files=len(files))
        self.prune(kernel)
        return CacheEntry(self.dir / rel, record)

    def adopt(self, entry: CacheEntry, trees: Path) -> Optional[Path]:
        """Copy an entry's tree into ``trees`` (the driver side's own), verifying the
        copy; a corrupt entry is discarded and None returned."""
        rel = str(entry.path.relative_to(self.dir))
        try:
            return adopt(
                self.fs,
                "%s/%s" % (rel, MODULES),
                entry.record.build.files,
                entry.record.inputs.kernel_release,
                trees,
                self.limit,
            )
        except DriverCtrError as exc:
            self.discard(entry.path, str(exc))
            return None

    def prune(self, current_kernel: str) -> List[str]:
        """Keep ``keep`` kernels: the current one and the most recently used others."""
        kernels = []
        for name in self.kernels():
            st = self.fs.stat(name)
            if st is not None:
                kernels.append((st.st_mtime, name))
        removed = []
        kept = 1  # the current kernel, always kept
        for _, name in sorted(kernels, reverse=True):
            if name == current_kernel:
                continue
            if kept < self.keep:
                kept += 1
                continue
            self._discard(name)
            removed.append(name)
        if removed:
            self.log.info("host cache pruned", removed=removed, keep=self.keep)
        return removed

    def clean_temporaries(self) -> List[str]:
        """Remove what dead writers left: every temporary whose writer's flock is gone, whatever its age
        (a live writer, here or in the other container, still holds its own)."""
        removed = []
        for name in self.fs.listdir():
            if not name.startswith(".tmp-"):
                continue
            st = self.fs.stat(name)
            if st is not None and not stat.S_ISDIR(st.st_mode):  # a stray file or link: nobody's, removed as itself
                self.fs.remove(name)
                removed.append(name)
                continue
            fd = self._lock_temporary(name, block=False)
            if fd is None:
                continue  # a writer at work
            try:
                self.fs.remove(name)
                removed.append(name)
            finally:
                os.close(fd)
        if removed:
            self.log.info("dead writers' temporaries swept", removed=removed)
        return removed

    # -- descriptors -------------------------------------------------------------

    @contextmanager
    def _temporary(self, key: str) -> Iterator[str]:
        """A new temporary directory of this store, flocked for as long as it is written; gone afterwards
        (published by a rename, or removed)."""
        name = ".tmp-%s-%d-%s" % (key, os.getpid(), uuid.uuid4().hex[:8])
        self.fs.ensure_dir(name)
        fd = self._lock_temporary(name, block=True)
        try:
            yield name
        finally:
            try:
                self.fs.remove(name)
            finally:
                if fd is not None:
                    os.close(fd)

    def _lock_temporary(self, name: str, block: bool) -> Optional[int]:
        """A flock on temporary directory ``name`` (never through a link): its descriptor; None when another
        holds it, or when it is gone or not a directory."""
        try:
            with self.fs.dir_fd() as dfd:
                fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
        except OSError as exc:
            if exc.errno in (errno.ENOTDIR, errno.ELOOP, errno.ENOENT):
                return None
            raise
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if block else fcntl.LOCK_NB))
        except OSError:
            os.close(fd)
            return None
        return fd

    def _discard(self, rel: str) -> None:
        """Move ``rel`` aside under a flocked temporary name, then remove it, never through a link."""
        aside = ".tmp-discard-%d-%s" % (os.getpid(), uuid.uuid4().hex[:8])
        try:
            self.fs.replace(rel, aside)
        except OSError:
            aside = rel
        fd = self._lock_temporary(aside, block=False) if aside != rel else None
        try:
            self.fs.remove(aside)
        finally:
            if fd is not None:
                os.close(fd)

    def _touch(self, kernel: str) -> None:
        try:
            with self.fs.dir_fd() as dfd:
                os.utime(kernel, dir_fd=dfd, follow_symlinks=False)
        except OSError:
            pass


def store_build(
    cache: Optional[HostCache], inputs: BuildInputs, build: BuildRecord, tree: Path, log: Logger
) -> Optional[CacheEntry]:
    """The one host-cache store policy, for every side that builds: store a
    verified build when the cache is mounted, unless it came from the cache or
    an entry already exists; a failure to store is a warning (the build itself
    is fine) and returns None."""
    if cache is None or build.builder == HOST_CACHE_BUILDER:
        return None
    try:
        if cache.contains(inputs, build.signing_fingerprint):
            return None
        return cache.store(inputs, build, tree)
    except (OSError, DriverCtrError) as exc:
        log.warning("could not store the build in the host cache (the build itself is fine)", reason=str(exc))
        return None


def _json(path: Path, raw: bytes) -> object:
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError(path, "host cache entry is not valid JSON: %s" % exc) from None
