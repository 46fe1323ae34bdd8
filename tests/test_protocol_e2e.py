"""Both sides of the two-container protocol as real, separate processes on one
temporary shared directory, with re-rooted host paths."""

from __future__ import annotations

import json
import signal
import time

import pytest
from harness import (
    PROMPT_S,
    RHEL_KERNEL,
    env_for,
    finish,
    make_dtk_image,
    make_fixture_module,
    make_fixture_modules,
    make_shared_dir,
    start_driver,
    start_dtk,
    stop,
    wait_for_event,
    wait_for_file,
)

RT_KERNEL = "5.14.0-427.18.1.el9_4.x86_64+rt"
K64 = "5.14.0-284.11.1.el9_2.aarch64+64k"


@pytest.fixture(name="fixture_mods")
def _fixture_mods(tmp_path):
    return make_fixture_modules(tmp_path / "fixture", RHEL_KERNEL)


def _run_both(root, env, dtk_env=None, timeout=60):
    shared = make_shared_dir(root)
    drv = start_driver(env)
    dtk = start_dtk(dtk_env or env, shared)
    try:
        d = finish(drv, timeout)
    finally:
        t = stop(dtk) if dtk.poll() is None else 0.0
    return d, dtk, t


def test_happy_path(root, fixture_mods):
    make_dtk_image(root)
    env = env_for(root, DRIVER_CTR_FIXTURE_MODULES=str(fixture_mods))
    d, dtk, t_stop = _run_both(root, env)
    assert d.returncode == 0, d.stderr
    shared = make_shared_dir(root)
    for f in (
        "dir_prepared",
        "driver_build_started",
        "driver_built",
        "manifest.json",
        "settings.json",
        "ocp_dtk_entrypoint",
        "driver-ctr-toolkit.pyz",
    ):
        assert (shared / f).is_file(), f
    m = json.loads((shared / "manifest.json").read_text())
    assert m["inputs"]["kernel_release"] == RHEL_KERNEL and m["generation"] == 1
    names = sorted(f["path"] for f in m["build"]["files"])
    assert names == [
        "kernel/drivers/video/nvidia-modeset.ko",
        "kernel/drivers/video/nvidia-uvm.ko",
        "kernel/drivers/video/nvidia.ko",
    ]
    assert all(f["vermagic"].startswith(RHEL_KERNEL + " ") for f in m["build"]["files"])
    assert "hand-off verified" in d.stderr
    assert t_stop < PROMPT_S  # SIGTERM ends the idle DTK side promptly
    settings = json.loads((shared / "settings.json").read_text())
    assert "PATH" not in settings["env"] and "DRIVER_CTR_ROOT" not in settings["env"]


def test_restart_of_driver_side_reuses_the_build(root, fixture_mods):
    make_dtk_image(root)
    env = env_for(root, DRIVER_CTR_FIXTURE_MODULES=str(fixture_mods))
    d, _, _ = _run_both(root, env)
    assert d.returncode == 0, d.stderr
    built_before = (make_shared_dir(root) / "driver_built").stat().st_mtime_ns
    d2 = finish(start_driver(env))
    assert d2.returncode == 0, d2.stderr
    assert "already prepared for these inputs" in d2.stderr
    assert (make_shared_dir(root) / "driver_built").stat().st_mtime_ns == built_before


