"""The parts of the build that need no compiler run: job bounds, kernel
configuration, sources and flavour, error extraction, the cancellable runner."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import psutil
import pytest
from fakes import FakeRunner
from harness import PROMPT_S, installed_kernels

from driver_ctr.toolkit.builders import find_source
from driver_ctr.toolkit.errors import BuildFailed, Cancelled, CommandFailed
from driver_ctr.toolkit.jobs import MEMORY_PER_JOB, plan_jobs
from driver_ctr.toolkit.kbuild import first_error
from driver_ctr.toolkit.kernel_tree import compiler_version, open_kernel_tree, parse_config
from driver_ctr.toolkit.paths import HostPaths
from driver_ctr.toolkit.runner import Runner
from driver_ctr.toolkit.sources import EXTRACTED_MARKER, extract_run, open_sources, resolve_flavour
from driver_ctr.toolkit.waiting import Cancellation

# -- jobs ---------------------------------------------------------------------


def _fake_cgroup_v2(tmp: Path, cpu_max: str = "max 100000", mem_max: str = "max", avail_kb: int = 64 << 20):
    proc, sys_ = tmp / "proc", tmp / "sys"
    (proc / "self").mkdir(parents=True)
    (proc / "self/cgroup").write_text("0::/kubepods/pod1/ctr\n")
    cg = sys_ / "fs/cgroup/kubepods/pod1/ctr"
    cg.mkdir(parents=True)
    (cg / "cgroup.controllers").write_text("cpu memory\n")
    (cg / "cpu.max").write_text(cpu_max + "\n")
    (cg / "memory.max").write_text(mem_max + "\n")
    (proc / "meminfo").write_text("MemTotal: 99999999 kB\nMemAvailable: %d kB\n" % avail_kb)
    return proc, sys_


def test_jobs_bounded_by_cgroup_v2_cpu_quota(tmp_path):
    proc, sys_ = _fake_cgroup_v2(tmp_path, cpu_max="150000 100000")
    plan = plan_jobs(proc, sys_)
    assert plan.limits["cpu_quota"] == 2  # 1.5 CPUs round up
    assert plan.jobs == min(2, plan.limits["affinity"])


def test_jobs_bounded_by_memory_and_by_max_threads(tmp_path):
    proc, sys_ = _fake_cgroup_v2(tmp_path, mem_max=str(int(1.5 * MEMORY_PER_JOB)))
    plan = plan_jobs(proc, sys_)
    assert plan.limits["memory"] == 1 and plan.jobs == 1 and "memory" in plan.bound_by
    proc2, sys2 = _fake_cgroup_v2(tmp_path / "b")
    plan2 = plan_jobs(proc2, sys2, max_threads=1)
    assert plan2.jobs == 1 and plan2.bound_by.endswith("max_threads")
    assert "cpu_quota" not in plan2.limits  # "max" means no quota


def test_jobs_cgroup_v1_quota(tmp_path):
    proc, sys_ = tmp_path / "proc", tmp_path / "sys"
    (proc / "self").mkdir(parents=True)
    (proc / "self/cgroup").write_text("4:cpu,cpuacct:/pod\n3:memory:/pod\n")
    cpu = sys_ / "fs/cgroup/cpu/pod"
    cpu.mkdir(parents=True)
    (cpu / "cpu.cfs_quota_us").write_text("100000\n")
    (cpu / "cpu.cfs_period_us").write_text("100000\n")
    plan = plan_jobs(proc, sys_)
    assert plan.limits["cpu_quota"] == 1 and plan.jobs == 1


def test_jobs_on_this_machine_never_exceed_the_cpus():
    plan = plan_jobs(Path("/proc"), Path("/sys"))
    assert 1 <= plan.jobs <= len(os.sched_getaffinity(0))


# -- kernel configuration ---------------------------------------------------------


def test_parse_config_and_compiler_versions():
    cfg = parse_config(
        'CONFIG_SMP=y\n# CONFIG_PREEMPT_RT is not set\nCONFIG_CC_VERSION_TEXT="gcc (GCC) 11.4.1 '
        '20231218 (Red Hat 11.4.1-3)"\nCONFIG_X=12\n'
    )
    assert cfg == {
        "CONFIG_SMP": "y",
        "CONFIG_CC_VERSION_TEXT": "gcc (GCC) 11.4.1 20231218 (Red Hat 11.4.1-3)",
        "CONFIG_X": "12",
    }
    assert compiler_version(cfg["CONFIG_CC_VERSION_TEXT"]) == "11.4.1"
    assert compiler_version("gcc-12 (Debian 12.2.0-14+deb12u1) 12.2.0") == "12.2.0"
    assert compiler_version("x86_64-linux-gnu-gcc-12 (Debian 12.2.0-14+deb12u1) 12.2.0") == "12.2.0"


@pytest.mark.parametrize("kernel", installed_kernels() or ["none"])
def test_vermagic_derived_from_config_equals_the_kernels_own_modules(kernel):
    """The config-derived flags (used when a DTK has no kernel modules) must equal
    the vermagic of the kernel's real modules."""
    if kernel == "none":
        pytest.skip("no kernel headers with modules installed (scripts/test installs them)")
    tree = open_kernel_tree(HostPaths(), kernel)
    ref = tree.reference_module()
    assert ref is not None
    derived = "%s %s " % (kernel, tree.config_vermagic_flags())
    assert tree.reference_vermagic() == derived
    assert tree.split  # Debian: source and build differ
    assert tree.preempt_rt == kernel.endswith("-rt-amd64")


