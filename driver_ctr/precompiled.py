"""Precompiled bundles: modules built ahead of time for a list of kernels, carried by the driver image.

``nvidia-driver update -k KVER`` (an image build stage, a CI job) and ``nvidia-driver build`` (the
running kernel) store bundles under ``/usr/src/nvidia-<version>/kernel/precompiled/`` (the reference's
location), in the host cache's format (``<kver>/<key>/entry.json`` and ``modules/``), so one verifier
serves both: every file's sha256 and vermagic, no unlisted module, on every use.

A bundle's key digests what is known when the image is built: the kernel release, the driver version,
the module type, the architecture, RDMA (nvidia-peermem) and the signing certificate's fingerprint; not
the operator's config digest (unknown then): a bundle serves every cluster configuration that loads the
same modules. GDS and GDRCopy build against this node's own build: no bundle serves them. A bundle for
another kernel is never used; when none matches, the kernels the image carries are logged.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import List, Optional

from .toolkit.host_cache import HostCache
from .toolkit.records import BuildInputs
from .toolkit.settings import Settings

PRECOMPILED_DIR = "/usr/src/nvidia-%s/kernel/precompiled"
KEEP_ALL = 1 << 30  # a bundle store never prunes: the image carries what its build put there


def store_dir(settings: Settings) -> Path:
    """``DRIVER_CTR_PRECOMPILED_DIR``, else the reference's location for this driver version."""
    return settings.host_path("precompiled_dir") or settings.paths.host(PRECOMPILED_DIR % settings.driver_version.raw)


def bundle_inputs(settings: Settings, kernel: str) -> BuildInputs:
    """The inputs a bundle for ``kernel`` is keyed by (see the module docstring)."""
    return replace(
        BuildInputs.from_settings(settings, kernel), driver_config_digest="", gds_enabled=False, gdrcopy_enabled=False
    )


def open_store(settings: Settings, create: bool = False) -> Optional[HostCache]:
    d = store_dir(settings)
    if create:
        d.mkdir(parents=True, exist_ok=True)
    return HostCache(d, KEEP_ALL, settings.module_size_limit) if d.is_dir() else None


def carried_kernels(store: Optional[HostCache]) -> List[str]:
    if store is None:
        return []
    return sorted(store.kernels())
