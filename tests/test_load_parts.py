"""The parts of loading that need no kernel: parameters, diagnoses, refcount
arithmetic, the pid lock, the firmware rule, daemons' pid checks."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from harness import events

from driver_ctr.node import module_params as mp
from driver_ctr.node.daemons import DAEMONS, configure_fabric_manager, nvlink5_present, nvswitch_present, stop_daemons
from driver_ctr.node.load_diagnosis import Facts, diagnose
from driver_ctr.node.state import (
    SECOND_INSTANCE,
    AlreadyRunning,
    PidLock,
    configure_firmware_path,
    host_selinux_enabled,
)
from driver_ctr.node.unload import ModuleState, in_use_reasons, loaded_nvidia_modules
from driver_ctr.toolkit.log import get_logger
from driver_ctr.toolkit.modinfo import ModInfo
from driver_ctr.toolkit.paths import HostPaths

LOG = get_logger(test=True)


def _info(**parms: str) -> ModInfo:
    return ModInfo(path="nvidia.ko", fields={"parmtype": tuple("%s:%s" % kv for kv in parms.items())})


# -- parameters --------------------------------------------------------------------


def test_parameters_checked_against_the_module(tmp_path):
    d = tmp_path / "drivers"
    d.mkdir()
    (d / "nvidia.conf").write_text(
        '# comment\nNVreg_EnableGpuFirmware=0 NVreg_RegistryDwords="a=1;b=2"\n\nNVreg_Temp=-3\n'
    )
    infos = {
        "nvidia": _info(
            NVreg_EnableGpuFirmware="uint",
            NVreg_RegistryDwords="charp",
            NVreg_Temp="int",
            NVreg_CoherentGPUMemoryMode="charp",
        )
    }
    params = mp.usable(mp.read_param_files(d), infos, get_logger())
    full = mp.with_defaults(params, infos)
    assert [p.name for p in full["nvidia"]][0] == "NVreg_CoherentGPUMemoryMode"
    text = mp.option_lines(full)["nvidia"]
    assert text.splitlines()[1] == (
        "options nvidia NVreg_CoherentGPUMemoryMode=driver NVreg_EnableGpuFirmware=0 "
        'NVreg_RegistryDwords="a=1;b=2" NVreg_Temp=-3'
    )
    # without the parameter declared, CDMM is not added
    assert (
        "CoherentGPUMemoryMode"
        not in mp.option_lines(
            mp.with_defaults(
                params,
                {"nvidia": _info(NVreg_EnableGpuFirmware="uint", NVreg_RegistryDwords="charp", NVreg_Temp="int")},
            )
        )["nvidia"]
    )


@pytest.mark.parametrize(
    "line,typ,needle",
    [
        ("NVreg_X=abc", "uint", "NVreg_X='abc': expected an integer (uint)"),
        ("NVreg_X=-1", "uint", "expected an integer (uint)"),
        ("NVreg_X=4294967296", "uint", "out of range for uint"),
        ("NVreg_X=maybe", "bool", "expected a boolean"),
        ("NVreg_X=1,x,3", "array of int", "expected an integer (int)"),
        ("NVreg_X", "uint", "NVreg_X=None: a bare word gives no value: the kernel refuses it for a uint parameter"),
        ('NVreg_X="1 2', "uint", "nvidia.conf:2: the line does not parse (a double quote is not closed)"),
        ("=1", "uint", "nvidia.conf:2: word 1 of the line is not name=value or a parameter name"),
    ],
)
def test_bad_parameters_name_file_line_and_known(tmp_path, line, typ, needle):
    d = tmp_path / "drivers"
    d.mkdir()
    (d / "nvidia.conf").write_text("NVreg_X=1\n" + line + "\n")
    with pytest.raises(mp.ParameterError) as e:
        mp.usable(mp.read_param_files(d), {"nvidia": _info(NVreg_X=typ)}, get_logger())
    msg = str(e.value)
    assert needle in msg
    assert "%s:2" % (d / "nvidia.conf") in msg


def test_parameters_as_the_kernel_treats_them_unknown_dropped_unloaded_module_ignored(tmp_path, capfd):
    """An unknown parameter is dropped with a warning naming the file, the line and the declared ones (the
    kernel ignores it too); a file for a module not being loaded is ignored with an info line."""
    d = tmp_path / "drivers"
    d.mkdir()
    (d / "nvidia.conf").write_text("NVreg_X=1\nNVreg_Bogus=2 NVreg_Y=3\n")
    (d / "nvidia-peermem.conf").write_text("peerdirect_support=1\n")
    kept = mp.usable(mp.read_param_files(d), {"nvidia": _info(NVreg_X="uint", NVreg_Y="int")}, get_logger())
    assert {m: [(p.name, p.value) for p in ps] for m, ps in kept.items()} == {
        "nvidia": [("NVreg_X", "1"), ("NVreg_Y", "3")]
    }
    logged = {e["event"]: e for e in events(capfd.readouterr().err)}
    dropped = logged["unknown module parameter dropped"]
    assert dropped["at"] == "%s:2" % (d / "nvidia.conf") and dropped["parameter"] == "NVreg_Bogus"
    assert dropped["declared"] == ["NVreg_X", "NVreg_Y"] and dropped["level"] == "warning"
    ignored = logged["parameter file ignored: its module is not being loaded"]
    assert ignored["file"] == str(d / "nvidia-peermem.conf") and ignored["level"] == "info"


def test_dropins_written_and_stale_ones_removed(tmp_path):
    d = tmp_path / "modprobe.d"
    params = {"nvidia": [mp.Param("nvidia", "NVreg_X", "1", "f:1")], "nvidia-uvm": []}
    written = mp.write_dropins(d, params)
    assert written == [d / "nvidia.conf"]
    (d / "nvidia-uvm.conf").write_text("# written by driver-ctr from x\noptions nvidia_uvm a=1\n")
    (d / "nvidia-modeset.conf").write_text("options nvidia_modeset mine=1\n")  # the admin's own: kept
    mp.write_dropins(d, params)
    assert not (d / "nvidia-uvm.conf").exists() and (d / "nvidia-modeset.conf").exists()


# -- diagnoses -------------------------------------------------------------------------


def test_enodev_with_and_without_nouveau():
    log = ["NVRM: No NVIDIA GPU found."]
    e = diagnose(Facts("nvidia"), "modprobe: ERROR: could not insert 'nvidia': No such device", log)
    assert "No such device (ENODEV): no NVIDIA GPU is visible" in str(e) and "NVRM: No NVIDIA GPU found." in str(e)
    e = diagnose(Facts("nvidia", nouveau_loaded=True), "could not insert 'nvidia': No such device", log)
    assert "nouveau" in e.cause and "blacklist" in e.next_step


def test_enoexec_shows_both_vermagic_strings():
    e = diagnose(
        Facts(
            "nvidia",
            module_vermagic="6.12.95+deb12-amd64 SMP preempt mod_unload modversions ",
            kernel_vermagic="6.1.0-56-amd64 SMP preempt mod_unload modversions ",
        ),
        "could not insert 'nvidia': Exec format error",
        [],
    )
    assert "6.12.95+deb12-amd64 SMP" in str(e) and "6.1.0-56-amd64 SMP" in str(e)


def test_unknown_symbol_names_symbols_and_the_missing_module():
    log = [
        "nvidia_uvm: Unknown symbol nvUvmInterfaceSessionCreate (err -2)",
        "nvidia_uvm: Unknown symbol nvUvmInterfaceDeviceCreate (err -2)",
    ]
    e = diagnose(
        Facts("nvidia-uvm", symbol_providers={"nvUvmInterfaceSessionCreate": "nvidia"}),
        "could not insert 'nvidia_uvm': Unknown symbol in module, or unknown parameter (see dmesg)",
        log,
    )
    assert "Unknown symbols nvUvmInterfaceDeviceCreate, nvUvmInterfaceSessionCreate" in e.cause
    assert "provided by nvidia, which is not loaded" in e.cause


def test_key_rejected_and_eexist():
    e = diagnose(Facts("nvidia", signed=True), "could not insert 'nvidia': Key was rejected by service", [])
    assert "signed with a key the kernel does not trust" in e.cause and "mokutil" in e.next_step
    e = diagnose(Facts("nvidia"), "could not insert 'nvidia': File exists", [])
    assert "already loaded" in e.cause and "unload" in e.next_step


# -- unload arithmetic -------------------------------------------------------------------


def test_in_use_reasons():
    mods = {
        "nvidia_modeset": ModuleState("nvidia_modeset", 0),
        "nvidia_uvm": ModuleState("nvidia_uvm", 0),
        "nvidia": ModuleState("nvidia", 2, ("nvidia_modeset", "nvidia_uvm")),
    }
    assert in_use_reasons(mods) == []
    mods["nvidia"] = ModuleState("nvidia", 3, ("nvidia_modeset", "nvidia_uvm"))
    assert in_use_reasons(mods) == ["nvidia has 1 reference(s) besides its dependent modules"]
    mods["nvidia"] = ModuleState("nvidia", 3, ("nvidia_modeset", "nvidia_uvm", "i915_fake"))
    assert in_use_reasons(mods) == ["nvidia is used by module(s) i915_fake"]
    mods["nvidia_uvm"] = ModuleState("nvidia_uvm", 1)
    assert "nvidia_uvm has 1 reference(s)" in in_use_reasons(mods)[0]


def test_loaded_modules_read_from_sysfs(tmp_path):
    for name, ref, holders in (("nvidia", "1", ["nvidia_uvm"]), ("nvidia_uvm", "0", [])):
        d = tmp_path / "module" / name
        (d / "holders").mkdir(parents=True)
        (d / "refcnt").write_text(ref + "\n")
        for h in holders:
            (d / "holders" / h).touch()
    (tmp_path / "module/nvidia_drm").mkdir()  # built in: no refcnt
    mods = loaded_nvidia_modules(tmp_path)
    assert list(mods) == ["nvidia_uvm", "nvidia"] and mods["nvidia"].holders == ("nvidia_uvm",)


# -- node state ---------------------------------------------------------------------------


def test_second_instance_aborts_and_does_not_wipe_the_pid(tmp_path):
    pid_file = tmp_path / "run/nvidia/nvidia-driver.pid"
    code = (
        "import sys,time; sys.path.insert(0, %r); from driver_ctr.node.state import PidLock; "
        "lock = PidLock(__import__('pathlib').Path(%r)).acquire(); print('locked', flush=True); time.sleep(30)"
        % (str(Path(__file__).resolve().parent.parent), str(pid_file))
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(AlreadyRunning) as e:
            PidLock(pid_file).acquire()
        assert str(e.value) == SECOND_INSTANCE
        assert pid_file.read_text().strip() == str(holder.pid)  # not truncated by the loser
    finally:
        holder.kill()
        holder.wait()
    lock = PidLock(pid_file).acquire()
    assert pid_file.read_text().strip() == str(os.getpid())
    lock.release()
    assert not pid_file.exists()


def test_firmware_rule(tmp_path):
    paths = HostPaths(root=str(tmp_path))
    fw = paths.firmware_search_path
    fw.parent.mkdir(parents=True)
    fw.write_text("\n")
    assert configure_firmware_path(paths, {"NVreg_EnableGpuFirmware": "0"}, LOG) == "skipped"
    assert fw.read_text() == "\n"
    assert configure_firmware_path(paths, {}, LOG) == "set"
    assert fw.read_text() == "/run/nvidia/driver/lib/firmware"
    fw.write_text("/lib/firmware/custom\n")
    assert configure_firmware_path(paths, {}, LOG) == "retained"
    assert fw.read_text() == "/lib/firmware/custom\n"


def test_selinux_detection_through_proc_1(tmp_path):
    paths = HostPaths(root=str(tmp_path))
    (tmp_path / "proc/1").mkdir(parents=True)
    (tmp_path / "proc/1/mounts").write_text("sysfs /sys sysfs rw 0 0\n")
    assert not host_selinux_enabled(paths)
    (tmp_path / "proc/1/mounts").write_text("selinuxfs /sys/fs/selinux selinuxfs rw 0 0\n")
    assert not host_selinux_enabled(paths)
    (tmp_path / "proc/1/root/sys/fs/selinux").mkdir(parents=True)
    (tmp_path / "proc/1/root/sys/fs/selinux/enforce").write_text("1")
    assert host_selinux_enabled(paths)


# -- daemons ---------------------------------------------------------------------------


def test_fabric_manager_config_without_a_shell(tmp_path):
    cfg = tmp_path / "fabricmanager.cfg"
    cfg.write_text("LOG_LEVEL=4\nFABRIC_MODE=0\n# FABRIC_MODE=2\n")
    changed = configure_fabric_manager(cfg, (("FABRIC_MODE", "1"), ("LOG_FILE_NAME", "/var/log/a&b|c;$(x)")))
    assert changed == ["FABRIC_MODE", "LOG_FILE_NAME"]
    assert cfg.read_text() == "LOG_LEVEL=4\nFABRIC_MODE=1\n# FABRIC_MODE=2\nLOG_FILE_NAME=/var/log/a&b|c;$(x)\n"


def test_nvswitch_and_nvlink5_detection(tmp_path):
    paths = HostPaths(root=str(tmp_path))
    assert not nvswitch_present(paths) and not nvlink5_present(paths)
    (tmp_path / "proc/driver/nvidia-nvswitch/devices").mkdir(parents=True)
    assert not nvswitch_present(paths)
    (tmp_path / "proc/driver/nvidia-nvswitch/devices/0000:05:00.0").touch()
    assert nvswitch_present(paths)
    vpd = tmp_path / "sys/class/infiniband/mlx5_0/device/vpd"
    vpd.parent.mkdir(parents=True)
    vpd.write_bytes(b"\x82\x10PN SW_MNG stuff")
    assert nvlink5_present(paths)


def test_stale_pid_file_never_signals_an_unrelated_process(tmp_path):
    paths = HostPaths(root=str(tmp_path))
    persistenced = DAEMONS[0]
    pf = paths.host(persistenced.pid_file)
    pf.parent.mkdir(parents=True)
    unrelated = subprocess.Popen(["sleep", "30"])
    fake = tmp_path / "nvidia-persistenced"
    shutil.copy("/bin/sleep", str(fake))
    ours = subprocess.Popen([str(fake), "30"])
    try:
        pf.write_text("%d\n" % unrelated.pid)
        stop_daemons(paths, LOG)  # synchronous: a signalled daemon is waited for, so it would be gone now
        assert unrelated.poll() is None  # still running: not ours
        pf.write_text("%d\n" % ours.pid)
        stop_daemons(paths, LOG)
        assert ours.wait(timeout=5) is not None
    finally:
        for p in (unrelated, ours):
            if p.poll() is None:
                p.kill()
                p.wait()


def test_userspace_install_runs_the_installer_with_the_reference_flags(tmp_path):
    from driver_ctr.node.userspace import userspace_install
    from driver_ctr.toolkit.runner import Runner
    from driver_ctr.toolkit.settings import Settings

    env = {
        "DRIVER_VERSION": "535.261.03",
        "TARGETARCH": "amd64",
        "DRIVER_CTR_ROOT": str(tmp_path),
        "DRIVER_CTR_KERNEL_RELEASE": "6.1.0-56-amd64",
    }
    s = Settings.from_env(env)
    assert userspace_install(Settings.from_env(dict(env, DRIVER_CTR_USERSPACE="none")), Runner(), LOG) is False
    drivers = tmp_path / "drivers"
    drivers.mkdir()
    args_file = tmp_path / "args"
    script = 'printf "%%s\\n" "$@" > %s\nmkdir -p %s/usr/bin && touch %s/usr/bin/nvidia-persistenced\n'
    (drivers / "NVIDIA-Linux-x86_64-535.261.03.run").write_text(script % (args_file, tmp_path, tmp_path))
    assert userspace_install(s, Runner(), LOG) is True
    args = args_file.read_text().split()
    for flag in (
        "--silent",
        "--no-kernel-module",
        "--install-compat32-libs",
        "--no-nouveau-check",
        "--no-nvidia-modprobe",
        "--no-rpms",
        "--no-backup",
        "--no-check-for-alternate-installs",
        "--no-libglx-indirect",
        "--no-install-libglvnd",
        "--x-prefix=/tmp/null",
    ):
        assert flag in args, flag
    assert "--accept-license" not in args
    userspace_install(s, Runner(), LOG, accept_license=True)
    assert "--accept-license" in args_file.read_text().split()


def test_nvlink5_waits_for_mofed_modules_then_starts_fm_with_config_and_resets(tmp_path):
    import threading

    from fakes import FakeRunner

    from driver_ctr.node.daemons import start_daemons
    from driver_ctr.toolkit.settings import Settings
    from driver_ctr.toolkit.waiting import Cancellation

    if shutil.which("nvidia-persistenced"):
        pytest.skip("a real nvidia-persistenced is installed here")
    env = {
        "DRIVER_VERSION": "535.261.03",
        "TARGETARCH": "amd64",
        "DRIVER_CTR_ROOT": str(tmp_path),
        "DRIVER_CTR_KERNEL_RELEASE": "6.1.0-56-amd64",
        "NVFM_CONFIG_FABRIC_MODE": "1",
    }
    s = Settings.from_env(env)
    vpd = tmp_path / "sys/class/infiniband/mlx5_0/device/vpd"
    vpd.parent.mkdir(parents=True)
    vpd.write_bytes(b"..SW_MNG..")
    cfg = tmp_path / "usr/share/nvidia/nvswitch/fabricmanager.cfg"
    cfg.parent.mkdir(parents=True)
    cfg.write_text("FABRIC_MODE=0\n")
    (tmp_path / "sys/module/mlx5_core").mkdir(parents=True)
    runner = FakeRunner()
    runner.expect(("/usr/bin/nvidia-fabricmanager-start.sh", "--mode", "start"))
    runner.expect(("nvidia-smi", "-r"))
    # ib_umad appears once start_daemons is waiting for it (its "waiting" event), never before: the wait is proven
    waiting = threading.Event()
    log = _Notify(LOG, "waiting", waiting)
    threading.Thread(target=lambda: waiting.wait(30) and (tmp_path / "sys/module/ib_umad").mkdir()).start()
    started = start_daemons(s, runner, log, Cancellation())
    assert waiting.is_set()
    assert started == ["fabric-manager"]
    assert [c[0] for c in runner.calls] == ["/usr/bin/nvidia-fabricmanager-start.sh", "nvidia-smi"]
    assert str(cfg) in runner.calls[0]
    assert cfg.read_text() == "FABRIC_MODE=1\n"


class _Notify:
    """A logger that sets ``flag`` when ``event`` is logged, and passes every call on."""

    def __init__(self, log, event, flag):  # type: ignore[no-untyped-def]
        self.log, self.event, self.flag = log, event, flag

    def __getattr__(self, name):  # type: ignore[no-untyped-def]
        method = getattr(self.log, name)

        def call(event, *a, **kw):  # type: ignore[no-untyped-def]
            if event == self.event:
                self.flag.set()
            return method(event, *a, **kw)

        return call


@pytest.mark.parametrize("stale", [False, True])
def test_a_driver_root_left_mounted_by_a_killed_container_is_mounted_again(tmp_path, stale):
    """The killed container's rbind (its root, gone) is unmounted, then this root is bound; no stale
    mount is ever kept, the fast path included (it serves through the same step)."""
    from fakes import FakeRunner

    from driver_ctr.node.state import mount_rootfs

    paths = HostPaths(str(tmp_path))
    (tmp_path / "proc/self").mkdir(parents=True)
    target = paths.driver_root
    mounts = "overlay / overlay rw 0 0\n" + ("overlay %s overlay rw 0 0\n" % target if stale else "")
    (tmp_path / "proc/self/mounts").write_text(mounts)
    runner = FakeRunner()
    runner.expect(("umount",))
    runner.expect(("mount",))
    mount_rootfs(paths, runner, get_logger())
    calls = [c[:2] for c in runner.calls]
    assert calls == ([("umount", "-l")] if stale else []) + [
        ("mount", "--make-runbindable"),
        ("mount", "--make-private"),
        ("mount", "--rbind"),
    ]
    # re-rooted as every host path: a test's root, never the host's own / and /sys (issue 20.10)
    assert runner.calls[-3:] == [
        ("mount", "--make-runbindable", str(tmp_path / "sys")),
        ("mount", "--make-private", str(tmp_path / "sys")),
        ("mount", "--rbind", str(tmp_path), str(target)),
    ]


def test_the_loaded_tree_is_published_in_the_driver_roots_lib_modules(tmp_path):
    """No tree of that kernel in the container: a link to the verified tree (withdrawn on shutdown); the
    fallback's real directory: NVIDIA's modules copied beside the kernel's and indexed by depmod."""
    from fakes import FakeRunner

    from driver_ctr.node.state import publish_modules, withdraw_modules

    paths = HostPaths(str(tmp_path))
    tree = tmp_path / "run/nvidia/driver-ctr/trees/k-1"
    (tree / "kernel/drivers/video").mkdir(parents=True)
    (tree / "kernel/drivers/video/nvidia-peermem.ko").write_bytes(b"\x7fELF peermem")
    publish_modules(paths, tree, "6.1.0-1-amd64", FakeRunner(), get_logger())  # no command: a link
    link = tmp_path / "lib/modules/6.1.0-1-amd64"
    assert link.is_symlink() and link.resolve() == tree.resolve()
    withdraw_modules(paths, tree, "6.1.0-1-amd64")
    assert not link.exists() and not link.is_symlink()
    real = tmp_path / "lib/modules/6.1.0-2-amd64"
    (real / "kernel/fs").mkdir(parents=True)
    runner = FakeRunner()
    runner.expect(("depmod",))
    publish_modules(paths, tree, "6.1.0-2-amd64", runner, get_logger())
    assert (real / "kernel/drivers/video/nvidia-peermem.ko").read_bytes() == b"\x7fELF peermem"
    assert runner.calls == [("depmod", "-b", str(tmp_path), "6.1.0-2-amd64")]
    withdraw_modules(paths, tree, "6.1.0-2-amd64")
    assert real.is_dir()  # a real directory is the container's: left as it is


