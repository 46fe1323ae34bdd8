"""Loading on a real kernel: Debian's 6.1 booted under qemu is the node.

The modules are built on this machine (fixture sources; the real 535 build of
the slow tier), handed over through a shared dir, and the project's own
commands run in the guest as root, with the real /sys, /dev, /proc, modprobe.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import vm
from conftest import REPO
from harness import events, fixture_build_env, installed_kernel, make_shared_dir, run_both

pytestmark = [pytest.mark.slow, pytest.mark.vm]

VM_CACHE = REPO / ".cache" / "vm"


def _kernel() -> str:
    k = installed_kernel(r"6\.1\.0-\d+-amd64")
    why = vm.unavailable_reason(k)
    if why:
        pytest.skip(why)
    return k


def _fixture_handoff(tmp_path: Path, kernel: str, name: str, **extra: str) -> Path:
    """A verified hand-off (shared dir) of the fixture modules for ``kernel``."""
    root = tmp_path / name
    root.mkdir()
    _, env = fixture_build_env(root, tmp_path / (name + "-work"), kernel, **extra)
    d, dtk = run_both(root, env)
    assert d.returncode == 0, d.stderr + dtk.stderr
    return make_shared_dir(root)


def _guest_env(kernel: str, shared: Path, **extra: str) -> str:
    return vm.guest_exports(kernel, DRIVER_CTR_SHARED_DIR=str(shared), **extra)


LOAD_UNLOAD = r"""
set -u
O=/run/out
mkdir -p /drivers
printf 'NVreg_Test=5\n' > /drivers/nvidia.conf
py() { python -m driver_ctr "$@"; }
python -m driver_ctr nvidia-driver load > $O/load.out 2> $O/load.err &
LOADER=$!
i=0; while [ $i -lt 600 ]; do grep -qsx Ready /run/nvidia/validations/.driver-daemons-status && break; sleep 0.2; i=$((i+1)); done
cat /run/nvidia/validations/.driver-daemons-status > $O/status 2>&1
cat /run/nvidia/nvidia-driver.state > $O/state 2>&1
cat /run/nvidia/nvidia-driver.pid > $O/pidfile 2>&1; echo $LOADER > $O/loader_pid
cat /etc/modprobe.d/nvidia.conf > $O/dropin 2>&1
cat /sys/module/nvidia/parameters/NVreg_Test > $O/param 2>&1
cat /sys/module/nvidia/parameters/NVreg_CoherentGPUMemoryMode > $O/cdmm 2>&1
cat /proc/modules > $O/modules_loaded
grep -q " /run/nvidia/driver " /proc/mounts && echo mounted > $O/rootfs
py nvidia-driver load > $O/second.out 2> $O/second.err; echo $? > $O/second.rc
# a restart with the driver loaded (the container was killed): init takes the fast path, no unload
kill -KILL $LOADER; wait $LOADER 2>/dev/null
grep nvidia /proc/modules | sort > $O/fast_before
python -m driver_ctr nvidia-driver init > $O/init.out 2> $O/init.err &
LOADER=$!
i=0; while [ $i -lt 600 ]; do grep -qs "driver ready: waiting for a signal" $O/init.err && break; sleep 0.2; i=$((i+1)); done
grep nvidia /proc/modules | sort > $O/fast_after
# a process holds /dev/nvidiactl: unload refuses and names it
sleep 600 < /dev/nvidiactl &
HOLDER=$!
sleep 0.5
py nvidia-driver unload > $O/busy.out 2> $O/busy.err; echo $? > $O/busy.rc
kill -TERM $LOADER; sleep 3
kill -0 $LOADER 2>/dev/null && echo alive > $O/alive_after_term
cat /proc/modules > $O/modules_in_use
kill $HOLDER; wait $HOLDER 2>/dev/null
kill -TERM $LOADER; wait $LOADER; echo $? > $O/load.rc
cat /proc/modules > $O/modules_after
ls /run/nvidia > $O/run_nvidia_after 2>&1
cat /run/nvidia/validations/.driver-daemons-status > $O/status_after 2>/dev/null
grep -q " /run/nvidia/driver " /proc/mounts && echo mounted > $O/rootfs_after
# a module built for another kernel is refused before any insmod
python - > $O/wrong.out 2> $O/wrong.err <<'EOF'
import os
from pathlib import Path
from driver_ctr.node.driver_load import Loader
from driver_ctr.module_trees import ModuleTree
from driver_ctr.node.load_diagnosis import LoadFailed
from driver_ctr.toolkit.settings import Settings
s = Settings.from_env(dict(os.environ))
try:
    Loader(s).load_tree(ModuleTree(Path(os.environ["WRONG_TREE"]), s.running_kernel(), "test"))
    print("LOADED")
