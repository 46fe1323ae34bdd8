"""nvidia-driver load / unload / probe_nvidia_peermem as processes on a temporary root
(no kernel: what is decided before any modprobe)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO
from harness import (
    PROMPT_S,
    RHEL_KERNEL,
    env_for,
    make_dtk_image,
    make_fixture_modules,
    make_shared_dir,
    nvd,
    path_with,
    run_both,
    wait_for_event,
)


def test_load_without_any_build_says_where_it_looked(root):
    env = env_for(root)
    make_shared_dir(root)
    r = nvd(env, "load")
    assert r.returncode == 1
    assert "no verified build for kernel %s" % RHEL_KERNEL in r.stderr and "host cache" in r.stderr
    assert not (root / "run/nvidia/nvidia-driver.pid").exists()  # released on the way out


def test_load_refuses_a_bad_value_before_any_modprobe(root, tmp_path):
    make_dtk_image(root)
    (root / "run/nvidia/validations").mkdir(parents=True)
    (root / "run/nvidia/validations/.driver-daemons-status").write_text("Ready\n")  # stale, from a killed pod
    env = env_for(root, DRIVER_CTR_FIXTURE_MODULES=str(make_fixture_modules(tmp_path / "fx", RHEL_KERNEL)))
    d, _ = run_both(root, env)
    assert d.returncode == 0, d.stderr
    (root / "drivers").mkdir(exist_ok=True)
    (root / "drivers/nvidia.conf").write_text("NVreg_NoSuch=2\nNVreg_Test=abc\n")
    r = nvd(env, "load")
    assert r.returncode == 1
    assert "%s:2: NVreg_Test='abc': expected an integer" % (root / "drivers/nvidia.conf") in r.stderr, r.stderr
    assert "unknown module parameter dropped" in r.stderr  # the unknown one alone would not stop the load
    # stopped before any modprobe: no drop-in, no modprobe root for the tree
    assert not (root / "etc/modprobe.d/nvidia.conf").exists()
    assert not (root / "run/nvidia/driver-ctr/modroot").exists()
    assert not (root / "run/nvidia/validations/.driver-daemons-status").exists()  # NotReady, then cleared


def test_unload_with_nothing_loaded_and_peermem_probe(root):
    env = env_for(root)
    assert nvd(env, "unload").returncode == 0
    r = nvd(env, "probe_nvidia_peermem")
    assert r.returncode == 0 and "MOFED drivers are not ready" in r.stderr
    (root / "sys/module/mlx5_core").mkdir(parents=True)
    r = nvd(env, "probe_nvidia_peermem")
    assert r.returncode == 1 and "nvidia-peermem module is not loaded" in r.stderr
    (root / "sys/module/nvidia_peermem").mkdir(parents=True)
    assert nvd(env, "probe_nvidia_peermem").returncode == 0


def test_unload_refuses_when_in_use(root):
    for name, ref in (("nvidia", "1"), ("nvidia_uvm", "0")):
        d = root / "sys/module" / name
        (d / "holders").mkdir(parents=True)
        (d / "refcnt").write_text(ref + "\n")
    r = nvd(env_for(root), "unload")
    assert r.returncode == 1
    assert "driver is in use" in r.stderr and "nvidia has 1 reference(s) besides its dependent modules" in r.stderr


def test_reload_peermem_waits_and_stops_promptly_on_sigterm(root):
    """The signal handler is installed before the wait (the reference's came after its sleep)."""
    env = env_for(root)
    p = subprocess.Popen(
        [sys.executable, "-m", "driver_ctr", "nvidia-driver", "reload_nvidia_peermem"],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for_event(p, event="waiting", what="the MOFED driver and the NVIDIA driver container to be ready")
    assert p.poll() is None  # MOFED not ready: waiting
    t0 = time.monotonic()
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=10)
    assert p.returncode == 0 and time.monotonic() - t0 < PROMPT_S, err


def test_peermem_is_loaded_only_with_rdma_and_a_mellanox_device(root):
    from driver_ctr.node.driver_load import Loader
    from driver_ctr.toolkit.settings import Settings

    env = env_for(root, GPU_DIRECT_RDMA_ENABLED="true")
    assert Loader(Settings.from_env(env)).wanted() == ["nvidia", "nvidia-uvm", "nvidia-modeset"]
    dev = root / "sys/bus/pci/devices/0000:3b:00.0"
    dev.mkdir(parents=True)
    (dev / "vendor").write_text("0x15b3\n")
    assert Loader(Settings.from_env(env)).wanted()[-1] == "nvidia-peermem"
    env["GPU_DIRECT_RDMA_ENABLED"] = "false"
    assert "nvidia-peermem" not in Loader(Settings.from_env(env)).wanted()


@pytest.mark.kbuild
def test_init_builds_here_with_the_m_bound_then_reports_the_kernel_refusing_modules(root, tmp_path):
    """No shared-dir build, no cache: init builds in this container (the node's kernel tree is
    here) with -m 1, then loading fails on this host, whose kernel cannot load modules."""
    from harness import events, fixture_build_env, installed_kernel

    k = installed_kernel(r"6\.1\.0-\d+-amd64")
    _, env = fixture_build_env(root, tmp_path, k)
    make_shared_dir(root)
    r = nvd(env, "init", "-m", "1", timeout=300)
    assert r.returncode == 1
    ev = events(r.stderr)
    building = [e for e in ev if e["event"] == "building"]
    assert building and building[0]["jobs"] == 1 and building[0]["job_limits"]["max_threads"] == 1
    assert "could not load nvidia: the kernel refused module loading" in r.stderr, r.stderr[-2000:]
    assert not (root / "run/nvidia/nvidia-driver.pid").exists()
    assert (root / "run/nvidia/validations/.driver-daemons-status").exists() is False
    kept = [p for p in (root / "var/log/driver-ctr").iterdir() if p.name.startswith("build-%s-local-" % k)]
    assert len(kept) == 1 and "NV_KERNEL_MODULES=nvidia nvidia-uvm nvidia-modeset" in kept[0].read_text()


def test_a_second_instance_leaves_the_first_ones_ready_status_alone(root):
    """init/load take the pid lock before they say NotReady."""
    from driver_ctr.node.state import PidLock
    from driver_ctr.toolkit.settings import Settings

    env = env_for(root)
    status = root / "run/nvidia/validations/.driver-daemons-status"
    status.parent.mkdir(parents=True)
    status.write_text("Ready\n")
    lock = PidLock(Settings.from_env(env).paths.pid_file).acquire()  # the running instance
    try:
        for cmd in ("init", "load"):
            r = nvd(env, cmd)
            assert r.returncode == 1 and "An instance of the NVIDIA driver is already running, aborting" in r.stderr
            assert status.read_text() == "Ready\n", cmd
    finally:
        lock.release()


def test_a_peermem_that_fails_to_load_never_takes_the_gpu_driver_down(root, tmp_path):
    """nvidia, nvidia-uvm, nvidia-modeset load; nvidia-peermem (RDMA, a Mellanox device) is refused: the
    failure is logged with its diagnosis and the load succeeds (the sidecar retries it, with its probe)."""
    from fakes import FakeRunner
    from harness import make_fixture_module

    from driver_ctr.module_trees import ModuleTree
    from driver_ctr.node.driver_load import Loader
    from driver_ctr.toolkit.nvidia_modules import SUBDIR
    from driver_ctr.toolkit.runner import Result
    from driver_ctr.toolkit.settings import Settings

    dev = root / "sys/bus/pci/devices/0000:3b:00.0"
    dev.mkdir(parents=True)
    (dev / "vendor").write_text("0x15b3\n")
    tree = tmp_path / "tree"
    make_fixture_modules(tree / SUBDIR, RHEL_KERNEL)
    make_fixture_module(tree / SUBDIR, "nvidia-peermem", RHEL_KERNEL, depends="nvidia")
    runner = FakeRunner()

    def modprobe(argv):
        if argv[-1] == "nvidia-peermem":
            return Result(tuple(argv), 1, "", "modprobe: ERROR: could not insert 'nvidia_peermem': Invalid argument")
        return Result(tuple(argv), 0, "", "")

    runner.answers.append((("modprobe",), modprobe))
    settings = Settings.from_env(env_for(root, GPU_DIRECT_RDMA_ENABLED="true"))
    report = Loader(settings, runner).load_tree(ModuleTree(tree, RHEL_KERNEL, "test"))
    assert report.loaded == ["nvidia", "nvidia-uvm", "nvidia-modeset"]
    assert "Invalid argument" in report.failed["nvidia-peermem"]
    assert [c[-1] for c in runner.calls if "--first-time" in c] == [
        "nvidia",
        "nvidia-uvm",
        "nvidia-modeset",
        "nvidia-peermem",
    ]


def _standin_run(root, tmp_path) -> None:
    import subprocess as sp

    from harness import copy_fixture_sources

    src = copy_fixture_sources(tmp_path / "runsrc")
    (root / "drivers").mkdir(parents=True, exist_ok=True)
    run = root / "drivers/NVIDIA-Linux-x86_64-535.261.03.run"
    sp.run([str(REPO / "scripts/make-standin-run"), str(src), str(run)], check=True)


def test_no_installer_and_no_userspace_is_one_error_before_anything_is_loaded(root, tmp_path):
    """Today: an INFO line, then a 21-minute startup-probe timeout. Now: the expected file, named, at once."""
    make_dtk_image(root)
    env = env_for(root, DRIVER_CTR_FIXTURE_MODULES=str(make_fixture_modules(tmp_path / "fx", RHEL_KERNEL)))
    d, _ = run_both(root, env)
    assert d.returncode == 0, d.stderr
    env["DRIVER_CTR_USERSPACE"] = "auto"
    env["PATH"] = path_with(env, rest="%s:/usr/bin:/bin" % sys.executable.rsplit("/", 1)[0])  # no nvidia-smi
    r = nvd(env, "load")
    assert r.returncode == 1
    expected = root / "drivers/NVIDIA-Linux-x86_64-535.261.03.run"
    assert "no NVIDIA userspace: expected the driver installer %s" % expected in r.stderr, r.stderr
    assert "nothing was loaded" in r.stderr
    assert not (root / "run/nvidia/driver-ctr/modroot").exists()  # no modprobe ran
    assert not (root / "run/nvidia/validations/.driver-daemons-status").exists()


def test_load_installs_the_userspace_from_the_run_as_the_references_load(root, tmp_path):
    make_dtk_image(root)
    env = env_for(root, DRIVER_CTR_FIXTURE_MODULES=str(make_fixture_modules(tmp_path / "fx", RHEL_KERNEL)))
    d, _ = run_both(root, env)
    assert d.returncode == 0, d.stderr
    _standin_run(root, tmp_path)
    env["DRIVER_CTR_USERSPACE"] = "auto"
    r = nvd(env, "load")
    assert '"event": "userspace driver installed"' in r.stderr, r.stderr[-3000:]
    assert (root / "usr/bin/nvidia-persistenced").is_file()  # the stand-in installer's
    assert "could not load nvidia" in r.stderr  # then the load, which this machine's kernel refuses


def test_an_install_that_leaves_no_persistenced_is_an_error(root, tmp_path):
    from driver_ctr.node.userspace import UserspaceMissing, userspace_install
    from driver_ctr.toolkit.log import get_logger
    from driver_ctr.toolkit.runner import Runner
    from driver_ctr.toolkit.settings import Settings

    run = root / "drivers/NVIDIA-Linux-x86_64-535.261.03.run"
    run.parent.mkdir(parents=True)
    run.write_text("#!/bin/sh\nexit 0\n")  # installs nothing
    env = env_for(root, DRIVER_CTR_USERSPACE="auto", PATH="/usr/bin:/bin")
    with pytest.raises(UserspaceMissing) as exc:
        userspace_install(Settings.from_env(env), Runner(), get_logger())
    assert "the userspace install from %s left no nvidia-persistenced" % run in str(exc.value)
