"""The shared-directory protocol: the only place either side learns a file name
or the shape of a record.

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
- ``drivers/``              driver -> DTK: the ``.run`` and the ``*.conf`` parameter files
- ``modules/``              the staged module tree, paths relative to /lib/modules/<kver>
- ``ocp_dtk_entrypoint``, ``driver-ctr-toolkit.pyz``: the DTK-side program
- ``build.log``             the DTK build's output
- ``stale/gen-<N>-<ms>``    earlier generations, moved aside, never trusted

Every record is a frozen dataclass with ``to_json``/``from_json``;
``from_json`` rejects a malformed body with a :class:`ProtocolError` naming the
file and the field. Every flag carries a small JSON body (generation, time,
reason); the reference only tests for existence, which still works.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import (
    TYPE_CHECKING,
    Any,
    BinaryIO,
    Callable,
    ClassVar,
    Dict,
    List,
    Mapping,
    Optional,
    Sequence,
    Tuple,
    Type,
    TypeVar,
    cast,
)

from .errors import ProtocolError
from .fsio import remove_tree
from .modinfo import read_modinfo, vermagic_problem
from .nvidia_modules import is_module
from .shared_fs import RECORD_LIMIT, Confined, rel_ok
from .waiting import check_cancelled

if TYPE_CHECKING:
    from .settings import Settings

PROTOCOL_VERSION = 1

DIR_PREPARED = "dir_prepared"
BUILD_STARTED = "driver_build_started"
TOOLKIT_BROKEN = "driver_toolkit_broken"
BUILD_FAILED = "driver_build_failed"
BUILT = "driver_built"
NVIDIA_FS_BUILT = "nvidia_fs_built"
GDRCOPY_BUILT = "gdrcopy_built"
NVIDIA_FS_BUILD_FAILED = "nvidia_fs_build_failed"
GDRCOPY_BUILD_FAILED = "gdrcopy_build_failed"
# Flags of one generation's outcome: moved aside when a new generation starts.
OUTCOME_FLAGS = (
    BUILD_STARTED,
    TOOLKIT_BROKEN,
    BUILD_FAILED,
    BUILT,
    NVIDIA_FS_BUILT,
    GDRCOPY_BUILT,
    NVIDIA_FS_BUILD_FAILED,
    GDRCOPY_BUILD_FAILED,
)
FLAGS = (DIR_PREPARED,) + OUTCOME_FLAGS  # status shows these

SETTINGS_JSON = "settings.json"
MANIFEST_JSON = "manifest.json"
MODULES_DIR = "modules"
DRIVERS_DIR = "drivers"
STAGING_PREFIX = ".modules.staging-"
LAUNCHER = "ocp_dtk_entrypoint"
ZIPAPP = "driver-ctr-toolkit.pyz"
BUILD_LOG = "build.log"
STALE_DIR = "stale"
STALE_KEEP = 3
DTK_LOCK = ".dtk-side.lock"  # held by the one DTK side at work (a restart may overlap its predecessor)
DRIVER_TAG, DTK_TAG = "drv-", "dtk-"  # prefixes of each side's temporary and staging names

R = TypeVar("R", bound="_Record")


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# -- typed records -------------------------------------------------------------

_MISSING = object()


def _type_name(t: Any) -> str:
    if isinstance(t, tuple):
        return " or ".join(_type_name(x) for x in t)
    return {
        str: "a string",
        int: "a whole number",
        bool: "true or false",
        list: "a list",
        dict: "an object",
        type(None): "null",
    }.get(t, getattr(t, "__name__", str(t)))


def take(where: object, data: Mapping[str, Any], key: str, typ: Any, default: Any = _MISSING) -> Any:
    """``data[key]`` checked to be of ``typ``; a missing key takes ``default``
    (or is an error without one). Booleans are never accepted as numbers."""
    if key not in data:
        if default is _MISSING:
            raise ProtocolError(where, "field %r is missing" % key)
        return default
    v = data[key]
    types = typ if isinstance(typ, tuple) else (typ,)
    if isinstance(v, bool) and bool not in types:
        ok = False
    else:
        ok = isinstance(v, types)
    if not ok:
        raise ProtocolError(where, "field %r: expected %s, got %s" % (key, _type_name(typ), json.dumps(v)[:80]))
    return v


def _str_list(where: object, data: Mapping[str, Any], key: str) -> Tuple[str, ...]:
    items = take(where, data, key, list, [])
    bad = [i for i, x in enumerate(items) if not isinstance(x, str)]
    if bad:
        raise ProtocolError(where, "field %r: expected a list of strings (item %d is not)" % (key, bad[0]))
    return tuple(items)


def _object(where: object, data: Any) -> Dict[str, Any]:
    if not isinstance(data, dict):
        raise ProtocolError(where, "expected a JSON object, got %s" % type(data).__name__)
    return data


class _Record:
    """Base of the records: JSON in and out."""

    def to_json(self) -> Dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def from_json(cls: Type[R], where: object, data: Any) -> R:
        raise NotImplementedError


@dataclass(frozen=True)
class BuildInputs(_Record):
    """What a build depends on: equal inputs mean a build can be reused."""

    kernel_release: str  # the target kernel
    driver_version: str
    kernel_module_type: str
    driver_config_digest: str
    gpu_direct_rdma_enabled: bool
    gds_enabled: bool
    gdrcopy_enabled: bool
    target_arch: str

    @classmethod
    def from_settings(cls, settings: "Settings", target_kernel: str) -> "BuildInputs":
        return cls(
            kernel_release=target_kernel,
            driver_version=settings.driver_version.raw,
            kernel_module_type=settings.kernel_module_type,
            driver_config_digest=settings.driver_config_digest,
            gpu_direct_rdma_enabled=settings.gpu_direct_rdma_enabled,
            gds_enabled=settings.gds_enabled,
            gdrcopy_enabled=settings.gdrcopy_enabled,
            target_arch=settings.target_arch,
        )

    def to_json(self) -> Dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_json(cls, where: object, data: Any) -> "BuildInputs":
        d = _object(where, data)
        names = [f.name for f in fields(cls)]
        if set(d) != set(names):
            raise ProtocolError(where, "inputs must have exactly the keys %s" % ", ".join(names))
        values = {f.name: take(where, d, f.name, bool if f.type in ("bool", bool) else str) for f in fields(cls)}
        return cls(**values)

    def differences(self, other: "BuildInputs") -> List[str]:
        """``key built=… wanted=…`` for each input that differs from ``other``'s."""
        return [
            "%s built=%r wanted=%r" % (f.name, getattr(self, f.name), getattr(other, f.name))
            for f in fields(self)
            if getattr(self, f.name) != getattr(other, f.name)
        ]


