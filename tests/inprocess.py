"""Running a whole command in-process, as the node sees it: a fake kernel and mount table (:class:`Node`) the
fake runner's answers change under a temporary root, and a real SIGTERM once the command says Ready.

Nothing touches the test host: every child process is the fake runner's (an unexpected one fails the test),
and every path is under the temporary root.
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence, Tuple

from fakes import FakeRunner

from driver_ctr.node.state import DAEMONS_STATUS
from driver_ctr.toolkit.errors import Cancelled
from driver_ctr.toolkit.nvidia_modules import SUBDIR
from driver_ctr.toolkit.runner import Result
from driver_ctr.toolkit.settings import Settings
from driver_ctr.toolkit.waiting import STOP_SIGNALS, Cancellation, wait_until


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
        if argv[0] == "chroot" and argv[2] == "modprobe":  # the peermem sidecar, in the driver root
            d = self.sys_module / argv[3].replace("-", "_")
            d.mkdir(parents=True)
            (d / "refcnt").write_text("0\n")
        elif argv[0] == "modprobe" and "--first-time" in argv:
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


def signal_when_ready(settings: Settings, node: Node, stop: Cancellation, done: threading.Event, seen: list) -> None:
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
            # what a chroot modprobe in the driver root finds (the peermem sidecar)
            "published": sorted(
                p.name for p in (settings.paths.module_dir(settings.running_kernel()) / SUBDIR).glob("*.ko")
            ),
        }
    )
    done.set()
    os.kill(os.getpid(), signal.SIGTERM)  # the lifecycle's own handler is installed: it ends the wait


def node_runner(node: "Node", *tools: str) -> FakeRunner:
    """A fake runner whose ``tools`` (default: modprobe, rmmod, mount, umount) are answered by ``node``."""
    runner = FakeRunner()
    runner.answers += [((tool,), node.answer) for tool in (tools or ("modprobe", "rmmod", "mount", "umount"))]
    return runner


def run_until_ready_then_term(
    command: Callable[..., int], settings: Settings, node: "Node", *args: Any
) -> Tuple[int, List[Dict[str, Any]]]:
    """``command(*args)`` in this process; once it says Ready, what the node looks like is noted and a real
    SIGTERM ends it. The process's signal handlers are put back afterwards. (status, [what was seen])."""
    stop, done, seen = Cancellation(), threading.Event(), []  # type: ignore[var-annotated]
    watcher = threading.Thread(target=signal_when_ready, args=(settings, node, stop, done, seen), daemon=True)
    watcher.start()
    try:
        status = in_process(command, *args)
    finally:
        stop.set()
    watcher.join(10)
    return status, seen


def run_until_then_term(
    command: Callable[..., int], condition: Callable[[], bool], directory: Path, *args: Any
) -> Tuple[int, bool]:
    """``command(*args)`` in this process until ``condition()`` holds (woken by changes in ``directory``),
    then a real SIGTERM. (status, whether the condition held.)"""
    stop, held = Cancellation(), []

    def watch() -> None:
        try:
            wait_until(
                lambda: True if condition() else None,
                directory=directory,
                what="the condition",
                timeout_s=60,
                cancel=stop,
                recheck_s=0.2,
            )
        except (Exception, Cancelled):
            return
        held.append(True)
        os.kill(os.getpid(), signal.SIGTERM)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        status = in_process(command, *args)
    finally:
        stop.set()
    watcher.join(10)
    return status, bool(held)


def in_process(command: Callable[..., int], *args: Any) -> int:
    """``command(*args)`` in this process, its signal handlers put back afterwards."""
    saved = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    try:
        return command(*args)
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)
        Cancellation.installed = None