def test_missing_build_tree_and_missing_config_are_named(tmp_path):
    paths = HostPaths(root=str(tmp_path))
    with pytest.raises(BuildFailed) as e:
        open_kernel_tree(paths, "5.14.0-1.el9.x86_64")
    assert "no kernel build tree for 5.14.0-1.el9.x86_64" in str(e.value) and "kernel-devel" in str(e.value)
    tree = tmp_path / "usr/src/kernels/5.14.0-1.el9.x86_64"
    tree.mkdir(parents=True)
    (tree / "Makefile").write_text("")
    mod = tmp_path / "lib/modules/5.14.0-1.el9.x86_64"
    mod.mkdir(parents=True)
    (mod / "build").symlink_to("/usr/src/kernels/5.14.0-1.el9.x86_64")
    with pytest.raises(BuildFailed) as e:
        open_kernel_tree(paths, "5.14.0-1.el9.x86_64")
    assert "has no .config" in str(e.value)
    (tree / ".config").write_text("CONFIG_SMP=y\nCONFIG_PREEMPT_RT=y\n")
    t = open_kernel_tree(paths, "5.14.0-1.el9.x86_64")
    assert t.sysout == tree.resolve() and t.syssrc == t.sysout and not t.split and t.preempt_rt
    assert t.config_vermagic_flags() == "SMP preempt_rt"


# -- sources and flavour --------------------------------------------------------

RUN_SCRIPT = """#!/bin/sh
# A stand-in for a makeself .run: sh FILE -x --target DIR
[ "$1" = -x ] && [ "$2" = --target ] || { echo "usage: -x --target DIR" >&2; exit 2; }
echo extracting >> "%(count)s"
mkdir -p "$3/kernel" "$3/kernel-open"
echo "# NVIDIA" > "$3/kernel/Makefile"
echo "# NVIDIA open" > "$3/kernel-open/Makefile"
printf '#!/bin/sh\\necho %(recommend)s\\n' > "$3/nvidia-installer"
chmod +x "$3/nvidia-installer"
%(extra)s
"""


def _run_file(d: Path, recommend: str = "open", extra: str = "") -> Path:
    d.mkdir(parents=True, exist_ok=True)
    run = d / "NVIDIA-Linux-x86_64-535.261.03.run"
    run.write_text(RUN_SCRIPT % {"count": d / "count", "recommend": recommend, "extra": extra})
    return run


