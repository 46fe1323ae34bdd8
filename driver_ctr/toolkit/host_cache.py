"""Built module trees kept on the host, so a restart or a reboot into the same
kernel does not rebuild.

Layout under the cache directory (a hostPath, default
``/var/lib/driver-ctr/cache``; the cache is off when it is not a directory)::

    <kernel release>/<key>/entry.json   inputs, signing fingerprint, files (sha256, vermagic)
    <kernel release>/<key>/modules/     the staged tree, as handed over
    .tmp-*                              entries being written (removed on start)

``key`` digests the build inputs (kernel, driver version, module type, the
operator's config digest, features, arch) and the signing certificate's
fingerprint. An entry is published by renaming a complete temporary
directory, and verified on every use (sha256 and vermagic of every file, no
unlisted module): a corrupt entry is discarded with a warning, never used.
The newest ``keep`` kernels are kept; the current kernel is never pruned.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, List, Optional

from .errors import DriverCtrError, ProtocolError
from .fsio import atomic_write_json, read_json, remove_tree
from .log import Logger, get_logger
from .protocol import (
    MODULE_LIMIT,
    BuildInputs,
    BuildRecord,
    CacheRecord,
    FileRecord,
    adopt,
    describe_tree,
    now,
    verify_files,
)
from .shared_fs import Confined

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
    def __init__(self, directory: Path, keep: int = 3) -> None:
        self.dir = directory
        self.keep = keep
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
        return cls(d, settings.cache_keep)

    def entry_dir(self, kernel: str, key: str) -> Path:
        if "/" in kernel or kernel in ("", ".", ".."):
            raise ValueError("kernel release %r cannot name a cache directory" % kernel)
        return self.dir / kernel / key

    # -- read ------------------------------------------------------------------

    def contains(self, inputs: BuildInputs, signing_fingerprint: str) -> bool:
        """An entry exists (unverified: use :meth:`lookup` before using one)."""
        return (self.entry_dir(inputs.kernel_release, cache_key(inputs, signing_fingerprint)) / ENTRY_JSON).is_file()

    def lookup(self, inputs: BuildInputs, signing_fingerprint: str, verify: bool = True) -> Optional[CacheEntry]:
        """The entry for these inputs, or None; a corrupt one is discarded.

        ``verify=False`` checks only ``entry.json``: for a caller that copies
        the tree and verifies the copy (and calls :meth:`discard` when that
        fails), so each file is read once.
        """
        kernel = inputs.kernel_release
        key = cache_key(inputs, signing_fingerprint)
        path = self.entry_dir(kernel, key)
        if not path.is_dir():
            self.log.info("host cache miss", kernel=kernel, digest=key)
            return None
        try:
            record = CacheRecord.from_json(path / ENTRY_JSON, read_json(path / ENTRY_JSON, "host cache entry"))
            if record.key != key or record.inputs != inputs:
                raise ProtocolError(path / ENTRY_JSON, "not an entry for these inputs")
            if verify:
                verify_files(Confined(path), MODULES, record.build.files, kernel)
        except DriverCtrError as exc:
            self.discard(path, str(exc))
            return None
        _touch(path.parent)
        self.log.info("host cache hit", kernel=kernel, digest=key, files=len(record.build.files))
        return CacheEntry(path, record)

    def discard(self, path: Path, reason: str) -> None:
        self.log.warning("host cache entry is corrupt: discarded, never loaded", entry=str(path), reason=reason)
        self._discard(path)

    # -- write -----------------------------------------------------------------

    def store(self, inputs: BuildInputs, build: BuildRecord, modules: Path) -> CacheEntry:
        """Publish ``modules`` (a verified staged tree described by ``build``) for these inputs."""
        kernel = inputs.kernel_release
        fingerprint = build.signing_fingerprint
        key = cache_key(inputs, fingerprint)
        final = self.entry_dir(kernel, key)
        self.clean_temporaries()
        tmp = self.dir / (".tmp-%s-%d" % (key, os.getpid()))
        remove_tree(tmp)
        try:
            tmp.mkdir(parents=True)
            shutil.copytree(str(modules), str(tmp / MODULES))
            files = describe_tree(tmp / MODULES)
            if build.files and {f.path: f.sha256 for f in build.files} != {f.path: f.sha256 for f in files}:
                raise DriverCtrError("the tree copied into the host cache differs from the verified build")
            record = CacheRecord(
                key=key,
                inputs=inputs,
                signing_fingerprint=fingerprint,
                stored_at=now(),
                build=BuildRecord(
                    builder=build.builder,
                    files=files,
                    components=build.components,
                    dtk_kernels=build.dtk_kernels,
                    finished_at=build.finished_at,
                    details=build.details,
                ),
            )
            atomic_write_json(tmp / ENTRY_JSON, record.to_json())
            final.parent.mkdir(parents=True, exist_ok=True)
            old = self.dir / (".tmp-old-%s-%d" % (key, os.getpid()))
            if final.exists():
                os.replace(str(final), str(old))
            os.replace(str(tmp), str(final))
            remove_tree(old)
        finally:
            remove_tree(tmp)
        _touch(final.parent)
        self.log.info("stored in the host cache", kernel=kernel, digest=key, files=len(files))
        self.prune(kernel)
        return CacheEntry(final, record)

    def adopt(self, entry: CacheEntry, trees: Path, limit: int = MODULE_LIMIT) -> Optional[Path]:
        """Copy an entry's tree into ``trees`` (the driver side's own), verifying the
        copy; a corrupt entry is discarded and None returned."""
        try:
            return adopt(
                Confined(entry.path),
                MODULES,
                entry.record.build.files,
                entry.record.inputs.kernel_release,
                trees,
                limit,
            )
        except DriverCtrError as exc:
            self.discard(entry.path, str(exc))
            return None

    def prune(self, current_kernel: str) -> List[str]:
        """Keep ``keep`` kernels: the current one and the most recently used others."""
        kernels = [d for d in self.dir.iterdir() if d.is_dir() and not d.name.startswith(".")]
        kernels.sort(key=lambda d: d.stat().st_mtime, reverse=True)
        removed = []
        kept = 1  # the current kernel, always kept
        for d in kernels:
            if d.name == current_kernel:
                continue
            if kept < self.keep:
                kept += 1
                continue
            self._discard(d)
            removed.append(d.name)
        if removed:
            self.log.info("host cache pruned", removed=removed, keep=self.keep)
        return removed

    def clean_temporaries(self, older_than_s: float = 600.0) -> None:
        """Remove what a crashed writer left (old enough not to be another
        container's store in progress)."""
        t = time.time()
        for p in self.dir.glob(".tmp-*"):
            try:
                if t - p.stat().st_mtime > older_than_s:
                    remove_tree(p)
            except OSError:
                pass

    def _discard(self, path: Path) -> None:
        aside = self.dir / (".tmp-discard-%d-%d" % (os.getpid(), time.monotonic_ns()))
        try:
            os.replace(str(path), str(aside))
        except OSError:
            aside = path
        remove_tree(aside)


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


def _touch(path: Path) -> None:
    try:
        os.utime(str(path))
    except OSError:
        pass