@pytest.mark.parametrize("case", ["older-dtk", "newer-dtk", "no-build-tree", "rt-without-rt-package", "64k-mismatch"])
def test_broken_dtk_signals_fallback_with_both_versions(root, case, tmp_path):
    kernel = RHEL_KERNEL
    if case == "older-dtk":
        make_dtk_image(root, release_json={"KERNEL_VERSION": "5.14.0-427.10.1.el9_4.x86_64", "RHEL_VERSION": "9.4"})
        want = ["5.14.0-427.10.1.el9_4.x86_64", RHEL_KERNEL, "the node is newer", "OSTREE_VERSION"]
    elif case == "newer-dtk":
        make_dtk_image(root, release_json={"KERNEL_VERSION": "5.14.0-427.20.1.el9_4.x86_64", "RHEL_VERSION": "9.4"})
        want = ["5.14.0-427.20.1.el9_4.x86_64", "the DTK is newer"]
    elif case == "no-build-tree":
        make_dtk_image(root, build_tree=False)
        want = ["no kernel build tree", "kernel-devel"]
    elif case == "rt-without-rt-package":
        kernel = RT_KERNEL
        make_dtk_image(root, kernel=RT_KERNEL)  # release json without RT_KERNEL_VERSION
        want = ["real-time", "RT_KERNEL_VERSION"]
    else:
        kernel = K64
        make_dtk_image(
            root, kernel=K64, release_json={"KERNEL_VERSION": "5.14.0-284.10.1.el9_2.aarch64", "RHEL_VERSION": "9.2"}
        )
        want = ["5.14.0-284.10.1.el9_2.aarch64", "5.14.0-284.11.1.el9_2.aarch64"]
    env = env_for(
        root,
        kernel,
        RHCOS_VERSION="416.94.202407030122-0",
        **({"TARGETARCH": "arm64"} if case == "64k-mismatch" else {}),
    )
    d, _, _ = _run_both(root, env)
    assert d.returncode == 1
    # the fallback runs: on this RHEL node without entitlement its preflight names what is missing, no dnf call
    assert "falling back to the entitlement-based build" in d.stderr and "no entitlement certificate" in d.stderr
    body = json.loads((make_shared_dir(root) / "driver_toolkit_broken").read_text())
    text = json.dumps(body) + d.stderr
    for w in want:
        assert w in text, (w, text)
    assert body["node_kernel"] == kernel and body["rhcos_version"] == "416.94.202407030122-0"
    assert not (make_shared_dir(root) / "driver_build_started").exists()


def test_rt_kernel_matched_to_its_own_package(root, tmp_path):
    mods = make_fixture_modules(tmp_path / "rtmods", RT_KERNEL)
    make_dtk_image(
        root,
        kernel=RT_KERNEL,
        release_json={
            "KERNEL_VERSION": "5.14.0-427.18.1.el9_4.x86_64",
            "RT_KERNEL_VERSION": RT_KERNEL,
            "RHEL_VERSION": "9.4",
        },
    )
    env = env_for(root, RT_KERNEL, DRIVER_CTR_FIXTURE_MODULES=str(mods))
    d, _, _ = _run_both(root, env)
    assert d.returncode == 0, d.stderr


def test_rhcos_image_missing(root, fixture_mods):
    """Driver side falls back at once; DTK side (running the driver image) idles until SIGTERM."""
    env = env_for(root, RHCOS_IMAGE_MISSING="true", RHCOS_VERSION="9.6.20250523-0")
    d = finish(start_driver(env))
    assert d.returncode == 1 and "image tag missing" in d.stderr and "9.6.20250523-0" in d.stderr
    # DTK side, as the pod runs it, once the shared dir exists (payload from a normal prepare)
    from driver_ctr import payload
    from driver_ctr.toolkit.protocol import SharedDir

    shared = make_shared_dir(root)
    payload.install(SharedDir(shared))
    (shared / "dir_prepared").write_text("")
    dtk = start_dtk(env, shared)
    wait_for_event(dtk, event="idle", reason="RHCOS_IMAGE_MISSING=true: nothing to build here")
    assert dtk.poll() is None
    assert stop(dtk) < PROMPT_S
    assert dtk.returncode == 0
    assert not (shared / "driver_build_started").exists()


def test_build_failure_reaches_the_driver_side_fast(root, fixture_mods):
    make_dtk_image(root)
    (fixture_mods / "FAIL").write_text(
        "  CC [M]  nvidia/nv-pci.o\nnvidia/nv-pci.c:123:5: error: too few arguments to function 'pci_resize_resource'\n"
    )
    env = env_for(root, DRIVER_CTR_FIXTURE_MODULES=str(fixture_mods))
    shared = make_shared_dir(root)
    drv = start_driver(env)
    dtk = start_dtk(env, shared)
    wait_for_file(shared / "driver_build_failed")
    t0 = time.monotonic()
    d = finish(drv, 30)
    elapsed = time.monotonic() - t0
    assert d.returncode == 1
    assert "pci_resize_resource" in d.stderr
    assert elapsed < PROMPT_S
    r = finish(dtk, 10)
    assert r.returncode == 1  # the DTK side exits non-zero on failure
    assert not (shared / "modules").exists() and not (shared / "driver_built").exists()
    body = json.loads((shared / "driver_build_failed").read_text())
    assert body["phase"] == "compile" and "pci_resize_resource" in body["log_tail"]