def test_run_file_is_extracted_once_and_reused(tmp_path):
    run = _run_file(tmp_path / "drivers")
    scratch = tmp_path / "scratch"
    found = find_source("", [tmp_path / "nothing", tmp_path / "drivers"], "x86_64", "535.261.03")
    assert found == run
    src = open_sources(found, scratch, Runner())
    assert src.root == scratch / "NVIDIA-Linux-x86_64-535.261.03"
    assert src.flavours() == ("open", "proprietary") and src.installer is not None
    assert (src.root / EXTRACTED_MARKER).is_file()
    extract_run(run, scratch, Runner())
    assert (tmp_path / "drivers/count").read_text().count("extracting") == 1
    # a new .run (size/mtime change) is extracted again
    run.write_text(run.read_text() + "\n# v2\n")
    extract_run(run, scratch, Runner())
    assert (tmp_path / "drivers/count").read_text().count("extracting") == 2


def test_crash_mid_extraction_leaves_nothing_trusted(tmp_path):
    run = _run_file(tmp_path / "drivers", extra="exit 3")
    scratch = tmp_path / "scratch"
    with pytest.raises(BuildFailed) as e:
        extract_run(run, scratch, Runner())
    assert "extracting" in str(e.value) and str(run) in str(e.value)
    assert not (scratch / "NVIDIA-Linux-x86_64-535.261.03").exists()
    assert not list(scratch.glob(".extract-*"))
    # a leftover of a killed extraction is removed on the next attempt
    (scratch / ".extract-99999/kernel").mkdir(parents=True)
    run = _run_file(tmp_path / "drivers")
    extract_run(run, scratch, Runner())
    assert not list(scratch.glob(".extract-*"))


def test_no_sources_names_where_it_looked(tmp_path):
    with pytest.raises(BuildFailed) as e:
        find_source("", [tmp_path / "a", tmp_path / "b"], "x86_64", "535.261.03")
    msg = str(e.value)
    assert "NVIDIA-Linux-x86_64-535.261.03.run" in msg and str(tmp_path / "a") in msg and "DRIVER_CTR_SOURCE_DIR" in msg
    (tmp_path / "empty").mkdir()
    with pytest.raises(BuildFailed) as e:
        open_sources(find_source(str(tmp_path / "empty"), [], "x86_64", "535.261.03"), tmp_path / "s", Runner())
    assert "kernel-open/" in str(e.value) and str(tmp_path / "empty") in str(e.value)


def test_flavour_rules(tmp_path):
    run = _run_file(tmp_path / "drivers", recommend="open")
    src = extract_run(run, tmp_path / "s", Runner())
    assert resolve_flavour("auto", 535, src, Runner()).name == "open"  # the installer decides
    assert "recommends 'open'" in resolve_flavour("auto", 535, src, Runner()).reason
    assert resolve_flavour("proprietary", 580, src, Runner()).subdir == "kernel"
    broken = FakeRunner()
    broken.expect((str(src.installer),), returncode=1, stderr="unknown option")
    f = resolve_flavour("auto", 535, src, broken)
    assert f.name == "proprietary" and "535 < 560" in f.reason
    assert resolve_flavour("auto", 560, src, broken).name == "open"
    only_kernel = tmp_path / "only"
    (only_kernel / "kernel").mkdir(parents=True)
    (only_kernel / "kernel/Makefile").write_text("")
    s2 = open_sources(only_kernel, tmp_path / "s", Runner())
    with pytest.raises(BuildFailed) as e:
        resolve_flavour("open", 535, s2, Runner())
    assert "KERNEL_MODULE_TYPE=open" in str(e.value) and "has no kernel-open/" in str(e.value)


# -- build output ---------------------------------------------------------------------