def test_on_the_fast_path_with_rdma_the_loaded_drivers_tree_is_found_and_published(root, tmp_path):
    """A restarted container takes the fast path (nothing to load) but has lost its /lib/modules link:
    the tree whose nvidia.ko has the loaded srcversion is found among the sources that never build (here
    the shared dir's build) and linked again, for the nvidia-peermem sidecar's chroot modprobe; another
    build (a srcversion that differs) is never published, and the warning says why."""
    from fakes import FakeRunner
    from harness import RHEL_KERNEL, env_for, fixture_srcversion, make_dtk_image, make_fixture_modules, run_both

    from driver_ctr.module_trees import Miss, loaded_tree
    from driver_ctr.service import Service
    from driver_ctr.toolkit.settings import Settings
    from driver_ctr.toolkit.waiting import Cancellation
    from driver_ctr.tools import Tools

    make_dtk_image(root)
    fixture = make_fixture_modules(tmp_path / "fx", RHEL_KERNEL)
    env = env_for(root, DRIVER_CTR_FIXTURE_MODULES=str(fixture), GPU_DIRECT_RDMA_ENABLED="true")
    d, _ = run_both(root, env)
    assert d.returncode == 0, d.stderr
    nvidia = root / "sys/module/nvidia"
    nvidia.mkdir(parents=True)
    (nvidia / "srcversion").write_text(fixture_srcversion("nvidia", RHEL_KERNEL) + "\n")
    settings = Settings.from_env(env)
    runner = FakeRunner()
    runner.expect(("depmod",))
    service = Service(settings, Cancellation(), Tools(runner=runner))
    service.publish_loaded()
    assert service.published is not None and service.published.source == "shared dir"
    # this root's /lib/modules/<kernel> is a real directory (the DTK image's, in these tests): copied beside
    published = root / "lib/modules" / RHEL_KERNEL / "kernel/drivers/video/nvidia.ko"
    assert published.read_bytes() == (service.published.root / "kernel/drivers/video/nvidia.ko").read_bytes()
    assert runner.calls == [("depmod", "-b", str(root), RHEL_KERNEL)]

    (nvidia / "srcversion").write_text("0123456789ABCDEF01234567\n")  # a driver of another build is loaded
    found = loaded_tree(settings, Cancellation(), Tools(runner=runner))
    assert isinstance(found, Miss)
    assert (
        "shared dir: nvidia.ko is srcversion %s, the loaded one 0123456789ABCDEF01234567"
        % (fixture_srcversion("nvidia", RHEL_KERNEL))
        in found.reason
    )
    assert "precompiled: the image carries none" in found.reason and "host cache: not mounted" in found.reason