def test_failed_build_does_not_replace_a_good_one(root, fixture_mods):
    """A DTK restart whose rebuild fails leaves the previous good modules/ untouched."""
    make_dtk_image(root)
    env = env_for(root, DRIVER_CTR_FIXTURE_MODULES=str(fixture_mods))
    d, _, _ = _run_both(root, env)
    assert d.returncode == 0
    shared = make_shared_dir(root)
    good = (shared / "modules/kernel/drivers/video/nvidia.ko").read_bytes()
    (shared / "driver_built").unlink()  # someone deletes the flag: the DTK rebuilds
    (fixture_mods / "FAIL").write_text("error: out of memory\n")
    r = finish(start_dtk(env, shared), 30)
    assert r.returncode == 1
    assert (shared / "modules/kernel/drivers/video/nvidia.ko").read_bytes() == good
    assert not list(shared.glob(".modules.staging-*"))


def test_stale_build_for_another_kernel_is_never_used(root, fixture_mods, tmp_path):
    """A driver_built from another kernel (node rebooted into a new RHCOS) is moved aside and rebuilt."""
    old_kernel = "5.14.0-427.10.1.el9_4.x86_64"
    old_mods = make_fixture_modules(tmp_path / "old", old_kernel)
    make_dtk_image(root, kernel=old_kernel)
    d, _, _ = _run_both(root, env_for(root, old_kernel, DRIVER_CTR_FIXTURE_MODULES=str(old_mods)))
    assert d.returncode == 0
    # the node now runs RHEL_KERNEL; the DTK of the new DaemonSet has it
    make_dtk_image(root)
    env = env_for(root, DRIVER_CTR_FIXTURE_MODULES=str(fixture_mods))
    d, _, _ = _run_both(root, env)
    assert d.returncode == 0, d.stderr
    shared = make_shared_dir(root)
    m = json.loads((shared / "manifest.json").read_text())
    assert m["generation"] == 2 and m["inputs"]["kernel_release"] == RHEL_KERNEL
    assert all(f["vermagic"].startswith(RHEL_KERNEL) for f in m["build"]["files"])
    assert "moved aside" in d.stderr
    assert list((shared / "stale").glob("gen-1-*/driver_built"))


def test_stale_modules_planted_under_a_matching_manifest_are_refused(root, fixture_mods, tmp_path):
    """Modules whose vermagic does not name the node kernel never reach loading, even
    if the manifest was rewritten to look right."""
    make_dtk_image(root)
    env = env_for(root, DRIVER_CTR_FIXTURE_MODULES=str(fixture_mods))
    d, _, _ = _run_both(root, env)
    assert d.returncode == 0
    shared = make_shared_dir(root)
    wrong = make_fixture_module(tmp_path / "wrong", "nvidia", "5.14.0-1.el9.x86_64")
    target = shared / "modules/kernel/drivers/video/nvidia.ko"
    target.write_bytes(wrong.read_bytes())
    m = json.loads((shared / "manifest.json").read_text())
    from driver_ctr.toolkit.fsio import sha256_file

    for f in m["build"]["files"]:
        if f["path"].endswith("/nvidia.ko"):
            f["sha256"] = sha256_file(target)
    (shared / "manifest.json").write_text(json.dumps(m))
    d2 = finish(start_driver(env))
    assert d2.returncode == 1
    assert "5.14.0-1.el9.x86_64" in d2.stderr and RHEL_KERNEL in d2.stderr


def test_sigterm_while_waiting_ends_driver_side_within_2s(root):
    make_dtk_image(root)
    env = env_for(root)
    make_shared_dir(root)  # the pod's volume exists before the container starts
    drv = start_driver(env)
    wait_for_event(drv, phase="wait build start", event="phase start")  # now in the wait SIGTERM must end
    assert stop(drv) < PROMPT_S
    assert drv.returncode == 0


def test_start_deadline(root):
    """No DTK container at all: the driver side gives up at its deadline with a clear message."""
    env = env_for(root, DRIVER_CTR_START_TIMEOUT="1")
    make_shared_dir(root)
    d = finish(start_driver(env), 30)
    assert d.returncode == 1
    assert "timed out after 1 s waiting for the openshift-driver-toolkit-ctr container to start" in d.stderr