@dataclass(frozen=True)
class FileRecord(_Record):
    """One staged file: its path below the tree, sha256 and, for a module, its modinfo."""

    path: str
    sha256: str
    size: int
    name: str = ""
    version: str = ""
    vermagic: str = ""
    signed: bool = False

    @property
    def is_module(self) -> bool:
        return is_module(self.path)

    def to_json(self) -> Dict[str, Any]:
        d: Dict[str, Any] = {"path": self.path, "sha256": self.sha256, "size": self.size}
        if self.is_module:
            d.update(name=self.name, version=self.version, vermagic=self.vermagic, signed=self.signed)
        return d

    @classmethod
    def from_json(cls, where: object, data: Any) -> "FileRecord":
        d = _object(where, data)
        path = take(where, d, "path", str)
        if not rel_ok(path):
            raise ProtocolError(where, "unsafe staged path %r" % path)
        digest = take(where, d, "sha256", str)
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise ProtocolError(where, "sha256 of %s is not a sha256 digest" % path)
        return cls(
            path=path,
            sha256=digest,
            size=take(where, d, "size", int, 0),
            name=take(where, d, "name", str, ""),
            version=take(where, d, "version", str, ""),
            vermagic=take(where, d, "vermagic", str, ""),
            signed=take(where, d, "signed", bool, False),
        )


def _files(where: object, data: Mapping[str, Any]) -> Tuple[FileRecord, ...]:
    items = take(where, data, "files", list)
    return tuple(FileRecord.from_json("%s files[%d]" % (where, i), x) for i, x in enumerate(items))


