"""``nvidia-driver init``'s whole lifecycle in-process: the command's own flow with the fake runner and the
fixture builder (``Tools``), on a temporary root; a real SIGTERM ends it and the undo runs.

Nothing touches the test host: every child process is the fake runner's (an unexpected one fails the test),
and every path is under the temporary root.
"""

from __future__ import annotations

import json
import os

import pytest
from fakes import FakeRunner
from fixture_builder import FixtureBuilder
from harness import RHEL_KERNEL, env_for, make_fixture_modules
from inprocess import Node, in_process, node_runner, run_until_ready_then_term

from driver_ctr.commands import init
from driver_ctr.commands.options import InitOptions
from driver_ctr.node.state import DAEMONS_STATUS
from driver_ctr.toolkit.errors import DriverCtrError
from driver_ctr.toolkit.settings import Settings
from driver_ctr.tools import Tools

INIT = InitOptions(accept_license=False, max_threads=None)


def test_init_runs_load_serve_signal_and_undo_in_process(root, tmp_path):
    """No build anywhere: init builds here (the fixture builder, through the one build path), loads the tree
    (the fake kernel answers modprobe), serves (driver root mounted, state, Ready) and waits; a SIGTERM to
    this process ends the wait and the undo unloads, unmounts and removes the state, the readiness and the
    pid file. Every child process of the lifecycle is listed, in order."""
    mods = make_fixture_modules(tmp_path / "fixture", RHEL_KERNEL)
    settings = Settings.from_env(env_for(root, DRIVER_CTR_SOURCE_DIR=str(mods)))
    settings.paths.validations_dir.mkdir(parents=True)  # the operator's hostPath
    node = Node(root)
    runner = node_runner(node)
    tools = Tools(runner=runner, new_builder=lambda _runner: FixtureBuilder())
    status, seen = run_until_ready_then_term(init.run, settings, node, settings, INIT, tools)
    assert status == 0
    # while it served
    assert seen == [
        {
            "state": settings.driver_config_digest,
            "pid": True,
            "loaded": ["nvidia", "nvidia_modeset", "nvidia_uvm"],
            "driver root mounted": True,
            "published": ["nvidia-modeset.ko", "nvidia-uvm.ko", "nvidia.ko"],
        }
    ]
    # what ran, in order: the load from the adopted tree, the driver root, then after the signal the undo
    modroot = str(settings.paths.host("/run/nvidia/driver-ctr/modroot"))
    head = ("modprobe", "-d", modroot, "-C", str(root / "etc/modprobe.d"), "-S", RHEL_KERNEL)
    assert runner.calls[:4] == [
        head + ("-a", "i2c_core", "ipmi_msghandler", "ipmi_devintf"),
        head + ("--first-time", "nvidia"),
        head + ("--first-time", "nvidia-uvm"),
        head + ("--first-time", "nvidia-modeset"),
    ]
    assert [c[:2] for c in runner.calls[4:7]] == [
        ("mount", "--make-runbindable"),
        ("mount", "--make-private"),
        ("mount", "--rbind"),
    ]
    assert runner.calls[7:] == [
        ("rmmod", "nvidia_modeset", "nvidia_uvm", "nvidia"),
        ("umount", "-l", "-R", str(settings.paths.driver_root)),
    ]
    # and after the undo: nothing loaded, nothing mounted, no state, no readiness, no pid file
    assert node.loaded() == [] and node.mounts.read_text() == ""
    assert not settings.paths.state_file.exists()
    assert not (settings.paths.validations_dir / DAEMONS_STATUS).exists()
    assert not settings.paths.pid_file.exists()


