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

The records are in ``records.py``, the trees (describe, verify, adopt) in
``trees.py``; this module holds the names, the flags' bodies, the directory
(:class:`SharedDir`) and the verification of a finished build. Every flag carries a small JSON body (generation, time,
reason); the reference only tests for existence, which still works.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, ClassVar, Dict, Mapping, Optional, Tuple, Type, TypeVar, cast

from .errors import ProtocolError
from .records import PROTOCOL_VERSION, BuildInputs, Manifest, R, Record, json_object, now, str_list, take
from .shared_fs import RECORD_LIMIT, Confined
from .trees import VerificationError, adopt, verify_files

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

# -- flag bodies -----------------------------------------------------------------


@dataclass(frozen=True)
class Flag(Record):
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
        d = json_object(where, data)
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
            reasons=str_list(where, d, "reasons"),
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


def verify_build(shared: SharedDir, inputs: BuildInputs, generation: int, limit: int) -> Manifest:
    """Check a finished build in place: same generation and inputs, every
    listed file present with its sha256, every module's vermagic naming the
    target kernel, nothing unlisted. Returns the manifest."""
    manifest = _finished_manifest(shared, inputs, generation)
    assert manifest.build is not None
    verify_files(shared.fs, MODULES_DIR, manifest.build.files, inputs.kernel_release, limit)
    return manifest


def adopt_build(
    shared: SharedDir, inputs: BuildInputs, generation: int, trees: Path, limit: int
) -> Tuple[Manifest, Path]:
    """:func:`verify_build` by copying: the build's tree is copied to a tree of
    ``trees`` (the driver side's own, out of the DTK's reach) and the copy is
    what is verified, so what is loaded is exactly what was checked."""
    manifest = _finished_manifest(shared, inputs, generation)
    assert manifest.build is not None
    return manifest, adopt(shared.fs, MODULES_DIR, manifest.build.files, inputs.kernel_release, trees, limit)