@dataclass(frozen=True)
class BuildRecord(_Record):
    """What a builder produced: who built it, how, and every file of the tree."""

    builder: str
    files: Tuple[FileRecord, ...]
    components: Tuple[str, ...] = ("nvidia",)
    dtk_kernels: Dict[str, str] = field(default_factory=dict)
    finished_at: str = ""
    details: Dict[str, Any] = field(default_factory=dict)

    @property
    def modules(self) -> List[FileRecord]:
        return [f for f in self.files if f.is_module]

    @property
    def signing_fingerprint(self) -> str:
        v = self.details.get("signing_fingerprint", "")
        return v if isinstance(v, str) else ""

    def to_json(self) -> Dict[str, Any]:
        return {
            "builder": self.builder,
            "components": list(self.components),
            "dtk_kernels": dict(self.dtk_kernels),
            "finished_at": self.finished_at,
            "details": dict(self.details),
            "files": [f.to_json() for f in self.files],
        }

    @classmethod
    def from_json(cls, where: object, data: Any) -> "BuildRecord":
        d = _object(where, data)
        kernels = take(where, d, "dtk_kernels", dict, {})
        if not all(isinstance(v, str) for v in kernels.values()):
            raise ProtocolError(where, "field 'dtk_kernels': expected an object of strings")
        return cls(
            builder=take(where, d, "builder", str),
            files=_files(where, d),
            components=_str_list(where, d, "components") or ("nvidia",),
            dtk_kernels=dict(kernels),
            finished_at=take(where, d, "finished_at", str, ""),
            details=dict(take(where, d, "details", dict, {})),
        )


@dataclass(frozen=True)
class Manifest(_Record):
    """``manifest.json``: the generation and its inputs (driver side), then the build (DTK side)."""

    generation: int
    inputs: BuildInputs
    build: Optional[BuildRecord] = None
    protocol: int = PROTOCOL_VERSION

    def to_json(self) -> Dict[str, Any]:
        d: Dict[str, Any] = {"protocol": self.protocol, "generation": self.generation, "inputs": self.inputs.to_json()}
        if self.build is not None:
            d["build"] = self.build.to_json()
        return d

    @classmethod
    def from_json(cls, where: object, data: Any) -> "Manifest":
        d = _object(where, data)
        proto = take(where, d, "protocol", int, None)
        if proto != PROTOCOL_VERSION:
            raise ProtocolError(where, "manifest protocol %r, expected %d" % (proto, PROTOCOL_VERSION))
        gen = take(where, d, "generation", int)
        if gen < 1:
            raise ProtocolError(where, "manifest generation must be a whole number >= 1, got %r" % gen)
        build = d.get("build")
        return cls(
            generation=gen,
            inputs=BuildInputs.from_json("%s inputs" % where, take(where, d, "inputs", dict)),
            build=None if build is None else BuildRecord.from_json("%s build" % where, build),
        )


@dataclass(frozen=True)
class CacheRecord(_Record):
    """A host-cache entry's ``entry.json``: the same files as a manifest's build, keyed by inputs and signer."""

    FORMAT: ClassVar[int] = 1

    key: str
    inputs: BuildInputs
    signing_fingerprint: str
    build: BuildRecord
    stored_at: str = ""

    def to_json(self) -> Dict[str, Any]:
        return {
            "format": self.FORMAT,
            "key": self.key,
            "inputs": self.inputs.to_json(),
            "signing_fingerprint": self.signing_fingerprint,
            "stored_at": self.stored_at,
            "build": self.build.to_json(),
        }

    @classmethod
    def from_json(cls, where: object, data: Any) -> "CacheRecord":
        d = _object(where, data)
        if take(where, d, "format", int, None) != cls.FORMAT:
            raise ProtocolError(where, "not a host cache entry of format %d" % cls.FORMAT)
        return cls(
            key=take(where, d, "key", str),
            inputs=BuildInputs.from_json(where, take(where, d, "inputs", dict)),
            signing_fingerprint=take(where, d, "signing_fingerprint", str, ""),
            build=BuildRecord.from_json(where, take(where, d, "build", dict)),
            stored_at=take(where, d, "stored_at", str, ""),
        )


# -- flag bodies -----------------------------------------------------------------


@dataclass(frozen=True)
class Flag(_Record):
    """A flag file's body. ``generation`` is None only for a body that names none
    (a reference-style ``touch`` or the launcher's broken flag)."""

    NAME: ClassVar[str] = ""
    generation: Optional[int] = None

    def _extra(self) -> Dict[str, Any]:
        return {}

    def to_json(self) -> Dict[str, Any]:
        d: Dict[str, Any] = {"generation": self.generation, "time": now()}
        d.update(self._extra())
        return d

    @classmethod
    def from_json(cls: Type[R], where: object, data: Any) -> R:
        d = _object(where, data)
        return cls._from(where, d, take(where, d, "generation", (int, type(None)), None))  # type: ignore[attr-defined,no-any-return]

    @classmethod
    def _from(cls, where: object, d: Mapping[str, Any], generation: Optional[int]) -> "Flag":
        return cls(generation=generation)

    def of(self, generation: int) -> bool:
        """Whether this flag speaks of ``generation`` (a flag naming none speaks of any)."""
        return self.generation is None or self.generation == generation