def test_undo_runs_every_step_when_the_unload_raises(root):
    """The old driver is in use before a load, so the unload raises; the undo still removes the readiness
    file and releases the lock (and removes the pid file), then raises the first error. The old driver is
    still loaded: its state file stays (k8s-driver-manager reads it)."""
    import types

    from fakes import FakeRunner
    from harness import env_for

    from driver_ctr.node.unload import DriverInUse
    from driver_ctr.service import Service
    from driver_ctr.toolkit.settings import Settings
    from driver_ctr.toolkit.waiting import Cancellation
    from driver_ctr.tools import Tools

    settings = Settings.from_env(env_for(root))
    (root / "sys/module/nvidia").mkdir(parents=True)
    (root / "sys/module/nvidia/refcnt").write_text("1\n")  # held by something that is not ours
    settings.paths.state_file.parent.mkdir(parents=True, exist_ok=True)
    settings.paths.state_file.write_text("an earlier digest\n")
    runner = FakeRunner()  # no command is expected: the unload refuses before any modprobe
    service = Service(settings, Cancellation(), Tools(runner=runner))
    with pytest.raises(DriverInUse):
        service.run(lambda _svc: types.SimpleNamespace(source="test", root=root, kernel="k"))
    assert not settings.paths.pid_file.exists()
    assert not (settings.paths.validations_dir / ".driver-daemons-status").exists()
    assert settings.paths.state_file.read_text() == "an earlier digest\n"
    assert runner.calls == []


