"""A second NVIDIA branch: trixie's 550.163.01 sources (scripts/setup-test-deps fetches them with a private
apt state) against Debian kernels, each cell an ``update -k KVER --check`` (the preflight: the real builder,
nothing stored). The flavour rule (auto: 550 < 560, proprietary), the version handling and the builder
proven on a second branch beside 535 (test_build_real.py).

bookworm's kernels (installed here) are built on this machine. trixie's own kernels come with trixie's
kbuild binaries and gcc-14, which do not run on bookworm: their cells run in the Debian 13 driver image
(scripts/build-image --distro debian13), the kernel's .debs handed to it as a node-local repository
(scripts/kernel-debs with the private trixie apt state), exactly as an image build stage or a CI job would
run the preflight for a kernel it is about to meet.

Recorded matrix (branch, flavour, kernel: outcome; the newest kernel of each series in the archive):

- 550 proprietary (auto), bookworm 6.1:           builds
- 550 open,               bookworm 6.1:           fails: nvidia/nv-pci.c: too few arguments to function
                                                  'pci_resize_resource' (Debian's 6.1 stable took the 6.2
                                                  change; the same cell fails for 535)
- 550 proprietary,        bookworm-backports 6.12: builds (6.12.95)
- 550 open,               bookworm-backports 6.12: builds (6.12.95)
- 550 proprietary (auto), trixie 6.12:            builds (6.12.117, gcc-14)
- 550 open,               trixie 6.12:            fails: the same 'pci_resize_resource' error (6.12 stable
                                                  took the change between 6.12.95 and 6.12.117)
- 550 proprietary (auto), trixie-backports 7.x:   fails: common/inc/nv-mm.h: 'struct vm_area_struct' has
                                                  no member named '__vm_flags' (7.3.4)
- 550 open,               trixie-backports 7.x:   fails: the same '__vm_flags' error
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import subprocess
import warnings
from pathlib import Path

import pytest
from conftest import REPO
from harness import env_for, events, installed_kernel, make_real_kernel_root, nvd, podman_env, podman_unavailable

pytestmark = [pytest.mark.slow, pytest.mark.kbuild]

VERSION = "550.163.01"
CACHE = Path(os.environ.get("DRIVER_CTR_TEST_CACHE", "/var/cache/driver-ctr-test"))
SOURCES = CACHE / ("nvidia-" + VERSION)
TRIXIE_APT = CACHE / "apt-trixie/apt.conf"  # scripts/setup-test-deps: the private trixie apt state
K61, K612 = r"6\.1\.0-\d+-amd64", r"6\.12\.\d+\+deb12-amd64"
PCI_RESIZE = "nvidia/nv-pci.c:237:9: error: too few arguments to function 'pci_resize_resource'"
VM_FLAGS = (
    "././common/inc/nv-mm.h:315:25: error: 'struct vm_area_struct' has no member named '__vm_flags'; "
    "did you mean 'vm_flags'?"
)
T612, T7 = r"6\.12\.\d+\+deb13-amd64", r"7\.\d+\.\d+\+deb13-amd64"
RECORDED_7 = "7.3."  # the backports series the 7.x errors were recorded on; backports keeps only its newest


@pytest.mark.parametrize(
    "kernel_pattern, module_type, flavour, failure",
    [
        (K61, "auto", "proprietary", None),
        (K61, "open", "open", PCI_RESIZE),
        (K612, "proprietary", "proprietary", None),
        (K612, "open", "open", None),
    ],
    ids=["6.1-auto-proprietary", "6.1-open", "6.12-proprietary", "6.12-open"],
)
def test_the_550_branch_on_bookworm_kernels(root, tmp_path, kernel_pattern, module_type, flavour, failure):
    _need_sources()
    kernel = installed_kernel(kernel_pattern)
    make_real_kernel_root(root, kernel)
    env = env_for(
        root,
        kernel,
        DRIVER_VERSION=VERSION,
        DRIVER_CTR_SOURCE_DIR=str(SOURCES),
        KERNEL_MODULE_TYPE=module_type,
        TMPDIR=str(tmp_path),
    )
    env["PATH"] = env["PATH"] + ":/sbin:/usr/sbin"
    r = nvd(env, "update", "-k", kernel, "--check", timeout=2400)
    _assert_cell(r, kernel, module_type, flavour, failure)


@pytest.mark.parametrize(
    "kernel_pattern, module_type, flavour, failure",
    [
        (T612, "auto", "proprietary", None),
        (T612, "open", "open", PCI_RESIZE),
        (T7, "auto", "proprietary", VM_FLAGS),
        (T7, "open", "open", VM_FLAGS),
    ],
    ids=["trixie-6.12-auto-proprietary", "trixie-6.12-open", "trixie-7-auto-proprietary", "trixie-7-open"],
)
def test_the_550_branch_on_trixie_kernels(trixie_image, kernel_pattern, module_type, flavour, failure):
    kernel = _newest_trixie_kernel(kernel_pattern)
    if kernel_pattern == T7 and not kernel.startswith(RECORDED_7):
        # backports moved on: 550 must still fail there, but its first error is new to the record
        warnings.warn("trixie-backports now has %s: record its 7.x errors in %s" % (kernel, __file__), stacklevel=1)
        failure = re.compile(r".+: error: .+")
    debs = _kernel_debs(kernel)
    argv = ["podman", "run", "--rm", "-v", "%s:/src:ro" % SOURCES, "-v", "%s:/debs:ro" % debs]
    for name, value in (
        ("DRIVER_VERSION", VERSION),
        ("DRIVER_CTR_SOURCE_DIR", "/src"),
        ("DRIVER_CTR_LOCAL_REPO", "/debs"),  # the kernel's trees installed the fallback's way, no network
        ("DRIVER_CTR_USERSPACE", "none"),
        ("KERNEL_MODULE_TYPE", module_type),
    ):
        argv += ["-e", "%s=%s" % (name, value)]
    r = subprocess.run(
        argv + [trixie_image, "update", "-k", kernel, "--check"],
        capture_output=True,
        text=True,
        env=podman_env(),
        timeout=2400,
    )
    assert any(e["event"] == "kernel packages unpacked" for e in events(r.stderr)), r.stderr[-3000:]
    _assert_cell(r, kernel, module_type, flavour, failure)


def _assert_cell(r: subprocess.CompletedProcess, kernel: str, module_type: str, flavour: str, failure) -> None:
    building = next((e for e in events(r.stderr) if e["event"] == "building"), None)
    assert building is not None, r.stdout + r.stderr[-3000:]
    assert building["flavour"] == flavour
    if module_type == "auto":
        assert "branch 550 < 560" in building["reason"]
    if failure is None:
        assert r.returncode == 0 and r.stdout.startswith("%s: pass (" % kernel), r.stdout + r.stderr[-2000:]
    elif isinstance(failure, re.Pattern):
        assert r.returncode == 1, r.stdout + r.stderr[-2000:]
        assert re.fullmatch("%s: fail: %s" % (re.escape(kernel), failure.pattern), r.stdout.strip()), r.stdout
    else:
        assert r.returncode == 1 and r.stdout.strip() == "%s: fail: %s" % (kernel, failure), r.stdout


def _need_sources() -> None:
    if not (SOURCES / "kernel/Makefile").is_file() or not (SOURCES / "kernel-open/Makefile").is_file():
        pytest.skip("NVIDIA %s sources not unpacked at %s (scripts/setup-test-deps does it)" % (VERSION, SOURCES))


def _trixie_env() -> dict:
    if not TRIXIE_APT.is_file():
        pytest.skip("no private trixie apt state at %s (scripts/setup-test-deps makes it)" % TRIXIE_APT)
    return dict(os.environ, APT_CONFIG=str(TRIXIE_APT), LC_ALL="C")


def _newest_trixie_kernel(pattern: str) -> str:
    """The newest kernel of trixie (or trixie-backports) matching ``pattern``: the archive moves its ABI."""
    r = subprocess.run(
        ["apt-cache", "search", "--names-only", "^linux-headers-"],
        capture_output=True,
        text=True,
        env=_trixie_env(),
        check=True,
    )
    names = {line.split()[0][len("linux-headers-") :] for line in r.stdout.splitlines() if line.strip()}
    kernels = [k for k in names if re.fullmatch(pattern, k)]
    if not kernels:
        pytest.skip("the trixie archive holds no kernel matching %s" % pattern)
    return max(kernels, key=lambda k: [int(n) for n in re.findall(r"\d+", k)])


def _kernel_debs(kernel: str) -> Path:
    """The kernel's .debs (scripts/kernel-debs), cached per kernel under the test cache."""
    debs = CACHE / "kernel-debs" / kernel
    if not debs.is_dir():
        part = debs.with_name(debs.name + ".part")
        shutil.rmtree(part, ignore_errors=True)
        subprocess.run(
            [str(REPO / "scripts/kernel-debs"), "-o", str(part), kernel],
            env=_trixie_env(),
            check=True,
            capture_output=True,
            timeout=1800,
        )
        part.rename(debs)
    return debs


@pytest.fixture(scope="module")
def trixie_image():
    """The Debian 13 driver image (trixie's Python, gcc-14 and kbuild's tools), built for this module."""
    why = podman_unavailable()
    if why:
        pytest.skip(why)
    _need_sources()
    _trixie_env()
    tag = "localhost/driver-ctr/driver:%s-matrix-debian13-%d" % (VERSION, os.getpid())  # one per xdist worker
    lock = REPO / ".cache/images/matrix-debian13.lock"  # xdist workers build one at a time (the layers are shared)
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(str(lock), "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        r = subprocess.run(
            [str(REPO / "scripts/build-image"), "--distro", "debian13", "--driver-version", VERSION, "--tag", tag],
            capture_output=True,
            text=True,
            env=dict(podman_env(), PYTHONPATH=str(REPO)),
            timeout=3600,
        )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    yield tag
    subprocess.run(["podman", "rmi", "-f", tag], capture_output=True, env=podman_env())