@dataclass(frozen=True)
class Prepared(Flag):
    NAME: ClassVar[str] = DIR_PREPARED


@dataclass(frozen=True)
class Started(Flag):
    NAME: ClassVar[str] = BUILD_STARTED
    pid: int = 0
    builder: str = ""

    def _extra(self) -> Dict[str, Any]:
        return {"pid": self.pid, "builder": self.builder}

    @classmethod
    def _from(cls, where: object, d: Mapping[str, Any], generation: Optional[int]) -> "Started":
        return cls(generation=generation, pid=take(where, d, "pid", int, 0), builder=take(where, d, "builder", str, ""))


@dataclass(frozen=True)
class Broken(Flag):
    """The DTK cannot build for the node: the decision's reasons and likely cause;
    ``decision`` keeps the whole decision (kernels, versions) for the log."""

    NAME: ClassVar[str] = TOOLKIT_BROKEN
    reasons: Tuple[str, ...] = ()
    likely_cause: str = ""
    decision: Dict[str, Any] = field(default_factory=dict)

    def _extra(self) -> Dict[str, Any]:
        d = dict(self.decision)
        d.update(reasons=list(self.reasons), likely_cause=self.likely_cause)
        return d

    @classmethod
    def _from(cls, where: object, d: Mapping[str, Any], generation: Optional[int]) -> "Broken":
        decision = {k: v for k, v in d.items() if k not in ("generation", "time", "reasons", "likely_cause")}
        return cls(
            generation=generation,
            reasons=_str_list(where, d, "reasons"),
            likely_cause=take(where, d, "likely_cause", str, ""),
            decision=decision,
        )


@dataclass(frozen=True)
class Failed(Flag):
    NAME: ClassVar[str] = BUILD_FAILED
    phase: str = "build"
    message: str = "no reason given"
    log_tail: str = ""

    def _extra(self) -> Dict[str, Any]:
        return {"phase": self.phase, "message": self.message, "log_tail": self.log_tail}

    @classmethod
    def _from(cls, where: object, d: Mapping[str, Any], generation: Optional[int]) -> "Failed":
        return cls(
            generation=generation,
            phase=take(where, d, "phase", str, "build"),
            message=take(where, d, "message", str, "no reason given"),
            log_tail=take(where, d, "log_tail", str, ""),
        )


@dataclass(frozen=True)
class Built(Flag):
    NAME: ClassVar[str] = BUILT
    files: int = 0
    source: str = "dtk"

    def _extra(self) -> Dict[str, Any]:
        return {"files": self.files, "source": self.source}

    @classmethod
    def _from(cls, where: object, d: Mapping[str, Any], generation: Optional[int]) -> "Built":
        return cls(
            generation=generation, files=take(where, d, "files", int, 0), source=take(where, d, "source", str, "dtk")
        )


@dataclass(frozen=True)
class NvidiaFsBuilt(Flag):
    NAME: ClassVar[str] = NVIDIA_FS_BUILT


@dataclass(frozen=True)
class GdrcopyBuilt(Flag):
    NAME: ClassVar[str] = GDRCOPY_BUILT


@dataclass(frozen=True)
class ComponentFailed(Failed):
    """An optional component (nvidia-fs, gdrdrv) did not build: its sidecar fails fast with the reason;
    the GPU driver is not concerned."""

    NAME: ClassVar[str] = NVIDIA_FS_BUILD_FAILED
    component: str = ""

    def _extra(self) -> Dict[str, Any]:
        return dict(super()._extra(), component=self.component)

    @classmethod
    def _from(cls, where: object, d: Mapping[str, Any], generation: Optional[int]) -> "ComponentFailed":
        failed = cast("ComponentFailed", super()._from(where, d, generation))
        return replace(failed, component=take(where, d, "component", str, ""))


@dataclass(frozen=True)
class NvidiaFsFailed(ComponentFailed):
    NAME: ClassVar[str] = NVIDIA_FS_BUILD_FAILED


