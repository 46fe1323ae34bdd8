"""A second NVIDIA branch: trixie's 550.163.01 sources (scripts/setup-test-deps fetches them with a private
apt state) against this machine's installed Debian kernels, each cell an ``update -k KVER --check`` (the
preflight: the real builder, nothing stored). The flavour rule (auto: 550 < 560, proprietary), the
version handling and the builder proven on a second branch beside 535 (test_build_real.py).

Recorded matrix (branch, flavour, kernel: outcome):

- 550 proprietary (auto), bookworm 6.1:     builds
- 550 open,               bookworm 6.1:     fails: nvidia/nv-pci.c: too few arguments to function
                                            'pci_resize_resource' (Debian's 6.1 stable took the 6.2 change;
                                            the same cell fails for 535)
- 550 proprietary,        backports 6.12:   builds
- 550 open,               backports 6.12:   builds
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from harness import env_for, events, installed_kernel, make_real_kernel_root, nvd

pytestmark = [pytest.mark.slow, pytest.mark.kbuild]

VERSION = "550.163.01"
SOURCES = Path(os.environ.get("DRIVER_CTR_TEST_CACHE", "/var/cache/driver-ctr-test")) / ("nvidia-" + VERSION)
K61, K612 = r"6\.1\.0-\d+-amd64", r"6\.12\.\d+\+deb12-amd64"
PCI_RESIZE = "nvidia/nv-pci.c:237:9: error: too few arguments to function 'pci_resize_resource'"


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
def test_the_550_branch_on_debian_kernels(root, tmp_path, kernel_pattern, module_type, flavour, failure):
    if not (SOURCES / "kernel/Makefile").is_file() or not (SOURCES / "kernel-open/Makefile").is_file():
        pytest.skip("NVIDIA %s sources not unpacked at %s (scripts/setup-test-deps does it)" % (VERSION, SOURCES))
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
    building = next(e for e in events(r.stderr) if e["event"] == "building")
    assert building["flavour"] == flavour
    if module_type == "auto":
        assert "branch 550 < 560" in building["reason"]
    if failure is None:
        assert r.returncode == 0 and r.stdout.startswith("%s: pass (" % kernel), r.stdout + r.stderr[-2000:]
    else:
        assert r.returncode == 1 and r.stdout.strip() == "%s: fail: %s" % (kernel, failure), r.stdout
