"""vGPU guest images: DRIVER_VERSION with the image flavour (535.261.03-grid, 550.163.01-grid-aws), the
licence configuration, the grid daemons and the vgpu-util version check."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fakes import FakeRunner
from harness import env_for, nvd

from driver_ctr.node.daemons import start_daemons
from driver_ctr.node.fast_path import decide_fast_path
from driver_ctr.node.vgpu import VgpuError, select_version, with_selected_version
from driver_ctr.toolkit.errors import InvalidValue
from driver_ctr.toolkit.log import get_logger
from driver_ctr.toolkit.settings import Settings
from driver_ctr.toolkit.versions import parse_driver_version


@pytest.mark.parametrize(
    "raw, number, suffix, branch",
    [
        ("535.261.03", "535.261.03", "", 535),
        ("535.261.03-grid", "535.261.03", "grid", 535),
        ("550.163.01-grid-aws", "550.163.01", "grid-aws", 550),
        ("550.90", "550.90", "", 550),
    ],
)
def test_driver_versions_in_the_forms_the_operator_and_nvidias_images_use(raw, number, suffix, branch):
    v = parse_driver_version(raw)
    assert (v.raw, v.number, v.suffix, v.branch) == (raw, number, suffix, branch)


@pytest.mark.parametrize("raw", ["535.261.03-", "535-grid", "535.261.03-grid-", "535.261.03--grid", "latest"])
def test_malformed_driver_versions_are_named(raw):
    with pytest.raises(InvalidValue) as exc:
        parse_driver_version(raw)
    assert raw in str(exc.value) and "-grid" in str(exc.value)


@pytest.mark.parametrize("command", [["status"], ["unload"], ["probe_nvidia_peermem"]])
def test_every_command_takes_a_grid_version(root, command):
    """Today's failure: -grid made every command, the probes included, exit 1 (a restart loop)."""
    r = nvd(env_for(root, DRIVER_VERSION="535.261.03-grid"), *command)
    assert r.returncode == 0, r.stderr


def _vgpu(root: Path, **env: str) -> Settings:
    return Settings.from_env(env_for(root, DRIVER_VERSION="535.261.03-grid", DRIVER_TYPE="vgpu", **env))


def test_the_fast_path_compares_the_modules_version_number(root):
    mod = root / "sys/module/nvidia"
    mod.mkdir(parents=True)
    (mod / "refcnt").write_text("0\n")
    (mod / "version").write_text("535.261.03\n")  # what modinfo and /sys say for a -grid driver
    (root / "run/nvidia").mkdir(parents=True)
    (root / "run/nvidia/nvidia-driver.state").write_text("3522141578\n")
    assert decide_fast_path(_vgpu(root)).applies


def test_grid_daemons_start_with_the_licence_installed(root, tmp_path, monkeypatch):
    drivers = root / "drivers"
    (drivers / "ClientConfigToken").mkdir(parents=True)
    (drivers / "gridd.conf").write_text("FeatureType=1\n")
    (drivers / "ClientConfigToken/client_configuration_token.tok").write_text("token")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "nvidia-topologyd").write_text("#!/bin/sh\n")
    (bindir / "nvidia-topologyd").chmod(0o755)
    monkeypatch.setenv("PATH", str(bindir))  # no persistenced here; topologyd installed
    runner = FakeRunner()
    runner.expect(("nvidia-gridd",))
    runner.expect(("nvidia-topologyd",))
    envs = []
    orig = runner.run

    def run(argv, **kw):
        envs.append(kw.get("env") or {})
        return orig(argv, **kw)

    runner.run = run  # type: ignore[method-assign]
    started = start_daemons(_vgpu(root), runner, get_logger())
    assert started == ["nvidia-gridd", "nvidia-topologyd"]
    assert envs[0]["LD_LIBRARY_PATH"] == "/usr/lib64/nvidia/gridd"
    assert (root / "etc/nvidia/gridd.conf").read_text() == "FeatureType=1\n"
    assert (root / "etc/nvidia/ClientConfigToken/client_configuration_token.tok").read_text() == "token"


@pytest.mark.parametrize(
    "files, env, needle",
    [
        ({}, {}, "DRIVER_TYPE=vgpu needs the licence configuration %s/drivers/gridd.conf"),
        ({"gridd.conf": "x"}, {}, "VGPU_LICENSE_SERVER_TYPE=NLS needs a client configuration token in"),
    ],
)
def test_a_missing_licence_configuration_is_named_before_any_daemon(root, files, env, needle):
    (root / "drivers").mkdir()
    for name, text in files.items():
        (root / "drivers" / name).write_text(text)
    runner = FakeRunner()  # any command fails the test
    with pytest.raises(VgpuError) as exc:
        start_daemons(_vgpu(root, PATH="/nonexistent", **env), runner, get_logger())
    assert (needle % root if "%s" in needle else needle) in str(exc.value)
    assert runner.calls == []