@dataclass(frozen=True)
class GdrcopyFailed(ComponentFailed):
    NAME: ClassVar[str] = GDRCOPY_BUILD_FAILED


F = TypeVar("F", bound=Flag)


# -- paths -----------------------------------------------------------------------


def stale_name(generation: int) -> str:
    return "gen-%d-%d" % (generation, int(time.time() * 1000))


def stale_generation(name: str) -> Optional[int]:
    parts = name.split("-")
    return int(parts[1]) if len(parts) >= 2 and parts[0] == "gen" and parts[1].isdigit() else None


def _stale_order(name: str) -> Tuple[int, int]:
    parts = name.split("-")
    return (int(parts[2]) if len(parts) >= 3 and parts[2].isdigit() else 0, stale_generation(name) or 0)


@dataclass(frozen=True)
class SharedDir:
    """The shared directory; every operation goes through :class:`Confined`
    (no symlink followed at any level, bounded reads, renames inside it)."""

    path: Path
    tag: str = ""  # the writer's tag on its temporary files ("drv-<pid>", "dtk-<pid>")

    @property
    def fs(self) -> Confined:
        return Confined(self.path, self.tag)

    @property
    def modules(self) -> Path:
        return self.path / MODULES_DIR

    @property
    def drivers(self) -> Path:
        return self.path / DRIVERS_DIR

    @property
    def build_log(self) -> Path:
        return self.path / BUILD_LOG

    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST_JSON

    def staging(self, tag: str) -> str:
        """A private staging directory's name (``tag`` holds the writer's pid)."""
        return STAGING_PREFIX + tag

    def flag(self, name: str) -> Path:
        return self.path / name

    def has(self, name: str) -> bool:
        """Whether a flag is present; a flag that is a directory, a symlink or a
        special file is a ProtocolError naming it."""
        return self.fs.is_file(name)

    def _json(self, name: str, what: str) -> Optional[Any]:
        """A JSON file's content, None when absent; bounded, never through a symlink."""
        if not self.fs.is_file(name):
            return None
        raw = self.fs.read_bytes(name, RECORD_LIMIT)
        try:
            return json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise ProtocolError(self.path / name, "%s is not UTF-8 text (%d bytes)" % (what, len(raw))) from None
        except ValueError as exc:
            raise ProtocolError(self.path / name, "%s is not valid JSON: %s" % (what, exc)) from None

    def read_flag(self, kind: Type[F]) -> Optional[F]:
        """The typed body of a flag, None when absent; an empty body (a
        reference-style ``touch``) reads as a body naming no generation."""
        if not self.fs.is_file(kind.NAME):
            return None
        raw = self.fs.read_bytes(kind.NAME, RECORD_LIMIT)
        if not raw.strip():
            return kind()
        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise ProtocolError(self.flag(kind.NAME), "flag body is not JSON (%d bytes)" % len(raw)) from None
        return kind.from_json(self.flag(kind.NAME), data)

    def _write_json(self, name: str, data: Any) -> None:
        self.fs.write_atomic(name, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode("utf-8"))

    def write_flag(self, body: Flag) -> None:
        self._write_json(body.NAME, body.to_json())

    def remove_flag(self, name: str) -> None:
        if self.fs.kind(name) == "dir":
            raise ProtocolError(self.flag(name), "is a directory where a flag file is expected")
        self.fs.remove(name)

    # -- settings.json ---------------------------------------------------

    def write_settings(self, shared_settings: Mapping[str, str]) -> None:
        self._write_json(SETTINGS_JSON, {"protocol": PROTOCOL_VERSION, "env": dict(shared_settings)})

    def read_settings(self) -> Dict[str, str]:
        p = self.path / SETTINGS_JSON
        data = self._json(SETTINGS_JSON, "settings.json")
        if data is None:
            raise ProtocolError(p, "settings.json is missing")
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

    def read_manifest(self) -> Optional[Manifest]:
        data = self._json(MANIFEST_JSON, "manifest.json")
        return None if data is None else Manifest.from_json(self.manifest_path, data)

    def generation(self) -> Optional[int]:
        """The manifest's generation; None when it is missing or unreadable."""
        try:
            m = self.read_manifest()
        except ProtocolError:
            return None
        return None if m is None else m.generation

    def write_manifest(self, manifest: Manifest) -> None:
        self._write_json(MANIFEST_JSON, manifest.to_json())

    # -- generations ---------------------------------------------------------

    def move_aside(self, generation: int) -> Optional[str]:
        """Move the outcome of an earlier generation (flags, modules, manifest)
        into ``stale/gen-N-<ms>`` so nothing trusts it any more. ``stale`` that
        is not a real directory is replaced, never followed. Returns the name."""
        fs = self.fs
        here = set(fs.listdir())
        names = [n for n in OUTCOME_FLAGS + (MODULES_DIR, MANIFEST_JSON, BUILD_LOG) if n in here]
        if not names:
            return None
        fs.ensure_dir(STALE_DIR)
        dest = "%s/%s" % (STALE_DIR, stale_name(generation))
        fs.ensure_dir(dest)
        # driver_built goes first: from that instant nobody trusts the rest.
        names.sort(key=lambda n: 0 if n == BUILT else 1)
        for n in names:
            fs.replace(n, "%s/%s" % (dest, n))
        olds = sorted(fs.listdir(STALE_DIR), key=_stale_order)
        for old in olds[:-STALE_KEEP]:
            fs.remove("%s/%s" % (STALE_DIR, old))
        return dest

    def highest_stale_generation(self) -> int:
        """Highest generation seen in stale/ (so numbers never repeat after a lost manifest)."""
        if self.fs.kind(STALE_DIR) != "dir":
            return 0
        gens = [stale_generation(n) for n in self.fs.listdir(STALE_DIR)]
        return max([g for g in gens if g is not None], default=0)

    def clean_staging(self, owned: Callable[[str], bool]) -> None:
        """Remove the staging directories ``owned`` says belong to a writer that is gone."""
        for n in self.fs.listdir():
            if n.startswith(STAGING_PREFIX) and owned(n[len(STAGING_PREFIX) :]):
                self.fs.remove(n)


