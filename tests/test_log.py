"""Logging: JSON lines off a terminal, console on one, secrets never in clear, phases timed."""

from __future__ import annotations

import io
import json

import pytest

from driver_ctr.toolkit import log as logmod
from driver_ctr.toolkit.errors import InvalidValue


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_format_choice():
    assert logmod.choose_format(None, io.StringIO()) == "json"
    assert logmod.choose_format(None, _Tty()) == "console"
    assert logmod.choose_format("CONSOLE", io.StringIO()) == "console"
    with pytest.raises(InvalidValue) as exc:
        logmod.choose_format("xml", io.StringIO())
    assert exc.value.name == "DRIVER_CTR_LOG_FORMAT"


@pytest.fixture(autouse=True)
def _logging_back_to_stderr_afterwards():
    """These tests point the process's logging at a StringIO: every later test in this process (a serial run)
    must log to stderr again, where its capfd reads."""
    yield
    logmod.configure("json")


def test_json_lines_are_redacted_and_phases_timed():
    out = io.StringIO()
    logmod.configure("json", stream=out)
    log = logmod.get_logger()
    log.info(
        "env",
        HTTPS_PROXY="https://user:hunter2@proxy:8085",
        PULL_SECRET_TOKEN="abc123",
        nested={"api_key": "k-999", "url": "http://bob:pw@h/"},
    )
    with logmod.phase(log, "build", kernel="6.1.0-56-amd64"):
        pass
    with pytest.raises(RuntimeError):
        with logmod.phase(log, "stage"):
            raise RuntimeError("disk full")
    lines = [json.loads(l) for l in out.getvalue().splitlines()]
    text = out.getvalue()
    for secret in ("hunter2", "abc123", "k-999", "bob:pw"):
        assert secret not in text
    assert lines[0]["HTTPS_PROXY"] == "https://***@proxy:8085"
    starts = [l for l in lines if l["event"] == "phase start"]
    ends = [l for l in lines if l["event"] == "phase end"]
    assert [s["phase"] for s in starts] == ["build", "stage"]
    assert ends[0]["outcome"] == "ok" and ends[0]["duration_s"] >= 0 and ends[0]["kernel"] == "6.1.0-56-amd64"
    assert ends[1]["outcome"] == "failed" and ends[1]["error"] == "disk full" and ends[1]["level"] == "warning"


def test_console_format_is_key_value():
    out = io.StringIO()
    logmod.configure("console", stream=out)
    logmod.get_logger().info("hello", kernel="6.1.0-56-amd64")
    assert "hello" in out.getvalue() and "kernel=6.1.0-56-amd64" in out.getvalue()
    assert not out.getvalue().lstrip().startswith("{")


def test_every_event_names_the_side_its_program_configured():
    """The side is a fact of the process (``configure(side=...)`` by each program), never passed per logger;
    a field given on the event itself wins."""
    out = io.StringIO()
    logmod.configure("json", stream=out, side="dtk")
    logmod.get_logger().info("one")
    logmod.get_logger(builder="kbuild").info("two")
    logmod.get_logger().info("three", side="driver")
    events = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [(e["event"], e["side"]) for e in events] == [("one", "dtk"), ("two", "dtk"), ("three", "driver")]
    assert events[1]["builder"] == "kbuild"
