"""The builder interface: what a build is asked for and what it answers.

A builder fills an empty staging directory with a module tree laid out as
``/lib/modules/<target kernel>`` (``kernel/drivers/video/nvidia.ko`` …),
writes its output to the build log and raises :class:`BuildFailed` on
failure. The target kernel is whatever the request names: the node's kernel
on the DTK side and in ``init``, another one for ``update -k``.

The real builder is :class:`~driver_ctr.toolkit.kbuild.KbuildBuilder`.
``DRIVER_CTR_BUILDER=/path/file.py:Class`` (the DTK container's own
environment, never ``settings.json``) loads another one from a file; the
test suite uses it for a builder that stages prepared modules.
"""

from __future__ import annotations

import importlib.util
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Mapping, Optional, Sequence, Tuple

from .errors import InvalidValue
from .nvidia_modules import build_set
from .paths import HostPaths
from .signing import Signing

if TYPE_CHECKING:
    from .settings import Settings
    from .waiting import Cancellation


@dataclass(frozen=True)
class BuildOptions:
    """How to build: the driver, the flavour wanted, the module set, the bounds."""

    driver_version: str
    driver_branch: int
    target_arch: str
    module_type: str  # auto, open or proprietary
    modules: Tuple[str, ...]
    ignore_preempt_rt: bool = False
    max_jobs: Optional[int] = None
    timeout_s: float = 2400.0
    signing: Optional[Signing] = None
    use_host_mofed: bool = False  # nvidia-peermem against the host's MOFED, not the MOFED container's

    @classmethod
    def from_settings(cls, settings: "Settings", max_jobs: Optional[int] = None) -> "BuildOptions":
        return cls(
            driver_version=settings.driver_version.raw,
            driver_branch=settings.driver_branch,
            target_arch=settings.target_arch,
            module_type=settings.kernel_module_type,
            modules=build_set(settings.gpu_direct_rdma_enabled),
            ignore_preempt_rt=settings.ignore_preempt_rt_presence,
            max_jobs=max_jobs or settings.max_threads,
            timeout_s=settings.build_timeout_s,
            signing=Signing.from_settings(settings),
            use_host_mofed=settings.use_host_mofed,
        )


@dataclass(frozen=True)
class BuildRequest:
    """One build for ``target_kernel``.

    ``source`` is an extracted driver tree (``kernel/``, ``kernel-open/``) or
    a ``.run`` to extract; ``paths`` is where the target kernel's
    ``/lib/modules/<k>`` and the build's own ``/proc`` and ``/sys`` are read;
    ``build_tree`` is the kernel build tree the DTK decision resolved, when
    there was one.
    """

    target_kernel: str
    source: Path
    paths: HostPaths
    staging_dir: Path
    log_path: Path
    scratch: Path
    options: BuildOptions
    build_tree: Optional[Path] = None
    cancel: Optional["Cancellation"] = None


def default_scratch() -> Path:
    """Where sources are extracted and builds run (a killed build leaves nothing in the sources)."""
    return Path(tempfile.gettempdir()) / "driver-ctr"


@dataclass(frozen=True)
class BuildResult:
    builder: str
    components: Tuple[str, ...] = ("nvidia",)
    details: Dict[str, Any] = field(default_factory=dict)  # recorded in the manifest (flavour, jobs, compiler...)
    # for the optional components (components.py): NVIDIA's Module.symvers of this build, kept in the
    # scratch directory, and the sources (the directory holding kernel/, kernel-open/) and flavour tree used
    symvers: Optional[Path] = None
    sources_root: Optional[Path] = None
    flavour_tree: Optional[Path] = None


class Builder:
    name = "abstract"

    def build(self, request: BuildRequest) -> BuildResult:  # pragma: no cover - interface
        raise NotImplementedError


def find_source(source_dir: str, search_dirs: Sequence[Path], arch: str, version: str) -> Path:
    """``DRIVER_CTR_SOURCE_DIR`` when set, else the first ``NVIDIA-Linux-<arch>-<version>.run``
    of ``search_dirs``; :class:`BuildFailed` naming where it looked otherwise."""
    from .errors import BuildFailed
    from .sources import run_file_name

    if source_dir:
        return Path(source_dir)
    name = run_file_name(arch, version)
    for d in search_dirs:
        if (d / name).is_file():
            return d / name
    raise BuildFailed(
        "sources",
        "no NVIDIA driver sources: %s is not in %s, and DRIVER_CTR_SOURCE_DIR is not set"
        % (name, " or ".join(str(d) for d in search_dirs)),
    )


BUILDER_VARIABLE = "DRIVER_CTR_BUILDER"


def choose_builder(own_env: Mapping[str, str]) -> Builder:
    """The kbuild builder, or the one ``DRIVER_CTR_BUILDER=/path/file.py:Class`` names."""
    spec = own_env.get(BUILDER_VARIABLE, "").strip()
    if not spec:
        from .kbuild import KbuildBuilder

        return KbuildBuilder()
    path, sep, attr = spec.rpartition(":")
    if not sep or not path.endswith(".py") or not Path(path).is_file() or not attr.isidentifier():
        raise InvalidValue(BUILDER_VARIABLE, spec, "/path/to/file.py:ClassName of an existing file")
    loader = importlib.util.spec_from_file_location("driver_ctr_builder_plugin", path)
    assert loader is not None and loader.loader is not None
    module = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(module)
    builder = getattr(module, attr)(own_env)
    if not isinstance(builder, Builder):
        raise InvalidValue(BUILDER_VARIABLE, spec, "a class derived from driver_ctr.toolkit.builders.Builder")
    return builder
