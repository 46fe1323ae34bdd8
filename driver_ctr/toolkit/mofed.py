"""GPUDirect RDMA: the MOFED tree ``nvidia-peermem`` is built against.

NVIDIA's ``nvidia-peermem`` only does its job when it is linked against the IB peer-memory API of
MOFED's ``ib_core`` (``ib_register_peer_memory_client``, ``ib_unregister_peer_memory_client``). Its
Kbuild and conftest look for MOFED's ``Module.symvers`` under ``/usr/src/ofa_kernel/{<arch>/<kver>,
<kver>,default}``; without it the module still compiles, but its init fails with EINVAL ("compiled
without IB peer memory symbols present"). So:

- :func:`find_ofa_kernel`: MOFED's tree for the target kernel, where the reference finds it:
  ``/run/mellanox/drivers/usr/src/ofa_kernel/...``. The operator mounts there the MOFED container's
  ``/usr/src``, or with ``USE_HOST_MOFED=true`` the host's ``/usr/src`` (its ``mlnx-ofed-usr-src``
  volume): one path either way. A tree whose ``Module.symvers`` lacks the two symbols is not one;
- :func:`prepare_build`: the build sees that tree at the paths NVIDIA's Kbuild and conftest read
  (``OFA_DIR`` on make's command line; the conftest's fixed ``/usr/src/ofa_kernel`` rewritten in the
  build's scratch copy), so nothing is written outside the scratch directory;
- :func:`imports_peer_memory`: the check after the build, on the module's ELF symbol table.

Without a MOFED tree ``nvidia-peermem`` is not built (the reason goes to the log and the manifest) and
the GPU driver builds and loads as usual.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional, Tuple

from .fsio import replace_symlink
from .inputs import UnreadableInput, read_input_text
from .modinfo import undefined_symbols
from .paths import HostPaths

PEER_MEMORY_SYMBOLS = ("ib_register_peer_memory_client", "ib_unregister_peer_memory_client")
OFA_KERNEL = "/run/mellanox/drivers/usr/src/ofa_kernel"  # the operator's mount, the MOFED container's or the host's
_CONFTEST_LINE = "MLNX_OFED_KERNEL_DIR=/usr/src/ofa_kernel"
_OFA_ARCH = {"amd64": "x86_64", "x86_64": "x86_64", "arm64": "aarch64", "aarch64": "aarch64", "ppc64le": "ppc64le"}


def exports_peer_memory(symvers: Path) -> bool:
    """``Module.symvers`` exports both IB peer-memory symbols (the test NVIDIA's conftest makes); a file that
    is absent or not a regular file within its bound is :class:`UnreadableInput`."""
    text = read_input_text(symvers, "kernel tree file")
    exported = set()
    for line in text.splitlines():
        parts = line.split("\t")
        if len(parts) >= 4 and parts[3].startswith("EXPORT_SYMBOL"):
            exported.add(parts[1])
    return all(s in exported for s in PEER_MEMORY_SYMBOLS)


def candidates(paths: HostPaths, kernel: str, arch: str) -> List[Path]:
    """Where MOFED's tree for ``kernel`` may be, in the order NVIDIA's Kbuild tries them."""
    base = paths.host(OFA_KERNEL)
    return [base / _OFA_ARCH.get(arch, arch) / kernel, base / kernel, base / "default"]


def find_ofa_kernel(paths: HostPaths, kernel: str, arch: str, use_host_mofed: bool) -> Tuple[Optional[Path], str]:
    """(MOFED's tree, '') or (None, why there is none); ``use_host_mofed`` says whose tree the mount holds."""
    tried = candidates(paths, kernel, arch)
    for d in tried:
        if d.is_dir():
            try:
                if exports_peer_memory(d / "Module.symvers"):
                    return d, ""
            except UnreadableInput as exc:
                return None, str(exc)
            return None, "%s has no Module.symvers exporting %s" % (
                d / "Module.symvers",
                " and ".join(PEER_MEMORY_SYMBOLS),
            )
    source = "the host's MOFED (USE_HOST_MOFED=true)" if use_host_mofed else "the MOFED driver container"
    return None, "no MOFED kernel tree from %s for kernel %s (looked in %s)" % (
        source,
        kernel,
        ", ".join(str(d) for d in tried),
    )


def prepare_build(ofa: Path, workdir: Path, scratch: Path) -> Tuple[List[str], bool]:
    """Make the build in ``workdir`` use ``ofa``: returns make's extra arguments and whether the
    conftest could be pointed at it (when not, the check after the build decides)."""
    root = scratch / ("ofa_kernel-%d" % os.getpid())
    replace_symlink(root / "default", ofa)
    conftest = workdir / "conftest.sh"
    pointed = False
    if conftest.is_file():
        text = conftest.read_text(errors="surrogateescape")
        if _CONFTEST_LINE in text:
            conftest.write_text(
                text.replace(_CONFTEST_LINE, "MLNX_OFED_KERNEL_DIR=%s" % root), errors="surrogateescape"
            )
            pointed = True
    return ["OFA_DIR=%s" % root], pointed


def imports_peer_memory(module: Path) -> bool:
    """The built ``nvidia-peermem.ko`` calls MOFED's peer-memory API (undefined symbols it imports)."""
    undefined = undefined_symbols(module)
    return all(s in undefined for s in PEER_MEMORY_SYMBOLS)
