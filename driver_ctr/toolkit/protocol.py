"""The shared-directory protocol: the only place either side learns a file name.

Layout of ``/mnt/shared-nvidia-driver-toolkit`` (reference-compatible flags
first, driver-ctr's own files after):

- ``dir_prepared``          driver -> DTK: payload complete (written last)
- ``driver_build_started``  DTK -> driver: the build began
- ``driver_toolkit_broken`` DTK -> driver: this DTK cannot build for the node (JSON reason)
- ``driver_build_failed``   DTK -> driver: the build failed (JSON reason)
- ``driver_built``          DTK -> driver: ``modules/`` and the manifest are complete
- ``nvidia_fs_built``, ``gdrcopy_built``: side modules, when those features are on
- ``settings.json``         driver -> DTK: the allow-listed settings
- ``manifest.json``         inputs and generation (driver); plus the built files (DTK)
- ``modules/``              the staged module tree, paths relative to /lib/modules/<kver>
- ``ocp_dtk_entrypoint``, ``driver-ctr-toolkit.pyz``: the DTK-side program
- ``build.log``             the DTK build's output
- ``stale/``                earlier generations, moved aside, never trusted

Every flag carries a small JSON body (generation, time, reason); the
reference only tests for existence, which still works.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Dict, List, Mapping, Optional

from .errors import ProtocolError
from .fsio import (
    atomic_write_json,
    read_json,
    read_json_optional,
    regular_file_exists,
    remove_tree,
)
from .modinfo import read_modinfo, vermagic_problem

PROTOCOL_VERSION = 1

DIR_PREPARED = "dir_prepared"
BUILD_STARTED = "driver_build_started"
TOOLKIT_BROKEN = "driver_toolkit_broken"
BUILD_FAILED = "driver_build_failed"
BUILT = "driver_built"
NVIDIA_FS_BUILT = "nvidia_fs_built"
GDRCOPY_BUILT = "gdrcopy_built"
FLAGS = (DIR_PREPARED, BUILD_STARTED, TOOLKIT_BROKEN, BUILD_FAILED, BUILT, NVIDIA_FS_BUILT, GDRCOPY_BUILT)  # status shows these
# Flags of one generation's outcome: moved aside when a new generation starts.
OUTCOME_FLAGS = (BUILD_STARTED, TOOLKIT_BROKEN, BUILD_FAILED, BUILT, NVIDIA_FS_BUILT, GDRCOPY_BUILT)

SETTINGS_JSON = "settings.json"
MANIFEST_JSON = "manifest.json"
MODULES_DIR = "modules"
STAGING_PREFIX = ".modules.staging-"
LAUNCHER = "ocp_dtk_entrypoint"
ZIPAPP = "driver-ctr-toolkit.pyz"
BUILD_LOG = "build.log"
STALE_DIR = "stale"

KO_SUFFIXES = (".ko", ".ko.xz", ".ko.zst", ".ko.gz")

# The inputs a build depends on: equal inputs mean a build can be reused.
INPUT_KEYS = (
    "kernel_release",
    "driver_version",
    "kernel_module_type",
    "driver_config_digest",
    "gpu_direct_rdma_enabled",
    "gds_enabled",
    "gdrcopy_enabled",
    "target_arch",
)


def build_inputs(settings: Any, kernel_release: str) -> Dict[str, Any]:
    """The inputs of a build for ``settings`` on ``kernel_release``."""
    return {
        "kernel_release": kernel_release,
        "driver_version": settings.driver_version.raw,
        "kernel_module_type": settings.kernel_module_type,
        "driver_config_digest": settings.driver_config_digest,
        "gpu_direct_rdma_enabled": settings.gpu_direct_rdma_enabled,
        "gds_enabled": settings.gds_enabled,
        "gdrcopy_enabled": settings.gdrcopy_enabled,
        "target_arch": settings.target_arch,
    }


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def safe_relative_path(base: Path, rel: str) -> Path:
    """``base/rel`` after checking ``rel`` stays inside ``base``: no absolute
    path, no ``..``, no symlink anywhere on the way."""
    if not _rel_ok(rel):
        raise ProtocolError(base, "unsafe staged path %r" % rel)
    p = PurePosixPath(rel)
    cur = base
    for part in p.parts:
        cur = cur / part
        if cur.is_symlink():
            raise ProtocolError(cur, "staged path contains a symlink")
    return cur


@dataclass(frozen=True)
class SharedDir:
    path: Path

    def flag(self, name: str) -> Path:
        return self.path / name

    def has(self, name: str) -> bool:
        """Whether a flag is present; a flag that is a directory or a symlink
        is a ProtocolError naming it."""
        return regular_file_exists(self.flag(name))

    def read_flag(self, name: str) -> Dict[str, Any]:
        """The JSON body of a flag; an empty body (a reference-style ``touch``)
        reads as ``{}``."""
        p = self.flag(name)
        if not regular_file_exists(p):
            raise ProtocolError(p, "flag is missing")
        text = p.read_text(encoding="utf-8", errors="replace").strip()
        if not text:
            return {}
        try:
            data = json.loads(text)
        except ValueError:
            return {"message": text}
        return data if isinstance(data, dict) else {"message": str(data)}

    def write_flag(self, name: str, **body: Any) -> None:
        body.setdefault("time", now())
        atomic_write_json(self.flag(name), body)

    def remove_flag(self, name: str) -> None:
        p = self.flag(name)
        if p.is_dir() and not p.is_symlink():
            raise ProtocolError(p, "is a directory where a flag file is expected")
        try:
            p.unlink()
        except FileNotFoundError:
            pass

    # -- settings.json ---------------------------------------------------

    def write_settings(self, shared_settings: Mapping[str, str]) -> None:
        atomic_write_json(self.path / SETTINGS_JSON, {"protocol": PROTOCOL_VERSION, "env": dict(shared_settings)})

    def read_settings(self) -> Dict[str, str]:
        p = self.path / SETTINGS_JSON
        data = read_json(p, "settings.json")
        if not isinstance(data, dict) or not isinstance(data.get("env"), dict):
            raise ProtocolError(p, 'expected an object {"protocol": 1, "env": {NAME: value, ...}}')
        if data.get("protocol") != PROTOCOL_VERSION:
            raise ProtocolError(p, "protocol version %r, expected %d" % (data.get("protocol"), PROTOCOL_VERSION))
        env = data["env"]
        bad = [k for k, v in env.items() if not isinstance(k, str) or not isinstance(v, str)]
        if bad:
            raise ProtocolError(p, "every env value must be a string (bad: %s)" % ", ".join(map(str, bad)))
        return dict(env)

    # -- manifest.json ---------------------------------------------------

    def read_manifest(self) -> Optional[Dict[str, Any]]:
        p = self.path / MANIFEST_JSON
        data = read_json_optional(p, "manifest.json")
        if data is None:
            return None
        validate_manifest(p, data)
        return data

    def write_manifest(self, manifest: Mapping[str, Any]) -> None:
        validate_manifest(self.path / MANIFEST_JSON, manifest)
        atomic_write_json(self.path / MANIFEST_JSON, dict(manifest))

    # -- generations ---------------------------------------------------------

    def move_aside(self, generation: int) -> Optional[Path]:
        """Move the outcome of an earlier generation (flags, modules, manifest)
        into ``stale/gen-N`` so nothing trusts it any more. Returns the dir."""
        names = [n for n in OUTCOME_FLAGS + (MODULES_DIR, MANIFEST_JSON, BUILD_LOG)
                 if (self.path / n).exists() or (self.path / n).is_symlink()]
        if not names:
            return None
        dest = self.path / STALE_DIR / ("gen-%d-%d" % (generation, int(time.time() * 1000)))
        dest.mkdir(parents=True, exist_ok=True)
        # driver_built goes first: from that instant nobody trusts the rest.
        names.sort(key=lambda n: 0 if n == BUILT else 1)
        for n in names:
            os.replace(str(self.path / n), str(dest / n))
        # keep only the last few stale generations
        olds = sorted((self.path / STALE_DIR).iterdir(), key=lambda p: p.stat().st_mtime)
        for old in olds[:-3]:
            remove_tree(old)
        return dest

    def clean_staging(self) -> None:
        for p in self.path.glob(STAGING_PREFIX + "*"):
            remove_tree(p)


def validate_manifest(path: Path, data: Any) -> None:
    """Structural check of a manifest; a ProtocolError names the field."""
    if not isinstance(data, dict):
        raise ProtocolError(path, "manifest must be a JSON object")
    if data.get("protocol") != PROTOCOL_VERSION:
        raise ProtocolError(path, "manifest protocol %r, expected %d" % (data.get("protocol"), PROTOCOL_VERSION))
    gen = data.get("generation")
    if not isinstance(gen, int) or isinstance(gen, bool) or gen < 1:
        raise ProtocolError(path, "manifest generation must be a whole number >= 1, got %r" % (gen,))
    inputs = data.get("inputs")
    if not isinstance(inputs, dict) or set(inputs) != set(INPUT_KEYS):
        raise ProtocolError(path, "manifest inputs must have exactly the keys %s" % ", ".join(INPUT_KEYS))
    build = data.get("build")
    if build is None:
        return
    if not isinstance(build, dict) or not isinstance(build.get("files"), list):
        raise ProtocolError(path, "manifest build must be an object with a list of files")
    for i, f in enumerate(build["files"]):
        if not isinstance(f, dict) or not isinstance(f.get("path"), str) or not isinstance(f.get("sha256"), str):
            raise ProtocolError(path, "manifest build.files[%d] needs a path and a sha256" % i)
        if len(f["sha256"]) != 64:
            raise ProtocolError(path, "manifest build.files[%d].sha256 is not a sha256 digest" % i)
        _check_rel(path, f["path"])


def _rel_ok(rel: str) -> bool:
    """A plain relative path: no leading /, no empty, . or .. segment, no NUL."""
    return bool(rel) and "\x00" not in rel and not rel.startswith("/") and all(
        part not in ("", ".", "..") for part in rel.split("/"))


def _check_rel(manifest_path: Path, rel: str) -> None:
    if not _rel_ok(rel):
        raise ProtocolError(manifest_path, "unsafe staged path %r in the manifest" % rel)


def is_module(rel: str) -> bool:
    return rel.endswith(KO_SUFFIXES)


def _hash_and_info(path: Path, rel: str) -> Any:
    """sha256 of a staged file and, for a module, its modinfo, from one read."""
    raw = path.read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    return digest, (read_modinfo(path, raw) if is_module(rel) else None)


def describe_tree(root: Path) -> List[Dict[str, Any]]:
    """Every file under ``root`` with sha256, and vermagic/name/version for
    modules; symlinks and special files are refused."""
    out: List[Dict[str, Any]] = []
    for dirpath, dirnames, filenames in os.walk(str(root)):
        dirnames.sort()
        for d in dirnames:
            if os.path.islink(os.path.join(dirpath, d)):
                raise ProtocolError(Path(dirpath) / d, "staged tree contains a symlink")
        for name in sorted(filenames):
            full = Path(dirpath) / name
            if full.is_symlink() or not full.is_file():
                raise ProtocolError(full, "staged tree holds a symlink or special file")
            rel = full.relative_to(root).as_posix()
            digest, info = _hash_and_info(full, rel)
            entry: Dict[str, Any] = {"path": rel, "sha256": digest, "size": full.stat().st_size}
            if info is not None:
                entry.update(name=info.name, version=info.version, vermagic=info.vermagic, signed=info.signed)
            out.append(entry)
    return out


class VerificationError(ProtocolError):
    """A built manifest or staged tree does not match what the driver side needs."""


def verify_build(shared: SharedDir, inputs: Mapping[str, Any], generation: int) -> Dict[str, Any]:
    """Check a finished build before anything uses it: same generation and
    inputs, every listed file present with its sha256, every module's vermagic
    naming the node kernel, no unlisted module. Returns the manifest."""
    mpath = shared.path / MANIFEST_JSON
    manifest = shared.read_manifest()
    if manifest is None:
        raise VerificationError(mpath, "driver_built is present but the manifest is missing")
    if manifest.get("build") is None:
        raise VerificationError(mpath, "driver_built is present but the manifest lists no build")
    if manifest["generation"] != generation:
        raise VerificationError(mpath, "manifest is for generation %s, expected %s" % (manifest["generation"], generation))
    diff = {k: (manifest["inputs"].get(k), inputs.get(k)) for k in INPUT_KEYS if manifest["inputs"].get(k) != inputs.get(k)}
    if diff:
        raise VerificationError(mpath, "build inputs differ from this node's: " + "; ".join(
            "%s built=%r wanted=%r" % (k, a, b) for k, (a, b) in sorted(diff.items())))
    verify_files(shared.path / MODULES_DIR, manifest["build"]["files"], inputs["kernel_release"])
    return manifest


def verify_files(modules: Path, files: List[Dict[str, Any]], kernel: str) -> None:
    """Every listed file present under ``modules`` with its sha256, every
    module built for ``kernel``, no module that is not listed."""
    listed = set()
    for f in files:
        full = safe_relative_path(modules, f["path"])
        listed.add(f["path"])
        if not full.is_file():
            raise VerificationError(full, "listed in the manifest but missing")
        digest, info = _hash_and_info(full, f["path"])
        if digest != f["sha256"]:
            raise VerificationError(full, "sha256 differs from the manifest (corrupt or replaced)")
        if info is not None:
            problem = vermagic_problem(full, info.vermagic, kernel)
            if problem:
                raise VerificationError(full, problem)
    for e in describe_tree_paths(modules):
        if is_module(e) and e not in listed:
            raise VerificationError(modules / e, "module not listed in the manifest")


def describe_tree_paths(root: Path) -> List[str]:
    if not root.is_dir():
        return []
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() or p.is_symlink())
