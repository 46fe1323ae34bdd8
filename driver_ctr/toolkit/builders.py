"""The builder interface, and the one build path every command takes.

A builder fills an empty staging directory with a module tree laid out as
``/lib/modules/<target kernel>`` (``kernel/drivers/video/nvidia.ko`` …),
writes its output to the build log and raises :class:`BuildFailed` on
failure. The target kernel is whatever the request names: the node's kernel
on the DTK side and in ``init``, another one for ``update -k``.

:func:`build_and_describe` is how the DTK side, the local and fallback build
and ``build``/``update -k`` build: the builder runs, then every staged file is
described within the module size limit, an ``nvidia`` module must be there and
every module's vermagic must name the target kernel, and the one
:class:`BuildRecord` of the build is made. The real builder is
:class:`~driver_ctr.toolkit.kbuild.KbuildBuilder`; tests pass their own.
"""

from __future__ import annotations

import tempfile
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Mapping, Optional, Sequence, Tuple

from .errors import BuildFailed
from .modinfo import vermagic_problem
from .nvidia_modules import NVIDIA, build_set
from .paths import HostPaths
from .records import BuildRecord, now
from .signing import Signing
from .sources import run_file_name
from .trees import describe_tree

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


class Builder(ABC):
    """Builds the request's module set into its staging directory (see the module docstring)."""

    name = "abstract"

    @abstractmethod
    def build(self, request: BuildRequest) -> BuildResult: ...


def find_source(source_dir: str, search_dirs: Sequence[Path], arch: str, version: str) -> Path:
    """``DRIVER_CTR_SOURCE_DIR`` when set, else the first ``NVIDIA-Linux-<arch>-<version>.run``
    of ``search_dirs``; :class:`BuildFailed` naming where it looked otherwise."""
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


def request_for(
    settings: "Settings",
    kernel: str,
    staging_dir: Path,
    log_path: Path,
    cancel: Optional["Cancellation"],
    options: Optional[BuildOptions] = None,
    search_dirs: Sequence[Path] = (),
    build_tree: Optional[Path] = None,
) -> BuildRequest:
    """The request for a build of ``kernel`` with these settings: the sources found in ``search_dirs`` then
    the image's drivers directory, the options from the settings unless given."""
    source = find_source(
        settings.source_dir,
        [*search_dirs, settings.paths.drivers_dir],
        settings.target_arch,
        settings.driver_version.raw,
    )
    return BuildRequest(
        target_kernel=kernel,
        source=source,
        paths=settings.paths,
        staging_dir=staging_dir,
        log_path=log_path,
        scratch=default_scratch(),
        options=options or BuildOptions.from_settings(settings),
        build_tree=build_tree,
        cancel=cancel,
    )


@dataclass(frozen=True)
class DescribedBuild:
    """A finished build: its record (every staged file described, the builder's details) and what the
    builder answered (the sources and symbol versions the optional components build against)."""

    record: BuildRecord
    result: BuildResult


def build_and_describe(
    builder: Builder,
    request: BuildRequest,
    limit: int,
    dtk_kernels: Mapping[str, str] = {},
    details: Mapping[str, Any] = {},
) -> DescribedBuild:
    """Build, then describe and check the staged tree (see the module docstring); ``details`` are added to
    the builder's in the record. The staged tree is ``request.staging_dir``."""
    result = builder.build(request)
    files = describe_tree(request.staging_dir, limit)
    modules = [f for f in files if f.is_module]
    if not any(f.name == NVIDIA for f in modules):
        raise BuildFailed("verify", "the build produced no nvidia module")
    for f in modules:
        problem = vermagic_problem(request.staging_dir / f.path, f.vermagic, request.target_kernel)
        if problem:
            raise BuildFailed("verify", problem)
    record = BuildRecord(
        builder=result.builder,
        files=files,
        components=result.components,
        dtk_kernels=dict(dtk_kernels),
        finished_at=now(),
        details=dict(result.details, **details),
    )
    return DescribedBuild(record, result)