def test_first_error_picks_the_compiler_error_and_strips_the_scratch_dir():
    work = Path("/tmp/driver-ctr/build-12")
    log = (
        "  CC [M]  /tmp/driver-ctr/build-12/nvidia/nv.o\n"
        "/tmp/driver-ctr/build-12/nvidia/nv-pci.c: In function 'nv_resize_pcie_bars':\n"
        "/tmp/driver-ctr/build-12/nvidia/nv-pci.c:213:5: error: too few arguments to function 'pci_resize_resource'\n"
        "make[3]: *** [scripts/Makefile.build:250: nvidia/nv-pci.o] Error 1\n"
    )
    assert (
        first_error(log.splitlines(), work)
        == "nvidia/nv-pci.c:213:5: error: too few arguments to function 'pci_resize_resource'"
    )
    assert (
        first_error(
            "conftest\n*** Failed PREEMPT_RT sanity check. Bailing out! ***\nmake: Error 1\n".splitlines(), work
        )
        == "*** Failed PREEMPT_RT sanity check. Bailing out! ***"
    )
    assert first_error([], work) == "the build printed nothing"


# -- the cancellable runner -------------------------------------------------------------


def test_cancel_stops_the_whole_process_group(tmp_path):
    pidfile = tmp_path / "grandchild"
    script = "sleep 60 & echo $! > %s; wait" % pidfile
    cancel = Cancellation()
    started = {}

    def cancel_once_the_grandchild_runs() -> None:  # the event the test means, not a timer's guess
        end = time.monotonic() + 30
        while not pidfile.exists() and time.monotonic() < end:
            time.sleep(0.01)
        started["t"] = time.monotonic()
        cancel.set()

    threading.Thread(target=cancel_once_the_grandchild_runs).start()
    with pytest.raises(Cancelled):
        Runner().run(["sh", "-c", script], cancel=cancel, timeout=60)
    assert time.monotonic() - started["t"] < PROMPT_S
    grandchild = int(pidfile.read_text())
    end = time.monotonic() + PROMPT_S  # the group's TERM is delivered: gone, or a zombie nobody reaps here
    while time.monotonic() < end:
        try:
            if psutil.Process(grandchild).status() == psutil.STATUS_ZOMBIE:
                break
        except psutil.NoSuchProcess:
            break
        time.sleep(0.01)
    else:
        raise AssertionError("the grandchild %d still runs after the cancellation" % grandchild)


def test_cancellable_run_times_out_and_captures_output(tmp_path):
    with pytest.raises(CommandFailed) as e:
        Runner().run(["sh", "-c", "sleep 30"], cancel=Cancellation(), timeout=0.6)
    assert "timed out" in str(e.value)
    r = Runner().run(["sh", "-c", "echo hi; echo err >&2; exit 3"], cancel=Cancellation(), check=False)
    assert r.returncode == 3 and r.stdout == "hi\n" and r.stderr == "err\n"  # both kept, not merged


@pytest.mark.parametrize("use_host_mofed", ["false", "true"])
def test_mofeds_tree_is_found_at_the_operators_mount_either_way(tmp_path, use_host_mofed):
    """The operator mounts the MOFED container's /usr/src, or with USE_HOST_MOFED=true the host's, at
    /run/mellanox/drivers/usr/src (golden driver-rdma / driver-rdma-hostmofed): nvidia-peermem is built
    against /run/mellanox/drivers/usr/src/ofa_kernel in both. The container's own /usr/src/ofa_kernel is
    nobody's mount: a tree there is never taken."""
    from harness import BASE_ENV, make_ofa_kernel

    from driver_ctr.toolkit.mofed import find_ofa_kernel
    from driver_ctr.toolkit.settings import Settings

    kernel = "6.1.0-57-amd64"
    make_ofa_kernel(tmp_path / "usr/src/ofa_kernel" / kernel)
    settings = Settings.from_env(
        dict(BASE_ENV, DRIVER_CTR_ROOT=str(tmp_path), GPU_DIRECT_RDMA_ENABLED="true", USE_HOST_MOFED=use_host_mofed)
    )
    found, why = find_ofa_kernel(settings.paths, kernel, settings.target_arch, settings.use_host_mofed)
    assert found is None and str(tmp_path / "run/mellanox/drivers/usr/src/ofa_kernel" / kernel) in why
    ofa = make_ofa_kernel(tmp_path / "run/mellanox/drivers/usr/src/ofa_kernel/x86_64" / kernel)
    assert find_ofa_kernel(settings.paths, kernel, settings.target_arch, settings.use_host_mofed) == (ofa, "")