def test_init_that_fails_on_the_fast_path_leaves_the_state_file_as_it_was(root):
    """The driver of this configuration is loaded (the fast path); the userspace install then fails (no .run,
    no userspace in the image). Nothing of the node's driver changed, so its state file, which
    k8s-driver-manager compares with the digest, stays as it was; the lock and readiness are taken back."""
    settings = Settings.from_env(env_for(root, DRIVER_CTR_USERSPACE="auto"))
    (root / "sys/module/nvidia").mkdir(parents=True)
    (root / "sys/module/nvidia/refcnt").write_text("0")
    (root / "sys/module/nvidia/version").write_text("535.261.03")
    settings.paths.state_file.parent.mkdir(parents=True)
    settings.paths.state_file.write_text(settings.driver_config_digest + "\n")
    runner = FakeRunner()
    with pytest.raises(DriverCtrError, match="userspace"):
        in_process(init.run, settings, INIT, Tools(runner=runner))
    assert settings.paths.state_file.read_text() == settings.driver_config_digest + "\n"
    assert not settings.paths.pid_file.exists()
    assert not (settings.paths.validations_dir / DAEMONS_STATUS).exists()
    assert runner.calls == []  # nothing unloaded, nothing mounted


def test_with_gds_the_sources_are_in_the_driver_root_on_the_fast_path_too(root, tmp_path):
    """The GDS and GDRCopy sidecars wait for /run/nvidia/driver/usr/src and build against
    /run/nvidia/driver/usr/src/nvidia-<version>: on the fast path (nothing built, nothing loaded) the sources
    are exposed as on every other path, by a link that resolves inside the driver root too."""
    from harness import copy_fixture_sources

    sources = copy_fixture_sources(root / "opt/nvidia-src")  # an extracted .run
    settings = Settings.from_env(env_for(root, GDS_ENABLED="true", DRIVER_CTR_SOURCE_DIR=str(sources)))
    settings.paths.validations_dir.mkdir(parents=True)
    node = Node(root)
    (root / "sys/module/nvidia").mkdir(parents=True)
    (root / "sys/module/nvidia/refcnt").write_text("0")
    (root / "sys/module/nvidia/version").write_text("535.261.03")
    settings.paths.state_file.parent.mkdir(parents=True, exist_ok=True)
    settings.paths.state_file.write_text(settings.driver_config_digest + "\n")
    runner = node_runner(node, "rmmod", "mount", "umount")
    status, seen = run_until_ready_then_term(init.run, settings, node, settings, INIT, Tools(runner=runner))
    assert status == 0 and seen, "the fast path never reached Ready"
    assert not any(c[0] == "modprobe" for c in runner.calls)  # the fast path: nothing loaded
    link = root / "usr/src/nvidia-535.261.03"
    assert link.is_symlink() and not os.path.isabs(os.readlink(str(link)))
    assert (link / "kernel/Makefile").is_file() and link.resolve() == sources.resolve()


def test_load_finds_what_build_made(root, tmp_path, capfd):
    """NVIDIA's ``build`` installs modules for the image's kernel and a later ``load`` uses them: ours stores
    a bundle in the image's precompiled store, and ``load`` takes it (in-process, the fixture builder, the
    fake kernel)."""
    from driver_ctr.commands import build, load
    from driver_ctr.commands.options import BuildOptions, NoOptions

    mods = make_fixture_modules(tmp_path / "fixture", RHEL_KERNEL)
    settings = Settings.from_env(env_for(root, DRIVER_CTR_SOURCE_DIR=str(mods)))
    settings.paths.validations_dir.mkdir(parents=True)
    node = Node(root)
    runner = node_runner(node)
    tools = Tools(runner=runner, new_builder=lambda _runner: FixtureBuilder())
    assert in_process(build.build, settings, BuildOptions(accept_license=False, tag=None, max_threads=None), tools) == 0
    status, seen = run_until_ready_then_term(load.run, settings, node, settings, NoOptions(), tools)
    assert status == 0 and seen and seen[0]["loaded"] == ["nvidia", "nvidia_modeset", "nvidia_uvm"]
    adopted = settings.paths.adopted_trees
    assert [c[-1] for c in runner.calls if "--first-time" in c] == ["nvidia", "nvidia-uvm", "nvidia-modeset"]
    assert any(adopted.iterdir())  # loaded from the adopted copy of the bundle
    found = [json.loads(line) for line in capfd.readouterr().err.splitlines() if '"modules found"' in line]
    assert [e["source"] for e in found] == ["precompiled"]
