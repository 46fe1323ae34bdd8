"""Facts about the NVIDIA kernel modules: the one place that names them.

Names are written as NVIDIA's Makefile and ``modprobe`` take them
(``nvidia-uvm``); the kernel reports them with underscores (``nvidia_uvm``
in ``/sys/module``, ``modinfo -F name``, ``modules.dep``). :func:`normalize`
turns either into the kernel's form.
"""

from __future__ import annotations

import os
import re
from typing import Tuple

NVIDIA = "nvidia"
UVM = "nvidia-uvm"
MODESET = "nvidia-modeset"
DRM = "nvidia-drm"
PEERMEM = "nvidia-peermem"  # GPUDirect RDMA
NVIDIA_FS = "nvidia-fs"  # GPUDirect Storage (GDS)
GDRDRV = "gdrdrv"  # GDRCopy

# Always built and loaded, in this order (reference §2.5).
BASE = (NVIDIA, UVM, MODESET)
# What the NVIDIA modules import from the kernel (modinfo depends of the 535/550 builds).
KERNEL_DEPENDENCIES = ("drm", "video")
# Loaded before nvidia, best effort (reference §2.5): staged when the kernel has them as modules.
COMPANIONS = ("i2c_core", "ipmi_msghandler", "ipmi_devintf")
# Loaded when present and wanted; missing or failing, they never stop the GPU driver (it still reaches Ready).
OPTIONAL = (PEERMEM,)
# Modules that may take a /drivers/<module>.conf parameter file.
PARAMETER_MODULES = (NVIDIA, UVM, MODESET, PEERMEM)

# Where the staged tree keeps the NVIDIA modules, relative to /lib/modules/<kver>
# (where nvidia-installer puts them).
SUBDIR = "kernel/drivers/video"
KO_SUFFIXES = (".ko", ".ko.xz", ".ko.zst", ".ko.gz")
_KO = re.compile(r"\.ko(\.xz|\.zst|\.gz)?$")


def build_set(rdma: bool) -> Tuple[str, ...]:
    """The modules one build produces: the base three, plus nvidia-peermem with RDMA."""
    return BASE + ((PEERMEM,) if rdma else ())


def normalize(name: str) -> str:
    """The kernel's spelling of a module name: ``nvidia-uvm`` -> ``nvidia_uvm``."""
    return name.replace("-", "_")


# Removed dependants first (reference §2.6), in the kernel's spelling.
UNLOAD_ORDER = tuple(normalize(name) for name in (PEERMEM, GDRDRV, NVIDIA_FS, DRM, MODESET, UVM, NVIDIA))


def is_module(path: str) -> bool:
    """A kernel module file, compressed or not."""
    return path.endswith(KO_SUFFIXES)


def module_name(path: str) -> str:
    """``kernel/drivers/gpu/drm/drm.ko.xz`` -> ``drm`` (kernel spelling)."""
    return normalize(_KO.sub("", os.path.basename(path)))


def ko_file(name: str) -> str:
    """The file a build produces for ``name``: ``nvidia-uvm.ko``."""
    return name + ".ko"


def staged_path(name: str) -> str:
    """Where ``name`` sits in a staged tree, relative to /lib/modules/<kver>."""
    return "%s/%s" % (SUBDIR, ko_file(name))


def parameter_file(name: str) -> str:
    """The ``/drivers`` file holding ``name``'s parameters: ``nvidia-uvm.conf``."""
    return name + ".conf"
