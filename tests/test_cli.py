"""The CLI contract, run as real processes: commands, options, exit statuses."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO


def run(argv, env, **kw):
    return subprocess.run(
        [sys.executable, "-m", "driver_ctr", *argv], env=env, capture_output=True, text=True, cwd=REPO, timeout=60, **kw
    )


def test_help_on_every_command(cli_env):
    for prog, cmds in (
        (
            "nvidia-driver",
            ["init", "build", "load", "update", "reload_nvidia_peermem", "probe_nvidia_peermem", "unload", "status"],
        ),
        ("ocp_dtk_entrypoint", ["nv-ctr-run-with-dtk", "dtk-build-driver"]),
    ):
        r = run([prog, "--help"], cli_env)
        assert r.returncode == 0 and "usage: %s" % prog in r.stdout
        for c in cmds:
            r = run([prog, c, "--help"], cli_env)
            assert r.returncode == 0, (prog, c, r.stderr)
            assert "usage: %s %s" % (prog, c) in r.stdout


@pytest.mark.parametrize(
    "argv", [["frobnicate"], ["init", "--bogus"], ["build", "-m", "zero"], ["update", "-x"], ["status", "extra"], []]
)
def test_usage_errors_exit_1_with_usage_on_stderr(cli_env, argv):
    r = run(["nvidia-driver", *argv], cli_env)
    assert r.returncode == 1
    assert "usage: nvidia-driver" in r.stderr


def test_ocp_unknown_command(cli_env):
    r = run(["ocp_dtk_entrypoint", "nv-fs-ctr-run-with-dtk-typo"], cli_env)
    assert r.returncode == 1 and "usage: ocp_dtk_entrypoint" in r.stderr


def test_build_accept_license_is_a_flag(cli_env):
    """The reference's `build -a` wrongly takes an argument; ours is a flag (the tag stays separate)."""
    from driver_ctr.cli import build_nvidia_driver_parser

    args = build_nvidia_driver_parser().parse_args(["build", "-a", "-t", "builtin", "-m", "4"])
    assert (args.accept_license, args.tag, args.max_threads) == (True, "builtin", 4)
    args = build_nvidia_driver_parser().parse_args(["update", "-k", "5.14.0-1.el9.x86_64", "-s", "key1", "-t", "x"])
    assert (args.kernel, args.sign, args.tag) == ("5.14.0-1.el9.x86_64", "key1", "x")


def test_missing_driver_version_exits_1_naming_it(cli_env):
    env = dict(cli_env, DRIVER_VERSION="")
    r = run(["nvidia-driver", "status"], env)
    assert r.returncode == 1
    assert "DRIVER_VERSION" in r.stderr


def test_status_json(cli_env, root):
    (root / "sys/module/nvidia").mkdir(parents=True)
    (root / "sys/module/nvidia/refcnt").write_text("0\n")
    (root / "sys/module/nvidia/version").write_text("535.261.03\n")
    (root / "run/nvidia").mkdir(parents=True)
    (root / "run/nvidia/nvidia-driver.state").write_text("3522141578\n")
    env = dict(
        cli_env,
        DRIVER_CONFIG_DIGEST="3522141578",
        DRIVER_CTR_KERNEL_RELEASE="5.14.0-427.13.1.el9_4.x86_64",
        HTTPS_PROXY="https://user:hunter2@proxy:8085",
    )
    r = run(["nvidia-driver", "status", "--json"], env)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["loaded"] == {
        "nvidia_loaded": True,
        "nvidia_version": "535.261.03",
        "state_digest": "3522141578",
        "fast_path": True,
    }
    assert info["kernel"]["rhel_version"] == "9.4"
    assert "hunter2" not in r.stdout + r.stderr


def test_build_and_update_without_sources_name_what_is_missing(cli_env):
    """No driver sources where the command runs: exit 1, the expected .run and where it was looked for."""
    for argv in (["nvidia-driver", "update", "-k", "6.1.0-99-amd64"], ["nvidia-driver", "build"]):
        r = run(argv, cli_env)
        assert r.returncode == 1, argv
        assert "no NVIDIA driver sources: NVIDIA-Linux-x86_64-535.261.03.run is not in" in r.stderr, r.stderr


def test_console_scripts_installed():
    """pip install -e . provides both entry points (skips if the package is not installed)."""
    import shutil

    from harness import path_with

    for name in ("nvidia-driver", "ocp_dtk_entrypoint"):
        exe = shutil.which(name)
        if not exe:
            pytest.skip("driver-ctr is not pip-installed in this environment")
        env = dict(os.environ, PATH=path_with(dict(os.environ)))
        r = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=60, env=env)
        assert r.returncode == 0 and "usage: %s" % name in r.stdout
