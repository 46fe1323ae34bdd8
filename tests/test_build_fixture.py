"""The real kbuild path, fast: both sides as processes, NVIDIA's Makefile
interface, a real Debian kernel tree, real modules (tiny fixture sources that
link against drm and video like NVIDIA's), real depmod, modprobe, sign-file.
About 3-5 s a build."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from harness import (
    PROMPT_S,
    events,
    finish,
    fixture_build_env,
    installed_kernel,
    make_shared_dir,
    run_both,
    start_driver,
    start_dtk,
    wait_for_file,
)

from driver_ctr.toolkit.modinfo import read_modinfo

NV = "kernel/drivers/video"

pytestmark = pytest.mark.kbuild  # compiles the fixture modules against an installed kernel


@pytest.fixture(name="k61")
def _k61() -> str:
    return installed_kernel(r"6\.1\.0-\d+-amd64")


def _manifest(root: Path) -> dict:
    return json.loads((make_shared_dir(root) / "manifest.json").read_text())


def test_build_stages_a_tree_modprobe_can_use(root, tmp_path, k61):
    _, env = fixture_build_env(root, tmp_path, k61)
    d, dtk = run_both(root, env)
    assert d.returncode == 0, d.stderr + dtk.stderr
    shared = make_shared_dir(root)
    m = _manifest(root)
    det = m["build"]["details"]
    assert m["build"]["builder"] == "kbuild"
    assert det["flavour"] == "proprietary" and det["tree"] == "kernel"
    assert "auto" in det["flavour_reason"] and "535 < 560" in det["flavour_reason"]
    assert det["modules"] == ["nvidia", "nvidia-uvm", "nvidia-modeset"]
    assert 1 <= det["jobs"] <= len(os.sched_getaffinity(0))
    assert det["reference_vermagic"].startswith(k61 + " SMP ")
    files = {f["path"]: f for f in m["build"]["files"]}
    for name in ("nvidia", "nvidia-uvm", "nvidia-modeset"):
        f = files["%s/%s.ko" % (NV, name)]
        assert f["vermagic"] == det["reference_vermagic"] and f["version"] == "535.261.03"
    # the kernel's own modules the NVIDIA ones need, at their own paths
    assert "kernel/drivers/gpu/drm/drm.ko" in files and "kernel/drivers/acpi/video.ko" in files
    assert {"drm", "video"} <= set(det["from_kernel"])
    # nothing of the scratch build is left
    assert not list(tmp_path.glob("driver-ctr/build-*"))
    # the tree works with the real modprobe, with paths relative to /lib/modules/<k>
    mroot = tmp_path / "mroot/lib/modules"
    mroot.mkdir(parents=True)
    (mroot / k61).symlink_to(shared / "modules")
    r = subprocess.run(
        ["modprobe", "-C", "/dev/null", "-d", str(tmp_path / "mroot"), "-S", k61, "--show-depends", "nvidia-modeset"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    order = [l.split()[1].rsplit("/", 1)[-1] for l in r.stdout.splitlines() if l.startswith("insmod")]
    assert order.index("drm.ko") < order.index("nvidia.ko") < order.index("nvidia-modeset.ko")
    assert order.index("video.ko") < order.index("nvidia-modeset.ko")
    # insmod_nvidia keeps the reference format: absolute /lib/modules/<k> paths
    insmod = (shared / "modules/insmod_nvidia").read_text()
    assert "insmod /lib/modules/%s/%s/nvidia.ko" % (k61, NV) in insmod and str(tmp_path) not in insmod
    assert insmod.index("/nvidia.ko") < insmod.index("/nvidia-uvm.ko")
    # the build log is in the shared dir and names the make command
    log = (shared / "build.log").read_text()
    assert "NV_KERNEL_MODULES=nvidia nvidia-uvm nvidia-modeset" in log and "-j%d" % det["jobs"] in log


def test_rdma_without_mofeds_tree_builds_the_driver_without_peermem_and_says_why(root, tmp_path, k61):
    _, env = fixture_build_env(root, tmp_path, k61, KERNEL_MODULE_TYPE="open", GPU_DIRECT_RDMA_ENABLED="true")
    d, dtk = run_both(root, env)
    assert d.returncode == 0, d.stderr + dtk.stderr
    det = _manifest(root)["build"]["details"]
    assert det["tree"] == "kernel-open" and det["flavour_reason"] == "KERNEL_MODULE_TYPE=open"
    assert det["modules"] == ["nvidia", "nvidia-uvm", "nvidia-modeset"]
    why = det["not_built"]["nvidia-peermem"]
    assert "no MOFED kernel tree from the MOFED driver container for kernel %s" % k61 in why
    assert str(root / "run/mellanox/drivers/usr/src/ofa_kernel/x86_64" / k61) in why
    assert not (make_shared_dir(root) / "modules" / NV / "nvidia-peermem.ko").exists()
    assert "nvidia-peermem not built" in (make_shared_dir(root) / "build.log").read_text()


@pytest.mark.parametrize("host_mofed", [False, True])
def test_rdma_with_mofeds_tree_builds_peermem_against_its_symbols(root, tmp_path, k61, host_mofed):
    """MOFED's tree (the MOFED container's, or the host's with USE_HOST_MOFED=true: the operator mounts
    either at /run/mellanox/drivers/usr/src): nvidia-peermem imports the IB peer-memory API, its ib_core is
    MOFED's (never the kernel's inbox one staged beside it)."""
    from harness import make_ofa_kernel

    from driver_ctr.toolkit.modinfo import undefined_symbols

    ofa = make_ofa_kernel(root / "run/mellanox/drivers/usr/src/ofa_kernel/x86_64" / k61)
    _, env = fixture_build_env(
        root, tmp_path, k61, GPU_DIRECT_RDMA_ENABLED="true", USE_HOST_MOFED="true" if host_mofed else "false"
    )
    d, dtk = run_both(root, env)
    assert d.returncode == 0, d.stderr + dtk.stderr
    det = _manifest(root)["build"]["details"]
    assert det["modules"][-1] == "nvidia-peermem" and det["not_built"] == {} and det["mofed"] == str(ofa)
    mods = make_shared_dir(root) / "modules"
    peermem = mods / NV / "nvidia-peermem.ko"
    assert {"ib_register_peer_memory_client", "ib_unregister_peer_memory_client"} <= undefined_symbols(peermem)
    assert "ib_core" in read_modinfo(peermem).depends  # modpost read MOFED's Module.symvers
    assert not list(mods.rglob("ib_core.ko*"))  # the inbox ib_core is not MOFED's: never staged
    dep = next(l for l in (mods / "modules.dep").read_text().splitlines() if l.startswith(NV + "/nvidia-peermem"))
    deps = dep.split(":")[1].split()
    assert NV + "/nvidia.ko" in deps and not any("ib_core" in d for d in deps)  # ib_core: MOFED's, loaded by it


def test_compile_error_fails_fast_and_keeps_the_good_build(root, tmp_path, k61):
    src, env = fixture_build_env(root, tmp_path, k61)
    d, _ = run_both(root, env)
    assert d.returncode == 0
    shared = make_shared_dir(root)
    good = (shared / "modules" / NV / "nvidia.ko").read_bytes()
    # the sources break (a driver that does not support this kernel); the flag goes
    text = (src / "kernel/nvidia.c").read_text()
    broken = text.replace("return misc_register(&nvfx_ctl);", "return pci_resize_resource(0, 1);")
    assert broken != text
    (src / "kernel/nvidia.c").write_text(broken)
    (shared / "driver_built").unlink()
    drv = start_driver(env)
    dtk = start_dtk(env, shared)
    wait_for_file(shared / "driver_build_failed", timeout=120)
    t0 = time.monotonic()
    d = finish(drv, 30)
    assert d.returncode == 1 and "pci_resize_resource" in d.stderr
    assert time.monotonic() - t0 < PROMPT_S
    r = finish(dtk, 30)
    assert r.returncode == 1
    body = json.loads((shared / "driver_build_failed").read_text())
    assert body["phase"] == "compile"
    assert "nvidia.c" in body["message"] and "error:" in body["message"] and "pci_resize_resource" in body["message"]
    assert str(tmp_path) not in body["message"]  # scratch paths stripped
    assert (shared / "modules" / NV / "nvidia.ko").read_bytes() == good
    assert not list(shared.glob(".modules.staging-*")) and not list(tmp_path.glob("driver-ctr/build-*"))
    # both builds' logs outlive the pod, on the node; status names the last
    logs = sorted((root / "var/log/driver-ctr").iterdir(), key=lambda p: p.stat().st_mtime_ns)
    assert [p.name.startswith("build-%s-1-" % k61) for p in logs] == [True, True], logs  # the build, the retry
    failed_log = logs[-1]
    assert "pci_resize_resource" in failed_log.read_text() and "pci_resize_resource" not in logs[0].read_text()
    argv = [sys.executable, "-m", "driver_ctr", "nvidia-driver", "status", "--json"]
    st = subprocess.run(argv, env=env, capture_output=True, text=True)
    assert json.loads(st.stdout)["last_build_log"] == str(failed_log)


def test_signed_build_and_the_key_stays_out_of_shared_and_logs(root, tmp_path, k61):
    openssl = shutil.which("openssl") or pytest.skip("openssl is not installed (scripts/test installs it)")
    keys = tmp_path / "secret"
    keys.mkdir()
    subprocess.run(
        [
            openssl,
            "req",
            "-new",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=driver-ctr test signing key/",
            "-outform",
            "PEM",
            "-keyout",
            str(keys / "key.pem"),
            "-out",
            str(keys / "cert.pem"),
        ],
        check=True,
        capture_output=True,
    )
    cache = root / "var/lib/driver-ctr/cache"
    cache.mkdir(parents=True)
    _, env = fixture_build_env(
        root,
        tmp_path,
        k61,
        DRIVER_CTR_SIGNING_KEY=str(keys / "key.pem"),
        DRIVER_CTR_SIGNING_CERT=str(keys / "cert.pem"),
    )
    d, dtk = run_both(root, env)
    assert d.returncode == 0, d.stderr + dtk.stderr
    shared = make_shared_dir(root)
    det = _manifest(root)["build"]["details"]
    assert det["signed"] and len(det["signing_fingerprint"]) == 64
    for name in ("nvidia", "nvidia-uvm", "nvidia-modeset"):
        info = read_modinfo(shared / "modules" / NV / (name + ".ko"))
        assert info.signed, name
        out = subprocess.run(
            ["modinfo", "-F", "signer", str(shared / "modules" / NV / (name + ".ko"))],
            capture_output=True,
            text=True,
            env=env,
        ).stdout
        assert "driver-ctr test signing key" in out
    # the private key's material appears nowhere: shared dir, host cache, either side's log
    pem = (keys / "key.pem").read_text()
    body = "".join(l for l in pem.splitlines() if not l.startswith("-----"))
    needles = [body[i : i + 40] for i in (0, 200, 800)] + [base64.b64decode(body)[40:80]]
    for where in (shared, cache):
        for p in where.rglob("*"):
            if p.is_file():
                data = p.read_bytes()
                for n in needles:
                    assert (n.encode() if isinstance(n, str) else n) not in data, p
                assert p.name != "key.pem"
    for text in (d.stderr, dtk.stderr, (shared / "build.log").read_text()):
        assert all(n not in text for n in needles if isinstance(n, str))


def test_host_cache_hit_then_corrupt_entries_are_discarded_and_rebuilt(root, tmp_path, k61):
    cache = root / "var/lib/driver-ctr/cache"
    cache.mkdir(parents=True)
    _, env = fixture_build_env(root, tmp_path, k61)
    d, dtk = run_both(root, env)
    assert d.returncode == 0, d.stderr
    entries = list((cache / k61).iterdir())
    assert len(entries) == 1
    entry = entries[0]
    assert json.loads((entry / "entry.json").read_text())["inputs"]["kernel_release"] == k61

    def fresh_run():
        shutil.rmtree(make_shared_dir(root))  # a new pod: empty shared dir
        return run_both(root, env)

    # hit: no build at all
    d, dtk = fresh_run()
    assert d.returncode == 0
    assert "host cache hit" in d.stderr and _manifest(root)["build"]["builder"] == "host-cache"
    assert not (make_shared_dir(root) / "driver_build_started").exists()
    # a flipped byte: discarded with a warning, the DTK rebuilds, the cache is refilled
    ko = entry / "modules" / NV / "nvidia.ko"
    raw = bytearray(ko.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    ko.write_bytes(bytes(raw))
    d, dtk = fresh_run()
    assert d.returncode == 0
    ev = events(d.stderr)
    corrupt = [e for e in ev if e["event"].startswith("host cache entry is corrupt")]
    assert corrupt and "sha256 differs" in corrupt[0]["reason"]
    assert _manifest(root)["build"]["builder"] == "kbuild"
    assert (entry / "entry.json").is_file()  # stored again by the rebuild
    # a module for another kernel planted, with the entry rewritten to list it: still refused
    other = read_modinfo(make_shared_dir(root) / "modules" / NV / "nvidia.ko")
    data = json.loads((entry / "entry.json").read_text())
    planted = entry / "modules" / NV / "nvidia-uvm.ko"
    planted.write_bytes(planted.read_bytes().replace(k61.encode(), ("9" * len(k61)).encode()))
    import hashlib

    for f in data["build"]["files"]:
        if f["path"].endswith("nvidia-uvm.ko"):
            f["sha256"] = hashlib.sha256(planted.read_bytes()).hexdigest()
    (entry / "entry.json").write_text(json.dumps(data))
    d, dtk = fresh_run()
    assert d.returncode == 0
    corrupt = [e for e in events(d.stderr) if e["event"].startswith("host cache entry is corrupt")]
    assert corrupt and "9999" in corrupt[0]["reason"] and k61 in corrupt[0]["reason"]
    assert _manifest(root)["build"]["builder"] == "kbuild" and other.vermagic.startswith(k61)


def test_preempt_rt_kernel_needs_the_opt_in(root, tmp_path):
    krt = installed_kernel(r"6\.1\.0-\d+-rt-amd64")
    _, env = fixture_build_env(root, tmp_path, krt)
    d, dtk = run_both(root, env)
    assert d.returncode == 1
    body = json.loads((make_shared_dir(root) / "driver_build_failed").read_text())
    assert body["phase"] == "prepare" and "PREEMPT_RT" in body["message"]
    assert "IGNORE_PREEMPT_RT_PRESENCE=1" in body["message"] and krt in body["message"]
    # opted in: builds, and the vermagic says preempt_rt like the kernel's own modules
    shutil.rmtree(make_shared_dir(root))
    env["IGNORE_PREEMPT_RT_PRESENCE"] = "1"
    d, dtk = run_both(root, env)
    assert d.returncode == 0, d.stderr + dtk.stderr
    files = _manifest(root)["build"]["files"]
    nv = [f for f in files if f["path"] == NV + "/nvidia.ko"][0]
    assert " preempt_rt " in nv["vermagic"] and nv["vermagic"].startswith(krt + " ")


def test_compiler_differing_from_the_kernels_is_logged_with_both_versions(root, tmp_path, k61):
    """The kernel tree says it was built with another gcc: the build goes on, and says so."""
    real_build = Path(os.path.realpath("/lib/modules/%s/build" % k61))
    tree = root / "usr/src/cc-tree"
    tree.parent.mkdir(parents=True)
    shutil.copytree(str(real_build), str(tree), symlinks=True)
    for link in ("scripts", "tools"):
        target = os.path.realpath(str(real_build / link))
        (tree / link).unlink()
        (tree / link).symlink_to(target)
    cfg = (tree / ".config").read_text()
    (tree / ".config").write_text(
        re.sub(
            r"^CONFIG_CC_VERSION_TEXT=.*$",
            'CONFIG_CC_VERSION_TEXT="gcc (GCC) 11.4.1 20231218 (Red Hat 11.4.1-3)"',
            cfg,
            flags=re.M,
        )
    )
    mod = root / "lib/modules" / k61
    mod.mkdir(parents=True)
    for entry in os.listdir("/lib/modules/%s" % k61):
        if entry not in ("build",):
            (mod / entry).symlink_to(os.path.join("/lib/modules", k61, entry))
    (mod / "build").symlink_to("/usr/src/cc-tree")
    _, env = fixture_build_env(root, tmp_path, k61)
    d, dtk = run_both(root, env)
    assert d.returncode == 0, d.stderr + dtk.stderr
    here = subprocess.run(["gcc", "-dumpfullversion"], capture_output=True, text=True).stdout.strip()
    log = (make_shared_dir(root) / "build.log").read_text()
    assert "compiler %s differs from the kernel's 11.4.1 (gcc (GCC) 11.4.1 20231218 (Red Hat 11.4.1-3))" % here in log
    warn = [e for e in events(dtk.stderr) if e["event"] == "compiler differs from the kernel's"]
    assert warn and warn[0]["kernel_compiler"] == "11.4.1" and warn[0]["compiler"] == here
    assert _manifest(root)["build"]["details"]["kernel_compiler"].startswith("gcc (GCC) 11.4.1")


def test_gdrcopy_builds_from_its_sidecars_sources_and_gds_without_sources_fails_alone(root, tmp_path, k61):
    """GDRCopy's sources in the shared dir (its sidecar's copy): gdrdrv is built against this build's
    nv-p2p.h and left where the in-place build would leave it, then gdrcopy_built. GDS on without sources:
    nvidia_fs_build_failed names what is missing; the GPU driver is built, verified and adopted all the
    same, and NVIDIA's sources are exposed at /usr/src/nvidia-<version> for the sidecars."""
    from harness import REPO, events

    _, env = fixture_build_env(root, tmp_path, k61, GDRCOPY_ENABLED="true", GDS_ENABLED="true")
    shared = make_shared_dir(root)
    shutil.copytree(str(REPO / "tests/fixtures/gdrcopy"), str(shared / "gdrcopy"))
    drv = start_driver(env)
    dtk = start_dtk(env, shared)
    try:
        d = finish(drv, 180)
        wait_for_file(shared / "gdrcopy_built", timeout=120)
        wait_for_file(shared / "nvidia_fs_build_failed", timeout=60)
    finally:
        if dtk.poll() is None:
            dtk.terminate()
        dtk_out = finish(dtk, 30)
    assert d.returncode == 0, d.stderr + dtk_out.stderr
    assert "hand-off verified" in d.stderr
    gdrdrv = shared / "gdrcopy/src/gdrdrv/gdrdrv.ko"
    assert read_modinfo(gdrdrv).vermagic.startswith(k61 + " ")
    assert json.loads((shared / "gdrcopy_built").read_text())["generation"] == 1
    failed = json.loads((shared / "nvidia_fs_build_failed").read_text())
    assert failed["component"] == "nvidia-fs" and failed["generation"] == 1 and failed["phase"] == "sources"
    assert failed["message"].startswith("no nvidia-fs sources at %s/gds-nvidia-fs/src" % shared)
    assert "is it running?" in failed["message"]
    assert not (shared / "nvidia_fs_built").exists()
    assert (root / "usr/src/nvidia-535.261.03/kernel/nvidia/nv-p2p.h").is_file()
    assert "gdrcopy built" in [e["event"] for e in events(dtk_out.stderr)]
    # the GPU driver first: it never waits for a component
    assert (shared / "driver_built").stat().st_mtime_ns <= (shared / "gdrcopy_built").stat().st_mtime_ns
