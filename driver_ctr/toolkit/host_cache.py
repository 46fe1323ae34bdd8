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
from typing import Any, Dict, List, Mapping, Optional

from .errors import DriverCtrError
from .fsio import atomic_write_json, read_json, remove_tree
from .log import get_logger
from .protocol import describe_tree, verify_files

ENTRY_JSON = "entry.json"
MODULES = "modules"
FORMAT = 1


def cache_key(inputs: Mapping[str, Any], signing_fingerprint: str) -> str:
    blob = json.dumps({"inputs": dict(inputs), "signing": signing_fingerprint}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


@dataclass(frozen=True)
class CacheEntry:
    path: Path
    data: Dict[str, Any]

    @property
    def modules(self) -> Path:
        return self.path / MODULES

    @property
    def files(self) -> List[Dict[str, Any]]:
        return self.data["files"]


class HostCache:
    def __init__(self, directory: Path, keep: int = 3) -> None:
        self.dir = directory
        self.keep = keep
        self.log = get_logger(cache=str(directory))

    @classmethod
    def from_settings(cls, settings: Any) -> Optional["HostCache"]:
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

    def contains(self, inputs: Mapping[str, Any], signing_fingerprint: str) -> bool:
        """An entry exists (unverified: use :meth:`lookup` before using one)."""
        return (self.entry_dir(inputs["kernel_release"], cache_key(inputs, signing_fingerprint)) / ENTRY_JSON).is_file()

    def lookup(self, inputs: Mapping[str, Any], signing_fingerprint: str, verify: bool = True) -> Optional[CacheEntry]:
        """The entry for these inputs, or None; a corrupt one is discarded.

        ``verify=False`` checks only ``entry.json``: for a caller that copies
        the tree and verifies the copy (and calls :meth:`discard` when that
        fails), so each file is read once.
        """
        kernel = inputs["kernel_release"]
        key = cache_key(inputs, signing_fingerprint)
        path = self.entry_dir(kernel, key)
        if not path.is_dir():
            self.log.info("host cache miss", kernel=kernel, digest=key)
            return None
        try:
            data = read_json(path / ENTRY_JSON, "host cache entry")
            if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("key") != key \
                    or data.get("inputs") != dict(inputs) or not isinstance(data.get("files"), list):
                raise DriverCtrError("%s: not an entry for these inputs" % (path / ENTRY_JSON))
            if verify:
                verify_files(path / MODULES, data["files"], kernel)
        except DriverCtrError as exc:
            self.discard(CacheEntry(path, {}), str(exc))
            return None
        _touch(path.parent)
        self.log.info("host cache hit", kernel=kernel, digest=key, files=len(data["files"]))
        return CacheEntry(path, data)

    def discard(self, entry: CacheEntry, reason: str) -> None:
        self.log.warning("host cache entry is corrupt: discarded, never loaded", entry=str(entry.path), reason=reason)
        self._discard(entry.path)

    # -- write -----------------------------------------------------------------

    def store(self, inputs: Mapping[str, Any], signing_fingerprint: str, modules: Path,
              build: Mapping[str, Any]) -> Path:
        """Publish ``modules`` (a verified staged tree) for these inputs."""
        kernel = inputs["kernel_release"]
        key = cache_key(inputs, signing_fingerprint)
        final = self.entry_dir(kernel, key)
        self.clean_temporaries()
        tmp = self.dir / (".tmp-%s-%d" % (key, os.getpid()))
        remove_tree(tmp)
        try:
            tmp.mkdir(parents=True)
            shutil.copytree(str(modules), str(tmp / MODULES))
            files = describe_tree(tmp / MODULES)
            want = {f["path"]: f["sha256"] for f in build.get("files", [])}
            if want and want != {f["path"]: f["sha256"] for f in files}:
                raise DriverCtrError("the tree copied into the host cache differs from the verified build")
            atomic_write_json(tmp / ENTRY_JSON, {
                "format": FORMAT, "key": key, "inputs": dict(inputs), "signing_fingerprint": signing_fingerprint,
                "stored_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "details": dict(build.get("details") or {}), "files": files,
            })
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
        return final

    def restore(self, entry: CacheEntry, dest: Path) -> None:
        """Copy an entry's tree to ``dest`` (which must not exist)."""
        shutil.copytree(str(entry.modules), str(dest))

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
        now = time.time()
        for p in self.dir.glob(".tmp-*"):
            try:
                if now - p.stat().st_mtime > older_than_s:
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


def _touch(path: Path) -> None:
    try:
        os.utime(str(path))
    except OSError:
        pass
