"""Precompiled bundles (``update -k``, ``build``): modules built ahead of time for a list of kernels,
used at start with no build, verified like a host-cache entry; ``update -k --check`` as a preflight.

Fixture sources through the real kbuild builder against this machine's installed kernels (about 3 s a
build); the real 535 builds and the VM are in the slow tier at the end."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from harness import (
    REPO,
    copy_fixture_sources,
    env_for,
    events,
    installed_kernel,
    make_real_kernel_root,
    make_shared_dir,
    nvd,
    run_both,
)

from driver_ctr.toolkit.modinfo import SIGNATURE_TRAILER

pytestmark = pytest.mark.kbuild
STORE = "usr/src/nvidia-535.261.03/kernel/precompiled"
NV = "kernel/drivers/video"


def _image(root: Path, tmp_path: Path, *kernels: str, **extra: str) -> dict:
    """A driver image's root with the kernels' build trees (an image build stage) and fixture sources."""
    for k in kernels:
        make_real_kernel_root(root, k)
    src = copy_fixture_sources(tmp_path / "src", flavours=("kernel", "kernel-open"))
    env = env_for(root, kernels[0], DRIVER_CTR_SOURCE_DIR=str(src), TMPDIR=str(tmp_path), **extra)
    env["PATH"] = env["PATH"] + ":/sbin:/usr/sbin"
    return env


def _bundles(root: Path) -> dict:
    out = {}
    for entry in sorted((root / STORE).glob("*/*/entry.json")):
        out[entry.parent.parent.name] = json.loads(entry.read_text())
    return out


@pytest.fixture(name="kernels")
def _kernels():
    return installed_kernel(r"6\.1\.0-\d+-amd64"), installed_kernel(r"6\.12\.\d+\+deb12-amd64")


def test_update_k_stores_a_bundle_per_kernel_and_init_takes_its_own_without_a_build(root, tmp_path, kernels):
    k61, k612 = kernels
    env = _image(root, tmp_path, k61, k612)
    for k in (k61, k612):
        r = nvd(env, "update", "-k", k, "-m", "1", timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        assert r.stdout.startswith("%s: bundle %s/%s/" % (k, root / STORE, k))
    bundles = _bundles(root)
    assert sorted(bundles) == sorted([k61, k612])
    for k, b in bundles.items():
        assert b["inputs"]["kernel_release"] == k and b["inputs"]["driver_config_digest"] == ""
        mods = [f for f in b["build"]["files"] if f["path"].startswith(NV)]
        assert mods and all(f["vermagic"].startswith(k + " ") and len(f["sha256"]) == 64 for f in mods)
    # the node runs 6.1: init takes 6.1's bundle, no build, no package manager (then this machine refuses)
    node = dict(env, DRIVER_CTR_KERNEL_RELEASE=k61, DRIVER_CONFIG_DIGEST="1234")  # any cluster configuration
    r = nvd(node, "init", timeout=120)
    ev = events(r.stderr)
    found = [e for e in ev if e["event"] == "modules found"]
    assert found and found[0]["source"] == "precompiled", r.stderr[-3000:]
    assert not any(e["event"] in ("building", "falling back to the entitlement-based build") for e in ev)
    assert "could not load nvidia" in r.stderr
    # a kernel the image does not carry: the log says which it does, and the next source builds
    other = installed_kernel(r"6\.1\.0-\d+-rt-amd64")
    make_real_kernel_root(root, other)
    r = nvd(dict(node, DRIVER_CTR_KERNEL_RELEASE=other, IGNORE_PREEMPT_RT_PRESENCE="1"), "init", timeout=300)
    miss = next(e for e in events(r.stderr) if e["event"] == "no precompiled bundle for this kernel")
    assert miss["image_carries"] == sorted([k61, k612]) and miss["kernel"] == other
    assert any(e["event"] == "building" for e in events(r.stderr))


def test_an_altered_bundle_is_refused_and_the_next_source_used(root, tmp_path, kernels):
    k61, _ = kernels
    env = _image(root, tmp_path, k61)
    assert nvd(env, "update", "-k", k61, timeout=300).returncode == 0
    ko = next((root / STORE / k61).glob("*/modules/%s/nvidia.ko" % NV))
    ko.write_bytes(ko.read_bytes() + b"\0")
    r = nvd(env, "init", timeout=300)
    ev = events(r.stderr)
    assert any(e["event"] == "host cache entry is corrupt: discarded, never loaded" for e in ev), r.stderr[-3000:]
    found = next(e for e in ev if e["event"] == "modules found" or e["event"] == "building")
    assert found["event"] == "building"  # the altered file was never loaded: a local build instead
    assert not (root / STORE / k61).exists() or not list((root / STORE / k61).glob("*/entry.json"))


def test_check_is_a_preflight_that_names_the_first_compiler_error_and_stores_nothing(root, tmp_path, kernels):
    k61, _ = kernels
    env = _image(root, tmp_path, k61)
    src = Path(env["DRIVER_CTR_SOURCE_DIR"]) / "kernel/nvidia.c"
    src.write_text(src.read_text().replace("return misc_register(&nvfx_ctl);", "return pci_resize_resource(0, 1);"))
    r = nvd(env, "update", "-k", k61, "--check", timeout=300)
    assert r.returncode == 1
    assert r.stdout.startswith("%s: fail: nvidia.c:" % k61) and "pci_resize_resource" in r.stdout, r.stdout
    assert not (root / STORE).exists()
    shutil.copy2(str(REPO / "tests/fixtures/nvidia-src/kernel/nvidia.c"), str(src))
    r = nvd(env, "update", "-k", k61, "--check", timeout=300)
    assert r.returncode == 0 and "pass" in r.stdout and "nothing stored" in r.stdout
    assert not (root / STORE).exists()


def test_a_signed_bundle_carries_the_signature_and_the_key_stays_outside(root, tmp_path, kernels):
    k61, _ = kernels
    openssl = shutil.which("openssl") or pytest.skip("openssl is not installed")
    keys = tmp_path / "keys"
    keys.mkdir()
    subprocess.run(
        [openssl, "req", "-new", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=bundle"]
        + ["-keyout", str(keys / "key.pem"), "-outform", "PEM", "-out", str(keys / "cert.pem")],
        check=True,
        capture_output=True,
    )
    env = _image(root, tmp_path, k61)
    r = nvd(env, "update", "-k", k61, "-s", "mykey", timeout=300)
    assert r.returncode == 1 and "DRIVER_CTR_SIGNING_KEY" in r.stderr  # -s names the key: it must be mounted
    signed = dict(env, DRIVER_CTR_SIGNING_KEY=str(keys / "key.pem"), DRIVER_CTR_SIGNING_CERT=str(keys / "cert.pem"))
    r = nvd(signed, "update", "-k", k61, "-s", "mykey", "-t", "ci-42", timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    (b,) = _bundles(root).values()
    assert b["signing_fingerprint"] and b["build"]["details"]["signing_key_id"] == "mykey"
    assert b["build"]["details"]["tag"] == "ci-42"
    for ko in (root / STORE).glob("%s/*/modules/%s/*.ko" % (k61, NV)):
        assert ko.read_bytes().endswith(SIGNATURE_TRAILER), ko
    key_text = (keys / "key.pem").read_bytes()
    assert not any(key_text in p.read_bytes() for p in (root / STORE).rglob("*") if p.is_file())
    # unsigned at run time: the signed bundle's inputs differ (the fingerprint), so it is not used
    r = nvd(env, "init", timeout=300)
    assert next(e for e in events(r.stderr) if e["event"] == "no precompiled bundle for this kernel")


def test_the_dtk_flow_hands_a_bundle_over_and_no_dtk_build_runs(root, tmp_path, kernels):
    k61, _ = kernels
    env = _image(root, tmp_path, k61)
    assert nvd(env, "update", "-k", k61, timeout=300).returncode == 0
    d, dtk = run_both(root, env)
    assert d.returncode == 0, d.stderr[-3000:]
    assert "hand-off verified from the precompiled bundle: no build needed" in d.stderr
    manifest = json.loads((make_shared_dir(root) / "manifest.json").read_text())
    assert manifest["build"]["details"]["precompiled_bundle"].startswith(str(root / STORE / k61))
    assert "building" not in [e["event"] for e in events(dtk.stderr)]


def test_gds_needs_this_nodes_build_so_no_bundle_serves_it(root, tmp_path, kernels):
    k61, _ = kernels
    env = _image(root, tmp_path, k61)
    assert nvd(env, "update", "-k", k61, timeout=300).returncode == 0
    r = nvd(dict(env, GDS_ENABLED="true"), "init", timeout=300)
    assert "precompiled" not in [e.get("source") for e in events(r.stderr) if e["event"] == "modules found"]


INIT_IN_GUEST = r"""
O=/run/out
mkdir -p /tmp/empty-shared
timeout 900 python -m driver_ctr nvidia-driver init > $O/init.out 2> $O/init.err; echo $? > $O/init.rc
"""


@pytest.mark.slow
@pytest.mark.vm
def test_real_535_bundles_for_two_kernels_each_loads_in_a_vm_of_its_kernel(root, tmp_path, kernels):
    """``update -k`` for bookworm's 6.1 (proprietary) and the backports' 6.12 (open, the flavour 535 supports
    there) from NVIDIA's real 535 sources in one image root; then each kernel booted in a VM runs ``init``,
    which takes its own bundle with no build and ends, as a machine without an NVIDIA GPU must, in the
    "no NVIDIA GPU" diagnosis."""
    import vm
    from test_build_real import _sources

    for k in kernels:
        why = vm.unavailable_reason(k)
        if why:
            pytest.skip(why)
        make_real_kernel_root(root, k)
    flavours = dict(zip(kernels, ("proprietary", "open")))
    env = env_for(root, kernels[0], DRIVER_CTR_SOURCE_DIR=str(_sources()), TMPDIR=str(tmp_path))
    env["PATH"] = env["PATH"] + ":/sbin:/usr/sbin"
    for k, flavour in flavours.items():
        r = nvd(dict(env, KERNEL_MODULE_TYPE=flavour), "update", "-k", k, timeout=2400)
        assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(_bundles(root)) == sorted(kernels)
    # the preflight on the real failing pair: the open 535 modules do not build for 6.1
    r = nvd(dict(env, KERNEL_MODULE_TYPE="open"), "update", "-k", kernels[0], "--check", timeout=2400)
    assert r.returncode == 1 and "error: too few arguments to function 'pci_resize_resource'" in r.stdout, r.stdout
    assert sorted(_bundles(root)) == sorted(kernels)  # nothing stored
    for k, flavour in flavours.items():
        script = vm.guest_exports(
            k,
            KERNEL_MODULE_TYPE=flavour,
            DRIVER_CTR_SHARED_DIR="/tmp/empty-shared",
            DRIVER_CTR_PRECOMPILED_DIR=str(root / STORE),
        )
        out = tmp_path / ("vm-" + k)
        res = vm.boot(k, script + INIT_IN_GUEST, out, REPO / ".cache" / "vm")
        assert res.rc == 0, res.console[-3000:]
        err = (out / "init.err").read_text(errors="replace")
        found = [e for e in events(err) if e["event"] == "modules found"]
        assert found and found[0]["source"] == "precompiled", err[-3000:]
        assert "building" not in [e["event"] for e in events(err)]
        assert "could not load nvidia: No such device (ENODEV)" in err, err[-3000:]
        assert "no NVIDIA GPU is visible to the kernel" in err