def test_fast_path(root):
    """Loaded driver with the same digest and version: no shared-dir work at all."""
    (root / "sys/module/nvidia").mkdir(parents=True)
    (root / "sys/module/nvidia/refcnt").write_text("0")
    (root / "sys/module/nvidia/version").write_text("535.261.03")
    (root / "run/nvidia").mkdir(parents=True)
    (root / "run/nvidia/nvidia-driver.state").write_text("3522141578\n")
    d = finish(start_driver(env_for(root)))
    assert d.returncode == 0, d.stderr
    assert "fast path" in d.stderr
    assert not (root / "mnt/shared-nvidia-driver-toolkit" / "dir_prepared").exists()


def test_unmounted_shared_dir_is_named(root):
    d = finish(start_driver(env_for(root)), 30)
    assert d.returncode == 1
    assert "mnt/shared-nvidia-driver-toolkit: the shared directory is not mounted" in d.stderr


def test_after_a_reboot_the_dtk_waits_for_the_new_generation_and_never_fails_it(root, fixture_mods, tmp_path):
    """The shared dir survived a reboot onto a new kernel: the DTK container starts at
    once on the last generation's dir_prepared (for the old kernel). It waits for the
    driver side's new generation instead of failing, and the new one builds."""
    old_kernel = "5.14.0-427.10.1.el9_4.x86_64"
    make_dtk_image(root, kernel=old_kernel)
    d, _, _ = _run_both(
        root,
        env_for(root, old_kernel, DRIVER_CTR_FIXTURE_MODULES=str(make_fixture_modules(tmp_path / "old", old_kernel))),
    )
    assert d.returncode == 0, d.stderr
    make_dtk_image(root)  # the node now runs RHEL_KERNEL, and so does the DTK image
    env = env_for(root, DRIVER_CTR_FIXTURE_MODULES=str(fixture_mods))
    shared = make_shared_dir(root)
    dtk = start_dtk(env, shared)  # dir_prepared of generation 1 is there: it starts at once
    wait_for_event(dtk, event="the prepared generation is for other inputs: waiting for the driver side's new one")
    assert dtk.poll() is None, "the DTK side exited on the old generation"
    assert not (shared / "driver_build_failed").exists()
    d = finish(start_driver(env))
    assert d.returncode == 0, d.stderr
    assert json.loads((shared / "manifest.json").read_text())["generation"] == 2
    assert not (shared / "driver_build_failed").exists() and not list(shared.glob("stale/*/driver_build_failed"))
    assert stop(dtk) < PROMPT_S and dtk.returncode == 0


def _left_after(root, sig):
    """Start the driver side (the real lifecycle: lock, NotReady), stop it with ``sig`` while it waits for the
    DTK, and return what it left: every path under the root with the content of the small files."""
    make_dtk_image(root)
    make_shared_dir(root)
    drv = start_driver(env_for(root), dry_run=False)
    wait_for_event(drv, phase="wait build start", event="phase start")
    took = stop(drv, sig)
    assert drv.returncode == 0 and took < PROMPT_S, (signal.Signals(sig).name, drv.returncode, took)
    left = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if rel.startswith(("mnt/shared-nvidia-driver-toolkit/.", "mnt/shared-nvidia-driver-toolkit/stale")):
            continue
        small = p.is_file() and not p.is_symlink() and p.stat().st_size < 200 and "shared-nvidia" not in rel
        left[rel] = p.read_text() if small else None
    return left


def test_a_hup_quit_or_pipe_while_waiting_for_the_dtk_leaves_exactly_what_a_term_leaves(tmp_path):
    """NVIDIA's script traps HUP, INT, QUIT, PIPE and TERM into its shutdown; with hostPID the process is not
    PID 1 and any of them would kill it without the undo (pid file and NotReady left)."""
    after_term = _left_after(tmp_path / "term", signal.SIGTERM)
    assert not any(p.endswith("nvidia-driver.pid") for p in after_term)
    for sig in (signal.SIGHUP, signal.SIGQUIT, signal.SIGPIPE):
        assert _left_after(tmp_path / signal.Signals(sig).name, sig) == after_term, signal.Signals(sig).name
