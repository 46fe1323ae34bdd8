"""``nvidia-driver init``'s whole lifecycle in-process: the command's own flow with the fake runner and the
fixture builder (``Tools``), on a temporary root; a real SIGTERM ends it and the undo runs.

Nothing touches the test host: every child process is the fake runner's (an unexpected one fails the test),
and every path is under the temporary root.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
from pathlib import Path
from typing import List, Sequence

import pytest
from fakes import FakeRunner
from fixture_builder import FixtureBuilder
from harness import RHEL_KERNEL, env_for, make_fixture_modules

from driver_ctr.commands import init
from driver_ctr.commands.options import InitOptions
from driver_ctr.node.state import DAEMONS_STATUS
from driver_ctr.toolkit.errors import Cancelled, DriverCtrError
from driver_ctr.toolkit.runner import Result
from driver_ctr.toolkit.settings import Settings
from driver_ctr.toolkit.waiting import STOP_SIGNALS, Cancellation, wait_until
from driver_ctr.tools import Tools


class Node:
    """The kernel and mount table the fake runner's answers change, under the temporary root: ``modprobe``
    makes ``/sys/module/<name>``, ``rmmod`` removes it, ``mount --rbind`` and ``umount`` edit
    ``/proc/self/mounts``."""

    def __init__(self, root: Path) -> None:
        self.sys_module = root / "sys/module"
        self.mounts = root / "proc/self/mounts"
        self.mounts.parent.mkdir(parents=True, exist_ok=True)
        self.mounts.write_text("")

    def answer(self, argv: Sequence[str]) -> Result:
        if argv[0] == "modprobe" and "--first-time" in argv:
            d = self.sys_module / argv[-1].replace("-", "_")
            d.mkdir(parents=True)
            (d / "refcnt").write_text("0\n")
        elif argv[0] == "rmmod":
            for name in argv[1:]:
                shutil.rmtree(str(self.sys_module / name.replace("-", "_")))
        elif argv[:2] == ("mount", "--rbind"):
            with open(str(self.mounts), "a") as f:
                f.write("none %s none rw 0 0\n" % argv[3])
        elif argv[0] == "umount":
            kept = [line for line in self.mounts.read_text().splitlines() if line.split()[1] != argv[-1]]
            self.mounts.write_text("".join(line + "\n" for line in kept))
        return Result(tuple(argv), 0, "", "")

    def loaded(self) -> List[str]:
        return sorted(d.name for d in self.sys_module.iterdir()) if self.sys_module.is_dir() else []


def _signal_when_ready(settings: Settings, node: Node, stop: Cancellation, done: threading.Event, seen: list) -> None:
    """Wait (inotify) for the readiness file to say Ready, remember what the node looked like, then SIGTERM;
    ``stop``: the lifecycle ended first (it failed before Ready)."""
    status = settings.paths.validations_dir / DAEMONS_STATUS

    def ready():
        return True if status.is_file() and status.read_text().strip() == "Ready" else None

    try:
        wait_until(ready, directory=status.parent, what="Ready", timeout_s=60, cancel=stop, recheck_s=0.2)
    except (Exception, Cancelled):  # the lifecycle ended before Ready: the test says why
        done.set()
        return
    seen.append(
        {
            "state": settings.paths.state_file.read_text().strip(),
            "pid": settings.paths.pid_file.is_file(),
            "loaded": node.loaded(),
            "driver root mounted": str(settings.paths.driver_root) in node.mounts.read_text(),
        }
    )
    done.set()
    os.kill(os.getpid(), signal.SIGTERM)  # the lifecycle's own handler is installed: it ends the wait


def test_init_runs_load_serve_signal_and_undo_in_process(root, tmp_path):
    """No build anywhere: init builds here (the fixture builder, through the one build path), loads the tree
    (the fake kernel answers modprobe), serves (driver root mounted, state, Ready) and waits; a SIGTERM to
    this process ends the wait and the undo unloads, unmounts and removes the state, the readiness and the
    pid file. Every child process of the lifecycle is listed, in order."""
    mods = make_fixture_modules(tmp_path / "fixture", RHEL_KERNEL)
    settings = Settings.from_env(env_for(root, DRIVER_CTR_SOURCE_DIR=str(mods)))
    settings.paths.validations_dir.mkdir(parents=True)  # the operator's hostPath
    node = Node(root)
    runner = FakeRunner()
    runner.answers += [((tool,), node.answer) for tool in ("modprobe", "rmmod", "mount", "umount")]
    tools = Tools(runner=runner, new_builder=lambda _runner: FixtureBuilder())
    saved = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    stop, done, seen = Cancellation(), threading.Event(), []
    watcher = threading.Thread(target=_signal_when_ready, args=(settings, node, stop, done, seen), daemon=True)
    watcher.start()
    try:
        status = init.run(settings, InitOptions(accept_license=False, max_threads=None), tools)
    finally:
        stop.set()
        for s, handler in saved.items():
            signal.signal(s, handler)
        Cancellation.installed = None
    watcher.join(10)
    assert done.is_set() and status == 0
    # while it served
    assert seen == [
        {
            "state": settings.driver_config_digest,
            "pid": True,
            "loaded": ["nvidia", "nvidia_modeset", "nvidia_uvm"],
            "driver root mounted": True,
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
    saved = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    try:
        with pytest.raises(DriverCtrError, match="userspace"):
            init.run(settings, InitOptions(accept_license=False, max_threads=None), Tools(runner=runner))
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)
        Cancellation.installed = None
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
    runner = FakeRunner()
    runner.answers += [((tool,), node.answer) for tool in ("rmmod", "mount", "umount")]
    saved = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    stop, done, seen = Cancellation(), threading.Event(), []
    watcher = threading.Thread(target=_signal_when_ready, args=(settings, node, stop, done, seen), daemon=True)
    watcher.start()
    try:
        status = init.run(settings, InitOptions(accept_license=False, max_threads=None), Tools(runner=runner))
    finally:
        stop.set()
        for s, handler in saved.items():
            signal.signal(s, handler)
        Cancellation.installed = None
    watcher.join(10)
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
    runner = FakeRunner()
    runner.answers += [((tool,), node.answer) for tool in ("modprobe", "rmmod", "mount", "umount")]
    tools = Tools(runner=runner, new_builder=lambda _runner: FixtureBuilder())
    saved = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    stop, done, seen = Cancellation(), threading.Event(), []
    try:
        assert build.build(settings, BuildOptions(accept_license=False, tag=None, max_threads=None), tools) == 0
        watcher = threading.Thread(target=_signal_when_ready, args=(settings, node, stop, done, seen), daemon=True)
        watcher.start()
        assert load.run(settings, NoOptions(), tools) == 0
    finally:
        stop.set()
        for s, handler in saved.items():
            signal.signal(s, handler)
        Cancellation.installed = None
    watcher.join(10)
    assert seen and seen[0]["loaded"] == ["nvidia", "nvidia_modeset", "nvidia_uvm"]
    adopted = settings.paths.adopted_trees
    assert [c[-1] for c in runner.calls if "--first-time" in c] == ["nvidia", "nvidia-uvm", "nvidia-modeset"]
    assert any(adopted.iterdir())  # loaded from the adopted copy of the bundle
    found = [json.loads(line) for line in capfd.readouterr().err.splitlines() if '"modules found"' in line]
    assert [e["source"] for e in found] == ["precompiled"]