# -- trees -----------------------------------------------------------------------

MODULE_LIMIT = 1 << 30  # no staged file is larger (nvidia.ko: ~80 MB); DRIVER_CTR_MODULE_SIZE_LIMIT


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


def describe_tree(root: Path, limit: int = MODULE_LIMIT) -> Tuple[FileRecord, ...]:
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


def verify_files(
    fs: Confined, rel: str, files: Sequence[FileRecord], target_kernel: str, limit: int = MODULE_LIMIT
) -> None:
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


def adopt_tree(
    fs: Confined, rel: str, files: Sequence[FileRecord], target_kernel: str, dest: Path, limit: int = MODULE_LIMIT
) -> None:
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


def adopt(
    fs: Confined, rel: str, files: Sequence[FileRecord], target_kernel: str, trees: Path, limit: int = MODULE_LIMIT
) -> Path:
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


def _finished_manifest(shared: SharedDir, inputs: BuildInputs, generation: int) -> Manifest:
    mpath = shared.manifest_path
    manifest = shared.read_manifest()
    if manifest is None:
        raise VerificationError(mpath, "driver_built is present but the manifest is missing")
    if manifest.build is None:
        raise VerificationError(mpath, "driver_built is present but the manifest lists no build")
    if manifest.generation != generation:
        raise VerificationError(mpath, "manifest is for generation %s, expected %s" % (manifest.generation, generation))
    diff = manifest.inputs.differences(inputs)
    if diff:
        raise VerificationError(mpath, "build inputs differ from this node's: " + "; ".join(diff))
    return manifest


def verify_build(shared: SharedDir, inputs: BuildInputs, generation: int, limit: int = MODULE_LIMIT) -> Manifest:
    """Check a finished build in place: same generation and inputs, every
    listed file present with its sha256, every module's vermagic naming the
    target kernel, nothing unlisted. Returns the manifest."""
    manifest = _finished_manifest(shared, inputs, generation)
    assert manifest.build is not None
    verify_files(shared.fs, MODULES_DIR, manifest.build.files, inputs.kernel_release, limit)
    return manifest


def adopt_build(
    shared: SharedDir, inputs: BuildInputs, generation: int, trees: Path, limit: int = MODULE_LIMIT
) -> Tuple[Manifest, Path]:
    """:func:`verify_build` by copying: the build's tree is copied to a tree of
    ``trees`` (the driver side's own, out of the DTK's reach) and the copy is
    what is verified, so what is loaded is exactly what was checked."""
    manifest = _finished_manifest(shared, inputs, generation)
    assert manifest.build is not None
    return manifest, adopt(shared.fs, MODULES_DIR, manifest.build.files, inputs.kernel_release, trees, limit)
