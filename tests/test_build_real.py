"""The real NVIDIA 535.261.03 kernel sources built for real Debian kernels
(slow: about 2 minutes a build on 2 CPUs).

- proprietary for bookworm's 6.1: builds;
- open for the backports 6.12: builds;
- open for 6.1: fails to compile (pci_resize_resource, changed in the 6.1
  stable series): the real "this driver does not support this kernel" case.

Successful builds are kept between runs in the project's own host cache,
under ``.cache/real-builds/<key>``, where the key digests the sources, the
kernel and the builder's code: a rerun with nothing changed restores from
there (the test says which happened); ``DRIVER_CTR_TEST_REBUILD=1`` forces a
build. The failure case always compiles.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Dict, Optional

import pytest
from conftest import REPO
from harness import (
    PROMPT_S,
    env_for,
    events,
    finish,
    installed_kernel,
    make_real_kernel_root,
    make_shared_dir,
    start_driver,
    start_dtk,
    stop,
    wait_for_file,
)

from driver_ctr.toolkit.modinfo import read_modinfo

pytestmark = [pytest.mark.slow, pytest.mark.kbuild]

NVIDIA_VERSION = "535.261.03"
SOURCES = Path(os.environ.get("DRIVER_CTR_TEST_CACHE", "/var/cache/driver-ctr-test")) / ("nvidia-" + NVIDIA_VERSION)
NV = "kernel/drivers/video"
# The code that decides what is built and staged: a change to it rebuilds.
BUILD_CODE = (
    "kbuild.py",
    "staging.py",
    "sources.py",
    "kernel_tree.py",
    "signing.py",
    "jobs.py",
    "modinfo.py",
    "mofed.py",
    "builders.py",
    "nvidia_modules.py",
    "protocol.py",
    "host_cache.py",
)


def _sources() -> Path:
    if not (SOURCES / "kernel/Makefile").is_file() or not (SOURCES / "kernel-open/Makefile").is_file():
        pytest.skip(
            "NVIDIA %s kernel sources not unpacked at %s (scripts/setup-test-deps does it)" % (NVIDIA_VERSION, SOURCES)
        )
    return SOURCES


def _digest_tree(h: "hashlib._Hash", root: Path) -> None:
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode())
            h.update(hashlib.sha256(p.read_bytes()).digest())


def _artefact_cache(kernel: str, flavour: str, extra: Optional[Dict[str, str]] = None) -> Path:
    """A persistent host-cache directory keyed by sources, kernel, settings and our code."""
    h = hashlib.sha256()
    h.update(("%s\0%s\0%s\0" % (kernel, flavour, sorted((extra or {}).items()))).encode())
    _digest_tree(h, SOURCES / {"proprietary": "kernel", "open": "kernel-open"}[flavour])
    for name in BUILD_CODE:
        h.update(hashlib.sha256((REPO / "driver_ctr/toolkit" / name).read_bytes()).digest())
    d = REPO / ".cache" / "real-builds" / ("%s-%s-%s" % (kernel, flavour, h.hexdigest()[:16]))
    if os.environ.get("DRIVER_CTR_TEST_REBUILD") == "1":
        shutil.rmtree(str(d), ignore_errors=True)
    d.mkdir(parents=True, exist_ok=True)
    # keep the two newest per kernel and flavour
    olds = sorted(d.parent.glob("%s-%s-*" % (kernel, flavour)), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in olds[2:]:
        shutil.rmtree(str(old), ignore_errors=True)
    return d


def _build(root: Path, tmp_path: Path, kernel: str, flavour: str, cache: bool = True, **extra: str):
    make_real_kernel_root(root, kernel)
    env = env_for(
        root, kernel, DRIVER_CTR_SOURCE_DIR=str(_sources()), KERNEL_MODULE_TYPE=flavour, TMPDIR=str(tmp_path), **extra
    )
    env["PATH"] = env["PATH"] + ":/sbin:/usr/sbin"
    if cache:
        link = root / "var/lib/driver-ctr/cache"
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(_artefact_cache(kernel, flavour, extra))
    shared = make_shared_dir(root)
    t0 = time.monotonic()
    drv = start_driver(env)
    dtk = start_dtk(env, shared)
    try:
        d = finish(drv, 1800)
    finally:
        if dtk.poll() is None:
            stop(dtk, timeout=30)
    dtk = finish(dtk, 30)
    elapsed = time.monotonic() - t0
    manifest = json.loads((shared / "manifest.json").read_text())
    how = (manifest.get("build") or {}).get("builder", "none")
    print("%s %s: %s in %.0f s" % (flavour, kernel, how, elapsed))
    return d, dtk, shared, manifest


def _check_real_modules(shared: Path, manifest: dict, kernel: str, flavour: str) -> None:
    det = manifest["build"]["details"]
    assert det["flavour"] == flavour and det["tree"] == {"proprietary": "kernel", "open": "kernel-open"}[flavour]
    mods = shared / "modules" / NV
    infos = {n: read_modinfo(mods / (n + ".ko")) for n in ("nvidia", "nvidia-uvm", "nvidia-modeset")}
    for n, i in infos.items():
        assert i.version == NVIDIA_VERSION, n
        assert i.vermagic.startswith(kernel + " ") and i.vermagic == det["reference_vermagic"], n
    assert infos["nvidia"].depends == ["drm"]
    assert infos["nvidia-uvm"].depends == ["nvidia"]
    assert sorted(infos["nvidia-modeset"].depends) == ["nvidia", "video"]
    assert "NVreg_EnableGpuFirmware" in infos["nvidia"].parameters
    files = {f["path"] for f in manifest["build"]["files"]}
    drm = [f for f in files if re.search(r"/drm/drm\.ko(\.xz|\.zst)?$", f)]
    video = [f for f in files if re.search(r"/acpi/video\.ko(\.xz|\.zst)?$", f)]
    assert drm and video, sorted(files)
    dep = (shared / "modules/modules.dep").read_text()
    assert re.search(r"^%s/nvidia\.ko: .*drm\.ko" % NV, dep, re.M)


def test_proprietary_535_builds_for_bookworm_6_1(root, tmp_path):
    k = installed_kernel(r"6\.1\.0-\d+-amd64")
    d, dtk, shared, m = _build(root, tmp_path, k, "proprietary")
    assert d.returncode == 0, d.stderr[-3000:] + dtk.stderr[-3000:]
    _check_real_modules(shared, m, k, "proprietary")
    assert (shared / "modules" / NV / "nvidia.ko").stat().st_size > 10_000_000  # nv-kernel.o_binary linked in


def test_rdma_and_gds_real_535_peermem_against_mofed_and_the_real_nvidia_fs(root, tmp_path):
    """One real build with GPUDirect RDMA and GDS on:

    - MOFED's tree (a stand-in with its Module.symvers layout): NVIDIA's Kbuild and conftest see it, and the
      real nvidia-peermem.ko imports ib_register/unregister_peer_memory_client (without them its init fails
      with EINVAL); MOFED's ib_core is not staged;
    - GDS: Debian's real nvidia-fs 2.13 sources, put in the shared dir as the GDS sidecar does, build after
      the GPU driver against this build's own nvidia_p2p_* symbol versions, then nvidia_fs_built."""
    from harness import make_ofa_kernel

    from driver_ctr.toolkit.modinfo import undefined_symbols

    nvfs = SOURCES.parent / "nvidia-fs-2.13"
    if not (nvfs / "Makefile").is_file():
        pytest.skip("nvidia-fs sources not unpacked at %s (scripts/setup-test-deps does it)" % nvfs)
    k = installed_kernel(r"6\.1\.0-\d+-amd64")
    make_real_kernel_root(root, k)
    make_ofa_kernel(root / "run/mellanox/drivers/usr/src/ofa_kernel/x86_64" / k)
    env = env_for(
        root,
        k,
        DRIVER_CTR_SOURCE_DIR=str(_sources()),
        KERNEL_MODULE_TYPE="proprietary",
        TMPDIR=str(tmp_path),
        GPU_DIRECT_RDMA_ENABLED="true",
        GDS_ENABLED="true",
    )
    env["PATH"] = env["PATH"] + ":/sbin:/usr/sbin"
    shared = make_shared_dir(root)
    shutil.copytree(str(nvfs), str(shared / "gds-nvidia-fs/src"))  # the GDS sidecar's copy
    drv = start_driver(env)
    dtk = start_dtk(env, shared)
    try:
        d = finish(drv, 1800)
        assert d.returncode == 0, d.stderr[-3000:]
        for _ in range(1200):
            if (shared / "nvidia_fs_built").exists() or (shared / "nvidia_fs_build_failed").exists():
                break
            time.sleep(0.5)
    finally:
        if dtk.poll() is None:
            stop(dtk, timeout=30)
    r = finish(dtk, 30)
    m = json.loads((shared / "manifest.json").read_text())
    _check_real_modules(shared, m, k, "proprietary")
    peermem = shared / "modules" / NV / "nvidia-peermem.ko"
    assert {"ib_register_peer_memory_client", "ib_unregister_peer_memory_client"} <= undefined_symbols(peermem)
    info = read_modinfo(peermem)
    assert "ib_core" in info.depends and "nvidia" in info.depends and info.version == NVIDIA_VERSION
    assert m["build"]["details"]["not_built"] == {}
    assert not list((shared / "modules").rglob("ib_core.ko*"))
    # GDS
    assert (shared / "nvidia_fs_built").exists(), (shared / "build.log").read_text()[-3000:] + r.stderr[-2000:]
    nvidia_fs = read_modinfo(shared / "gds-nvidia-fs/src/nvidia-fs.ko")
    assert nvidia_fs.name == "nvidia_fs" and nvidia_fs.vermagic == m["build"]["details"]["reference_vermagic"]
    # 2.13 looks nvidia_p2p_* up when it loads (__symbol_get), against this build's nv-p2p.h
    assert "__symbol_get" in undefined_symbols(shared / "gds-nvidia-fs/src/nvidia-fs.ko")
    log = (shared / "build.log").read_text()
    assert "NVIDIA_SRC_DIR=%s/kernel/nvidia" % _sources() in log
    assert (root / ("usr/src/nvidia-%s/kernel/nvidia/nv-p2p.h" % NVIDIA_VERSION)).is_file()