def test_bare_words_and_double_quotes_as_modprobe_and_the_kernel_take_them(tmp_path, capfd):
    """The operator's kernel-module-parameters ConfigMap: a bare bool is true, an unknown bare word is dropped
    with a warning (the kernel ignores it), a double-quoted value (spaces, semicolons) is checked without its
    quotes and written with them, as modprobe passes it to the kernel."""
    d = tmp_path / "drivers"
    d.mkdir()
    (d / "nvidia.conf").write_text('NVreg_Flag NVreg_Unknown\nNVreg_RegistryDwords="RMA=1;RMB=2" NVreg_N="7"\n')
    info = _info(NVreg_Flag="bool", NVreg_RegistryDwords="charp", NVreg_N="uint")
    kept = mp.usable(mp.read_param_files(d), {"nvidia": info}, get_logger())
    assert [p.word for p in kept["nvidia"]] == ["NVreg_Flag", 'NVreg_RegistryDwords="RMA=1;RMB=2"', 'NVreg_N="7"']
    assert [p.kernel_value for p in kept["nvidia"]] == [None, "RMA=1;RMB=2", "7"]
    assert "unknown module parameter dropped" in capfd.readouterr().err
    text = mp.option_lines(kept)["nvidia"]
    assert text.splitlines()[-1] == 'options nvidia NVreg_Flag NVreg_RegistryDwords="RMA=1;RMB=2" NVreg_N="7"'
