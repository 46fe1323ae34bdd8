"""Fault injection: SIGKILL either container at each step of the protocol, then
restart as kubelet would, and the pair converges with no further restart.

Twelve kill points (six a side, "serving" included), each tried twice:
- **restart**: only the killed container starts again, same kernel;
- **reboot**: both die, the node comes back on another kernel (``/run`` is
  gone, the shared dir, a disk-backed emptyDir, survived) and both start.

Converged means: the driver container reaches ``Ready`` by itself, the DTK
container is still running, no temporary file is left in the shared dir, and
no module for another kernel is staged, adopted or handed to modprobe.
Loading goes through the stand-in node tools (``harness.node_tools``: tests
never load into the host's kernel; the VM tier loads for real), accepting
every load here and recording their arguments. The test prints points tried and converged.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, List, Tuple

import pytest
from conftest import REPO
from harness import (
    PROMPT_S,
    RHEL_KERNEL,
    env_for,
    make_dtk_image,
    make_fixture_modules,
    make_shared_dir,
    start_dtk,
)

from driver_ctr.toolkit.modinfo import read_modinfo

pytestmark = pytest.mark.slow

NEW_KERNEL = "5.14.0-503.11.1.el9_5.x86_64"
STATUS = "run/nvidia/validations/.driver-daemons-status"
Trigger = Callable[[Path, Path], bool]


def _status(root: Path) -> str:
    try:
        return (root / STATUS).read_text().strip()
    except OSError:
        return ""


def _manifest_has_build(shared: Path) -> bool:
    try:
        return "build" in json.loads((shared / "manifest.json").read_text())
    except (OSError, ValueError):
        return False


POINTS: List[Tuple[str, str, Trigger]] = [
    ("driver", "NotReady written", lambda r, s: _status(r) == "NotReady"),
    ("driver", "dir_prepared", lambda r, s: (s / "dir_prepared").exists()),
    ("driver", "driver_build_started", lambda r, s: (s / "driver_build_started").exists()),
    ("driver", "manifest completed", lambda r, s: _manifest_has_build(s)),
    ("driver", "driver_built", lambda r, s: (s / "driver_built").exists()),
    ("driver", "serving", lambda r, s: _status(r) == "Ready"),
    ("dtk", "dir_prepared", lambda r, s: (s / "dir_prepared").exists()),
    ("dtk", "driver_build_started", lambda r, s: (s / "driver_build_started").exists()),
    ("dtk", "building (staging)", lambda r, s: bool(list(s.glob(".modules.staging-dtk-*")))),
    ("dtk", "manifest completed", lambda r, s: _manifest_has_build(s)),
    ("dtk", "driver_built", lambda r, s: (s / "driver_built").exists()),
    ("dtk", "serving", lambda r, s: _status(r) == "Ready"),
]


class Pod:
    """The two containers of one node's pod, on a temporary root."""

    def __init__(self, base: Path) -> None:
        self.root = base / "root"
        self.root.mkdir()
        self.base = base
        self.record = base / "tools.log"  # the stand-in node tools' record (harness.node_tools)
        self.shared = make_shared_dir(self.root)
        self.kernel = RHEL_KERNEL
        self.driver = self.dtk = None
        self.use_kernel(RHEL_KERNEL)

    def use_kernel(self, kernel: str) -> None:
        self.kernel = kernel
        make_dtk_image(self.root, kernel=kernel)
        mods = make_fixture_modules(self.base / ("fixture-" + kernel), kernel)
        (mods / "DELAY").write_text("1.0")
        self.env = env_for(self.root, kernel, DRIVER_CTR_FIXTURE_MODULES=str(mods))
        self.env.update(NODE_TOOLS_LOG=str(self.record), NODE_TOOLS_LOADING="accept")  # loads succeed: Ready

    def start_driver(self) -> None:
        """A driver container; its log goes to a file of its own (``driver_log``)."""
        self.starts = getattr(self, "starts", 0) + 1
        self.driver_log = self.base / ("driver-%d.err" % self.starts)
        with open(self.driver_log, "w") as err:
            self.driver = subprocess.Popen(
                [sys.executable, "-m", "driver_ctr", "ocp_dtk_entrypoint", "nv-ctr-run-with-dtk"],
                env=self.env,
                cwd=REPO,
                stdout=subprocess.DEVNULL,
                stderr=err,
            )

    def start_dtk(self) -> None:
        self.dtk = start_dtk(self.env, self.shared)

    def kill(self, which: str) -> None:
        p = self.driver if which == "driver" else self.dtk
        p.kill()
        p.wait()

    def reboot(self, kernel: str) -> None:
        """Both containers die; /run is a tmpfs; the node comes back on ``kernel``."""
        for p in (self.driver, self.dtk):
            if p.poll() is None:
                p.kill()
                p.wait()
        shutil.rmtree(self.root / "run", ignore_errors=True)
        self.record.write_text("")
        self.use_kernel(kernel)

    def stop(self) -> Tuple[int, int]:
        codes = []
        for p in (self.driver, self.dtk):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=PROMPT_S)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
            codes.append(p.returncode)
        return codes[0], codes[1]


