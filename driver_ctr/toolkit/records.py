"""The typed records: every JSON body driver-ctr writes or reads, in and out.

What a build depends on (:class:`BuildInputs`), one staged file
(:class:`FileRecord`), one build (:class:`BuildRecord`), a generation of the
shared directory (:class:`Manifest`) and a host-cache entry
(:class:`CacheRecord`). Every record is a frozen dataclass with
``to_json``/``from_json``; ``from_json`` rejects a malformed body with a
:class:`ProtocolError` naming the file and the field.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, ClassVar, Dict, List, Mapping, Optional, Tuple, Type, TypeVar

from .errors import ProtocolError
from .nvidia_modules import is_module
from .shared_fs import rel_ok

if TYPE_CHECKING:
    from .settings import Settings

PROTOCOL_VERSION = 1  # of settings.json and manifest.json

R = TypeVar("R", bound="Record")


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


def str_list(where: object, data: Mapping[str, Any], key: str) -> Tuple[str, ...]:
    items = take(where, data, key, list, [])
    bad = [i for i, x in enumerate(items) if not isinstance(x, str)]
    if bad:
        raise ProtocolError(where, "field %r: expected a list of strings (item %d is not)" % (key, bad[0]))
    return tuple(items)


def json_object(where: object, data: Any) -> Dict[str, Any]:
    if not isinstance(data, dict):
        raise ProtocolError(where, "expected a JSON object, got %s" % type(data).__name__)
    return data


class Record:
    """Base of the records: JSON in and out."""

    def to_json(self) -> Dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def from_json(cls: Type[R], where: object, data: Any) -> R:
        raise NotImplementedError


@dataclass(frozen=True)
class BuildInputs(Record):
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
        d = json_object(where, data)
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
class FileRecord(Record):
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
        d = json_object(where, data)
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
class BuildRecord(Record):
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
        d = json_object(where, data)
        kernels = take(where, d, "dtk_kernels", dict, {})
        if not all(isinstance(v, str) for v in kernels.values()):
            raise ProtocolError(where, "field 'dtk_kernels': expected an object of strings")
        return cls(
            builder=take(where, d, "builder", str),
            files=_files(where, d),
            components=str_list(where, d, "components") or ("nvidia",),
            dtk_kernels=dict(kernels),
            finished_at=take(where, d, "finished_at", str, ""),
            details=dict(take(where, d, "details", dict, {})),
        )


@dataclass(frozen=True)
class Manifest(Record):
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
        d = json_object(where, data)
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
class CacheRecord(Record):
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
        d = json_object(where, data)
        if take(where, d, "format", int, None) != cls.FORMAT:
            raise ProtocolError(where, "not a host cache entry of format %d" % cls.FORMAT)
        return cls(
            key=take(where, d, "key", str),
            inputs=BuildInputs.from_json(where, take(where, d, "inputs", dict)),
            signing_fingerprint=take(where, d, "signing_fingerprint", str, ""),
            build=BuildRecord.from_json(where, take(where, d, "build", dict)),
            stored_at=take(where, d, "stored_at", str, ""),
        )
