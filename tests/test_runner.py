"""The process seam: real children, errors that carry argv, status and output tails."""

from __future__ import annotations

import pytest
from fakes import FakeRunner

from driver_ctr.toolkit.errors import CommandFailed
from driver_ctr.toolkit.runner import Runner


def test_success_and_output():
    r = Runner().run(["sh", "-c", "echo out; echo err >&2"])
    assert (r.returncode, r.stdout, r.stderr) == (0, "out\n", "err\n")


def test_failure_carries_argv_status_and_tail():
    with pytest.raises(CommandFailed) as exc:
        Runner().run(["sh", "-c", "echo first; echo 'error: too few arguments' >&2; exit 3"])
    e = exc.value
    assert e.returncode == 3 and e.argv[0] == "sh"
    assert "too few arguments" in str(e) and "exited with status 3" in str(e)


def test_missing_binary_and_timeout():
    with pytest.raises(CommandFailed) as exc:
        Runner().run(["/nonexistent/depmod", "-a"])
    assert exc.value.returncode is None and "not found" in str(exc.value)
    with pytest.raises(CommandFailed) as exc:
        Runner().run(["sleep", "5"], timeout=0.2)
    assert "timed out" in str(exc.value)


def test_fake_runner_refuses_unexpected_commands():
    fake = FakeRunner()
    fake.expect(("modprobe", "-n"), stdout="insmod /x.ko\n")
    assert fake.run(["modprobe", "-n", "nvidia"]).stdout == "insmod /x.ko\n"
    with pytest.raises(AssertionError):
        fake.run(["rmmod", "nvidia"])
    assert fake.calls == [("modprobe", "-n", "nvidia"), ("rmmod", "nvidia")]


def test_cancellable_run_keeps_both_streams_and_takes_input():
    """One behaviour with or without cancellation: stderr is not merged into stdout."""
    from driver_ctr.toolkit.waiting import Cancellation

    for cancel in (None, Cancellation()):
        r = Runner().run(["sh", "-c", "cat; echo err >&2"], input_bytes=b"in\n", cancel=cancel)
        assert (r.stdout, r.stderr) == ("in\n", "err\n"), cancel


def test_nothing_starts_after_a_cancellation(tmp_path):
    from driver_ctr.toolkit.errors import Cancelled
    from driver_ctr.toolkit.waiting import Cancellation

    cancel = Cancellation()
    cancel.set()
    marker = tmp_path / "ran"
    with pytest.raises(Cancelled):
        Runner().run(["touch", str(marker)], cancel=cancel)
    assert not marker.exists()


def test_wrapped_failure_summary_keeps_the_last_stderr_line():
    with pytest.raises(CommandFailed) as exc:
        Runner().run(["sh", "-c", "echo 'depmod: ERROR: bad index' >&2; exit 1"])
    assert exc.value.summary.endswith("depmod: ERROR: bad index")
    assert "exited with status 1" in exc.value.summary
