"""images/: the Containerfiles lint clean, say what the reference's image says, and the DTK stand-in runs
the operator's exact DTK command; the slow test runs scripts/podman-e2e (both images built, the real 535
modules built in the DTK container and verified by the driver container, the host cache, a broken DTK)."""

from __future__ import annotations

import json
import re
import subprocess

import pytest
import yaml
from conftest import REPO, need_tool
from harness import podman_env, podman_unavailable

CONTAINERFILES = sorted(REPO.glob("images/*/Containerfile"))
GOLDEN = REPO / "tests/data/gpu-operator-golden-driver-openshift-drivertoolkit.yaml"


def _instruction(path, name):
    """The JSON argument of the last ``NAME [...]`` instruction."""
    lines = [line for line in path.read_text().splitlines() if line.startswith(name + " ")]
    return json.loads(lines[-1][len(name) + 1 :])


def test_every_containerfile_lints_clean():
    hadolint = need_tool("hadolint")
    assert {p.parent.name for p in CONTAINERFILES} == {"debian", "rhel9", "dtk-standin"}
    r = subprocess.run([hadolint, *map(str, CONTAINERFILES)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_the_top_level_containerfile_is_the_ubi9_image():
    top = REPO / "Containerfile"
    assert top.resolve() == (REPO / "images/rhel9/Containerfile").resolve()
    assert "STUB" not in top.read_text()


@pytest.mark.parametrize("distro", ["debian", "rhel9"])
def test_driver_images_start_like_the_reference(distro):
    path = REPO / "images" / distro / "Containerfile"
    assert _instruction(path, "ENTRYPOINT") == ["nvidia-driver"] and _instruction(path, "CMD") == ["init"]
    text = path.read_text()
    assert "COPY drivers/ /drivers/" in text and re.search(r"PATH=/opt/driver-ctr/bin:", text)
    assert "--no-index" in text  # the image build needs no package index: wheels come in the context


def test_the_dtk_standin_runs_the_operators_exact_command():
    ds = next(d for d in yaml.safe_load_all(GOLDEN.read_text()) if d and d["kind"] == "DaemonSet")
    dtk = next(c for c in ds["spec"]["template"]["spec"]["containers"] if c["name"] == "openshift-driver-toolkit-ctr")
    assert _instruction(REPO / "images/dtk-standin/Containerfile", "CMD") == dtk["command"] + dtk["args"]


@pytest.mark.slow
def test_podman_e2e():
    why = podman_unavailable()
    if why:
        pytest.skip(why)
    r = subprocess.run([str(REPO / "scripts/podman-e2e")], capture_output=True, text=True, timeout=3600)
    print(r.stdout[-3000:])
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
    assert "all scenarios passed" in r.stdout
    build = re.search(r"^build\s+[\d.]+\s+built by the DTK container, verified (.*)$", r.stdout, re.M)
    assert build and {"nvidia.ko", "nvidia-uvm.ko", "nvidia-modeset.ko"} <= set(re.split(r"[ ,+]+", build.group(1)))
    assert re.search(r"^cache\s+[\d.]+\s+served from the host cache, no build", r.stdout, re.M)
    assert re.search(r"^broken\s+[\d.]+\s+broken DTK", r.stdout, re.M)


@pytest.mark.slow
@pytest.mark.kbuild
def test_the_debian_image_carries_precompiled_bundles_and_no_kernel_tree():
    """PRECOMPILED_KERNELS: a build stage runs `update -k` with the kernel's .debs as a node-local
    repository (no network, scripts/kernel-debs); the final image holds the bundle, not the kernel's
    trees, and `status` lists the kernels it carries."""
    from harness import installed_kernel

    why = podman_unavailable()
    if why:
        pytest.skip(why)
    need_tool("apt-get")
    kernel = installed_kernel(r"6\.1\.0-\d+-amd64")  # the archive's current 6.1: its .debs are there
    from test_build_real import SOURCES as sources

    if not (sources / "kernel/Makefile").is_file():
        pytest.skip("NVIDIA sources not unpacked at %s (scripts/setup-test-deps)" % sources)
    run = REPO / ".cache/images/precompiled/NVIDIA-Linux-x86_64-535.261.03.run"
    if not run.is_file():
        run.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([str(REPO / "scripts/make-standin-run"), str(sources), str(run)], check=True)
    env = podman_env()
    tag = "localhost/driver-ctr/driver:precompiled-test"
    r = subprocess.run(
        [str(REPO / "scripts/build-image"), "--run", str(run), "--tag", tag, "--precompiled-kernels", kernel],
        capture_output=True,
        text=True,
        env=dict(env, PYTHONPATH=str(REPO)),
        timeout=3600,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    try:
        st = subprocess.run(
            ["podman", "run", "--rm", "-e", "DRIVER_CTR_KERNEL_RELEASE=" + kernel, tag, "status", "--json"],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
        assert st.returncode == 0, st.stderr[-3000:]
        assert json.loads(st.stdout)["precompiled_kernels"] == [kernel]

        def sh(command: str) -> str:
            argv = ["podman", "run", "--rm", "--entrypoint", "sh", tag, "-c", command]
            return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300).stdout

        assert "linux-headers" not in sh("ls /usr/src") and kernel not in sh("ls /lib/modules 2>&1")
        video = sh("ls /usr/src/nvidia-535.261.03/kernel/precompiled/%s/*/modules/kernel/drivers/video" % kernel)
        assert {"nvidia.ko", "nvidia-uvm.ko", "nvidia-modeset.ko"} <= set(video.split()), video
    finally:
        subprocess.run(["podman", "rmi", "-f", tag], capture_output=True, env=env)