def _wait(pred: Callable[[], bool], timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.01)
    return pred()


def _converged(pod: Pod) -> str:
    """'' when converged, else why not."""

    # The running driver container's own word: a killed one's Ready may linger in the status file.
    def ready() -> bool:
        return "driver ready: waiting for a signal" in pod.driver_log.read_text()

    if not _wait(lambda: ready() or pod.driver.poll() is not None, 60):
        return "the driver container did not reach Ready"
    if pod.driver.poll() is not None:
        return "the driver container exited %s: %s" % (pod.driver.returncode, pod.driver_log.read_text()[-600:])
    if _status(pod.root) != "Ready":
        return "the status file says %r while the driver serves" % _status(pod.root)
    if pod.dtk.poll() is not None:
        return "the DTK container exited %s: %s" % (pod.dtk.returncode, pod.dtk.stderr.read()[-600:])
    leftovers = [p.name for p in pod.shared.glob(".*.tmp")] + [p.name for p in pod.shared.glob("*/.*.tmp")]
    if leftovers:
        return "temporary files left: %s" % leftovers
    manifest = json.loads((pod.shared / "manifest.json").read_text())
    if manifest["inputs"]["kernel_release"] != pod.kernel:
        return "the manifest is for %s" % manifest["inputs"]["kernel_release"]
    staged = [read_modinfo(p).vermagic for p in (pod.shared / "modules").rglob("*.ko")]
    link = pod.root / "run/nvidia/driver-ctr/modroot/lib/modules" / pod.kernel
    adopted = [read_modinfo(p).vermagic for p in link.resolve().rglob("*.ko")] if link.exists() else []
    if not adopted:
        return "nothing was handed to modprobe for %s" % pod.kernel
    wrong = [v for v in staged + adopted if not v.startswith(pod.kernel + " ")]
    if wrong:
        return "modules for another kernel staged or adopted: %s" % wrong
    calls = pod.record.read_text().splitlines() if pod.record.exists() else []
    kernels = {m.group(1) for c in calls for m in [re.search(r"^modprobe .* -S (\S+)", c)] if m}
    if kernels != {pod.kernel}:
        return "modprobe was asked for kernels %s" % sorted(kernels)
    return ""


def _run_point(base: Path, victim: str, trigger: Trigger, reboot: bool) -> str:
    pod = Pod(base)
    pod.start_driver()
    pod.start_dtk()
    try:
        if not _wait(lambda: trigger(pod.root, pod.shared), 60):
            return "the kill point was never reached"
        if reboot:
            pod.reboot(NEW_KERNEL)
            pod.start_driver()
            pod.start_dtk()
        else:
            pod.kill(victim)
            if victim == "driver":
                pod.start_driver()
            else:
                pod.start_dtk()
        why = _converged(pod)
    finally:
        codes = pod.stop()
    if not why and codes[0] != 0:
        why = "the driver container exited %d on SIGTERM" % codes[0]
    return why


def test_sigkill_at_every_protocol_step_converges_without_another_restart(tmp_path, capsys):
    tried, failures = 0, []
    for reboot in (False, True):
        for i, (victim, point, trigger) in enumerate(POINTS):
            tried += 1
            base = tmp_path / ("%s-%02d" % ("reboot" if reboot else "restart", i))
            base.mkdir()
            why = _run_point(base, victim, trigger, reboot)
            if why:
                failures.append("%s %s at %r: %s" % ("reboot" if reboot else "restart of", victim, point, why))
    with capsys.disabled():
        print("\nfault injection: %d points tried, %d converged" % (tried, tried - len(failures)))
        for f in failures:
            print("  NOT CONVERGED: %s" % f)
    assert not failures, "\n".join(failures)
