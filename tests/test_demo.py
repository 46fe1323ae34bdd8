"""scripts/demo, the README's main job, does what the README says (slow: a real build and a VM boot)."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
from conftest import REPO
from harness import installed_kernel

pytestmark = [pytest.mark.slow, pytest.mark.kbuild, pytest.mark.vm]


def test_demo_builds_hands_over_and_loads_in_the_vm_then_serves_from_the_cache():
    kernel = installed_kernel(r"6\.1\.0-\d+-amd64")
    if not shutil.which("qemu-system-x86_64"):
        pytest.skip("qemu-system-x86_64 is not installed (scripts/test installs it)")
    shutil.rmtree(REPO / ".cache/demo", ignore_errors=True)
    first = subprocess.run(
        [str(REPO / "scripts/demo"), "--no-install", "--kernel", kernel], capture_output=True, text=True, timeout=3000
    )
    print(first.stdout[-3000:])
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "the DTK side is building" in first.stdout  # not silent while make runs
    assert re.search(r"^hand-off\s+[\d.]+\s+built by the DTK side \(kbuild\); verified nvidia\.ko", first.stdout, re.M)
    assert re.search(
        r"^load\s+[\d.]+\s+init took the modules from the host cache; could not load nvidia: No such "
        r"device \(ENODEV\): no NVIDIA GPU is visible to the kernel",
        first.stdout,
        re.M,
    ), first.stdout
    second = subprocess.run(
        [str(REPO / "scripts/demo"), "--no-install", "--no-vm", "--kernel", kernel],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert re.search(r"^hand-off\s+[\d.]+\s+from the host cache, no build", second.stdout, re.M)