def test_fne_licensing_needs_no_token(root):
    (root / "drivers").mkdir()
    (root / "drivers/gridd.conf").write_text("x")
    runner = FakeRunner()
    runner.expect(("nvidia-gridd",))
    assert start_daemons(_vgpu(root, PATH="/nonexistent", VGPU_LICENSE_SERVER_TYPE="FNE"), runner, get_logger()) == [
        "nvidia-gridd"
    ]


def test_the_vgpu_version_check_picks_the_catalogs_match(root):
    (root / "drivers").mkdir()
    runner = FakeRunner()
    runner.expect(("vgpu-util", "count"), stdout="count=2\n")
    runner.expect(("vgpu-util", "match"), stdout="version=550.163.01-grid\n")
    s = with_selected_version(_vgpu(root, DISABLE_VGPU_VERSION_CHECK="false"), runner, get_logger())
    assert s.driver_version.raw == "550.163.01-grid" and s.driver_branch == 550
    assert runner.calls[1] == (
        "vgpu-util",
        "match",
        "-i",
        str(root / "drivers"),
        "-c",
        str(root / "drivers/vgpuDriverCatalog.yaml"),
    )


def test_the_vgpu_version_check_keeps_the_version_without_devices_and_names_a_mismatch(root):
    s = _vgpu(root, DISABLE_VGPU_VERSION_CHECK="false")
    none = FakeRunner()
    none.expect(("vgpu-util", "count"), stdout="count=0\n")
    assert select_version(s, none, get_logger()) is None
    bad = FakeRunner()
    bad.expect(("vgpu-util", "count"), stdout="count=1\n")
    bad.expect(("vgpu-util", "match"), returncode=1, stderr="no compatible driver")
    with pytest.raises(VgpuError) as exc:
        select_version(s, bad, get_logger())
    assert "matches this host's vGPU manager (1 vGPU devices" in str(exc.value) and "no compatible driver" in str(
        exc.value
    )
    off = FakeRunner()  # DISABLE_VGPU_VERSION_CHECK=true (the default): no vgpu-util call
    assert select_version(_vgpu(root), off, get_logger()) is None and off.calls == []


def test_gridd_libraries_where_the_images_distribution_keeps_them(root):
    """nvidia-gridd's LD_LIBRARY_PATH: RHEL's /usr/lib64/nvidia/gridd, Debian's and Ubuntu's
    /usr/lib/<arch>-linux-gnu/nvidia/gridd; the directory the image has wins."""
    from driver_ctr.node.vgpu import gridd_libs

    assert gridd_libs(_vgpu(root)) == "/usr/lib64/nvidia/gridd"
    (root / "etc").mkdir(exist_ok=True)
    (root / "etc/debian_version").write_text("12.8\n")
    assert gridd_libs(_vgpu(root)) == "/usr/lib/x86_64-linux-gnu/nvidia/gridd"
    (root / "usr/lib64/nvidia/gridd").mkdir(parents=True)
    assert gridd_libs(_vgpu(root)) == "/usr/lib64/nvidia/gridd"


def _selecting_runner() -> FakeRunner:
    runner = FakeRunner()
    runner.expect(("vgpu-util", "count"), stdout="count=1\n")
    runner.expect(("vgpu-util", "match"), stdout="version=550.163.01-grid\n")
    return runner


def test_the_vgpu_version_is_selected_for_load_and_for_the_dtk_build_too(root):
    """NVIDIA's _prepare selects the guest driver for init, load and the DTK build: ``load`` looks for a build
    of the selected version, and the DTK side is told that version in settings.json."""
    from inprocess import in_process

    from driver_ctr.commands import load, run_with_dtk
    from driver_ctr.commands.options import NoOptions, RunWithDtkOptions
    from driver_ctr.module_trees import NoBuild
    from driver_ctr.toolkit.errors import HandoffTimeout
    from driver_ctr.tools import Tools

    (root / "drivers").mkdir()
    settings = _vgpu(root, DISABLE_VGPU_VERSION_CHECK="false", DRIVER_CTR_START_TIMEOUT="1")
    assert settings.shared()["DRIVER_VERSION"] == "535.261.03-grid"
    runner = _selecting_runner()
    with pytest.raises(NoBuild):
        in_process(load.run, settings, NoOptions(), Tools(runner=runner))
    assert [c[:2] for c in runner.calls] == [("vgpu-util", "count"), ("vgpu-util", "match")]

    shared = root / "mnt/shared-nvidia-driver-toolkit"
    shared.mkdir(parents=True)
    with pytest.raises(HandoffTimeout):  # no DTK container here: what matters is what it was told
        in_process(run_with_dtk.run, settings, RunWithDtkOptions(dry_run=True), Tools(runner=_selecting_runner()))
    told = json.loads((shared / "settings.json").read_text())["env"]
    assert told["DRIVER_VERSION"] == "550.163.01-grid" and told["DRIVER_BRANCH"] == "550"