def test_open_535_builds_for_backports_6_12(root, tmp_path):
    k = installed_kernel(r"6\.12\.\d+\+deb12-amd64")
    d, dtk, shared, m = _build(root, tmp_path, k, "open")
    assert d.returncode == 0, d.stderr[-3000:] + dtk.stderr[-3000:]
    _check_real_modules(shared, m, k, "open")


def test_open_535_fails_for_6_1_with_the_compiler_error(root, tmp_path):
    """The real build failure: the error line reaches the driver side, nothing is staged."""
    k = installed_kernel(r"6\.1\.0-\d+-amd64")
    make_real_kernel_root(root, k)
    env = env_for(root, k, DRIVER_CTR_SOURCE_DIR=str(_sources()), KERNEL_MODULE_TYPE="open", TMPDIR=str(tmp_path))
    env["PATH"] = env["PATH"] + ":/sbin:/usr/sbin"
    shared = make_shared_dir(root)
    drv = start_driver(env)
    dtk = start_dtk(env, shared)
    wait_for_file(shared / "driver_build_failed", timeout=1500)
    t0 = time.monotonic()
    d = finish(drv, 60)
    took = time.monotonic() - t0
    r = finish(dtk, 60)
    assert d.returncode == 1 and r.returncode == 1
    assert took < PROMPT_S
    body = json.loads((shared / "driver_build_failed").read_text())
    assert body["phase"] == "compile"
    assert "error: too few arguments to function 'pci_resize_resource'" in body["message"]
    assert body["message"].startswith("nvidia/nv-pci.c:")
    assert "pci_resize_resource" in d.stderr
    failed = [e for e in events(d.stderr) if e.get("outcome") == "failed"]
    assert failed
    assert not (shared / "modules").exists() and not (shared / "driver_built").exists()
    assert not list(shared.glob(".modules.staging-*")) and not list(tmp_path.glob("driver-ctr/build-*"))