except LoadFailed as exc:
    print(exc)
EOF
cat /proc/modules > $O/modules_after_wrong
# the DTK flow's own load step: the hand-off is complete, nv-ctr-run-with-dtk verifies and loads it
python -m driver_ctr ocp_dtk_entrypoint nv-ctr-run-with-dtk > $O/dtk.out 2> $O/dtk.err &
RUNNER=$!
i=0; while [ $i -lt 600 ]; do grep -qsx Ready /run/nvidia/validations/.driver-daemons-status && break; sleep 0.2; i=$((i+1)); done
cat /proc/modules > $O/modules_dtk
kill -TERM $RUNNER; wait $RUNNER; echo $? > $O/dtk.rc
cat /proc/modules > $O/modules_dtk_after
"""


def _read(out: Path, name: str) -> str:
    p = out / name
    return p.read_text(errors="replace") if p.is_file() else ""


def test_fixture_modules_load_hold_and_unload_on_a_real_kernel(tmp_path):
    k = _kernel()
    shared = _fixture_handoff(tmp_path, k, "good")
    k612 = installed_kernel(r"6\.12\.\d+\+deb12-amd64")
    wrong = _fixture_handoff(tmp_path, k612, "wrong") / "modules"
    r = vm.boot(k, _guest_env(k, shared, WRONG_TREE=str(wrong)) + LOAD_UNLOAD, tmp_path / "out", VM_CACHE)
    out = r.out
    assert r.rc == 0, r.console[-3000:] + r.stderr
    print("VM cycle: %.1f s" % r.seconds)
    # loaded, with the parameter from /drivers/nvidia.conf and CDMM (declared by the module)
    assert _read(out, "status").strip() == "Ready", _read(out, "load.err")[-3000:]
    mods = _read(out, "modules_loaded")
    for m in ("nvidia ", "nvidia_uvm ", "nvidia_modeset ", "drm ", "video "):
        assert re.search(r"^%s" % m, mods, re.M), (m, mods, _read(out, "load.err")[-2000:])
    assert _read(out, "param").strip() == "5"
    assert _read(out, "cdmm").strip() == "driver"
    assert "options nvidia NVreg_CoherentGPUMemoryMode=driver NVreg_Test=5" in _read(out, "dropin")
    # refcounts right: nvidia is used by nvidia_uvm and nvidia_modeset
    line = [l for l in mods.splitlines() if l.startswith("nvidia ")][0].split()
    assert line[2] == "2" and sorted(line[3].strip(",").split(",")) == ["nvidia_modeset", "nvidia_uvm"]
    assert _read(out, "state").strip() == "3522141578"
    assert _read(out, "pidfile").strip() == _read(out, "loader_pid").strip()
    assert _read(out, "rootfs").strip() == "mounted"
    # a second instance aborts with the reference's message
    assert _read(out, "second.rc").strip() == "1"
    assert "An instance of the NVIDIA driver is already running, aborting" in _read(out, "second.err")
    # the killed container's successor took the fast path: same modules, same load addresses, nothing unloaded
    init_ev = events(_read(out, "init.err"))
    assert any(e["event"].startswith("fast path: the driver is loaded with this configuration") for e in init_ev), (
        _read(out, "init.err")[-2000:]
    )
    until_ready = init_ev[: [e["event"] for e in init_ev].index("driver ready: waiting for a signal")]
    assert not any(e["event"] in ("unloaded NVIDIA modules", "loaded") for e in until_ready)
    assert _read(out, "fast_before") and _read(out, "fast_before") == _read(out, "fast_after")
    # the killed loader's driver root (a dead container's, on a real node) is mounted again from this root
    assert "driver root already mounted: mounting this container's root again" in _read(out, "init.err")
    # in use: refused, the holder named, nothing unloaded; SIGTERM keeps the container running
    assert _read(out, "busy.rc").strip() == "1"
    busy = _read(out, "busy.err")
    assert "driver is in use" in busy and "(sleep) has /dev/nvidiactl open" in busy
    assert _read(out, "alive_after_term").strip() == "alive"
    assert re.search(r"^nvidia ", _read(out, "modules_in_use"), re.M)
    in_use_logs = [e for e in events(_read(out, "init.err")) if e["event"].startswith("driver in use")]
    assert len(in_use_logs) == 1
    # holder gone, second SIGTERM: everything unloaded, unmounted, pid and state removed
    assert _read(out, "load.rc").strip() == "0"
    after = _read(out, "modules_after")
    assert not re.search(r"^nvidia", after, re.M), after
    assert "nvidia-driver.pid" not in _read(out, "run_nvidia_after")
    assert "nvidia-driver.state" not in _read(out, "run_nvidia_after")
    assert _read(out, "status_after") == ""  # not Ready any more
    assert _read(out, "rootfs_after") == ""
    # the 6.12 module was refused before insmod, with both vermagic strings
    wrong_msg = _read(out, "wrong.out")
    assert "refused before insmod" in wrong_msg and "LOADED" not in wrong_msg
    assert "'%s SMP preempt mod_unload modversions '" % k612 in wrong_msg
    assert "'%s SMP preempt mod_unload modversions '" % k in wrong_msg
    assert not re.search(r"^nvidia", _read(out, "modules_after_wrong"), re.M)
    # nv-ctr-run-with-dtk loads the verified hand-off, serves, and unloads on SIGTERM
    assert re.search(r"^nvidia_modeset ", _read(out, "modules_dtk"), re.M), _read(out, "dtk.err")[-3000:]
    assert "hand-off verified" in _read(out, "dtk.err")
    assert _read(out, "dtk.rc").strip() == "0"
    assert not re.search(r"^nvidia", _read(out, "modules_dtk_after"), re.M)


SIMPLE_LOAD = r"""
O=/run/out
timeout 900 python -m driver_ctr nvidia-driver load > $O/load.out 2> $O/load.err; echo $? > $O/load.rc
cat /proc/modules > $O/modules
"""


def test_unsigned_module_rejected_under_sig_enforce(tmp_path):
    k = _kernel()
    shared = _fixture_handoff(tmp_path, k, "unsigned")
    r = vm.boot(k, _guest_env(k, shared) + SIMPLE_LOAD, tmp_path / "out", VM_CACHE, append="module.sig_enforce=1")
    assert r.rc == 0, r.console[-3000:]
    err = _read(r.out, "load.err")
    assert _read(r.out, "load.rc").strip() == "1"
    assert "could not load nvidia: Key was rejected by service (EKEYREJECTED)" in err
    assert "Secure Boot or module.sig_enforce=1" in err and "nvidia.ko is not signed" in err
    assert "DRIVER_CTR_SIGNING_KEY" in err
    # drm, the kernel's own (Debian-signed) module, loaded as nvidia's dependency: only the unsigned one was refused
    assert re.search(r"^drm ", _read(r.out, "modules"), re.M)
    assert not re.search(r"^nvidia ", _read(r.out, "modules"), re.M)


def test_real_535_nvidia_reaches_init_and_reports_no_device(tmp_path):
    """The real proprietary nvidia.ko in a VM without an NVIDIA GPU: ENODEV is the
    cause; the Unknown symbol errors that nvidia-uvm would then hit are not."""
    k = _kernel()
    from test_build_real import _build  # the slow tier's build, restored from its artefact cache

    root = tmp_path / "real"
    root.mkdir()
    d, dtk, shared, m = _build(root, tmp_path, k, "proprietary")
    assert d.returncode == 0, d.stderr[-3000:]
    r = vm.boot(k, _guest_env(k, shared, KERNEL_MODULE_TYPE="proprietary") + SIMPLE_LOAD, tmp_path / "out", VM_CACHE)
    assert r.rc == 0, r.console[-3000:]
    err = _read(r.out, "load.err")
    print("VM cycle: %.1f s" % r.seconds)
    assert _read(r.out, "load.rc").strip() == "1", err[-3000:]
    assert "could not load nvidia: No such device (ENODEV)" in err, err[-3000:]
    assert "no NVIDIA GPU is visible to the kernel" in err
    assert "NVRM" in err  # the kernel log lines of the attempt are shown
    assert "Unknown symbol" not in err
    assert "nvidia-uvm" not in [e.get("module") for e in events(err) if e["event"] == "loaded"]


RDMA = r"""
set -u
O=/run/out
mkdir -p /drivers
printf 'peerdirect_support=1\n' > /drivers/nvidia-peermem.conf
python -m driver_ctr nvidia-driver load > $O/load.out 2> $O/load.err &
LOADER=$!
i=0; while [ $i -lt 1500 ]; do grep -qsx Ready /run/nvidia/validations/.driver-daemons-status && break; kill -0 $LOADER 2>/dev/null || break; sleep 0.2; i=$((i+1)); done
cat /proc/modules > $O/modules_ready
grep -qsx Ready /run/nvidia/validations/.driver-daemons-status || exit 0
ls -la /lib/modules/$DRIVER_CTR_KERNEL_RELEASE/kernel/drivers/video/ > $O/driver_root_video 2>&1
# the RDMA sidecar: MOFED and the driver container ready (the startup probe's flag), then its modprobe in the driver root
mkdir -p /run/mellanox/drivers && touch /run/mellanox/drivers/.driver-ready /run/nvidia/validations/.driver-ctr-ready
python -m driver_ctr nvidia-driver reload_nvidia_peermem > $O/peermem.out 2> $O/peermem.err &
SIDECAR=$!
i=0; while [ $i -lt 600 ]; do [ -d /sys/module/nvidia_peermem ] && break; kill -0 $SIDECAR 2>/dev/null || break; sleep 0.2; i=$((i+1)); done
cat /sys/module/nvidia_peermem/parameters/peerdirect_support > $O/peerdirect 2>&1
python -m driver_ctr nvidia-driver probe_nvidia_peermem > /dev/null 2>&1; echo $? > $O/probe.rc
kill -TERM $SIDECAR; wait $SIDECAR; echo $? > $O/peermem.rc
kill -TERM $LOADER; wait $LOADER; echo $? > $O/load.rc
cat /proc/modules > $O/modules_after
"""


def test_rdma_the_peermem_sidecar_loads_it_in_the_driver_root_with_its_parameters(tmp_path):
    """RDMA on, nvidia-peermem built against MOFED's tree; no Mellanox device, so the driver loads without it
    and reaches Ready; the sidecar's ``chroot /run/nvidia/driver modprobe nvidia-peermem`` then finds it in
    the driver root and loads it with /drivers/nvidia-peermem.conf's parameters; SIGTERM unloads it all."""
    from harness import make_ofa_kernel

    k = _kernel()
    root = tmp_path / "rdma"
    root.mkdir()
    make_ofa_kernel(root / "run/mellanox/drivers/usr/src/ofa_kernel/x86_64" / k)
    _, env = fixture_build_env(root, tmp_path / "rdma-work", k, GPU_DIRECT_RDMA_ENABLED="true")
    d, dtk = run_both(root, env)
    assert d.returncode == 0, d.stderr + dtk.stderr
    shared = make_shared_dir(root)
    r = vm.boot(k, _guest_env(k, shared, GPU_DIRECT_RDMA_ENABLED="true") + RDMA, tmp_path / "out", VM_CACHE)
    assert r.rc == 0, r.console[-3000:]
    err = _read(r.out, "load.err")
    ready = _read(r.out, "modules_ready")
    assert re.search(r"^nvidia_modeset ", ready, re.M), err[-3000:]
    assert not re.search(r"^nvidia_peermem ", ready, re.M)  # no Mellanox device: the driver does not load it
    assert "no Mellanox device" in err
    assert "nvidia-peermem.ko" in _read(r.out, "driver_root_video")  # the driver root holds the verified tree
    assert _read(r.out, "peerdirect").strip() == "1", _read(r.out, "peermem.err")[-3000:]
    assert "successfully loaded nvidia-peermem module" in _read(r.out, "peermem.err")
    assert _read(r.out, "probe.rc").strip() == "0"
    assert _read(r.out, "peermem.rc").strip() == "0"
    assert _read(r.out, "load.rc").strip() == "0"
    assert not re.search(r"^nvidia", _read(r.out, "modules_after"), re.M)  # peermem first, then the rest
