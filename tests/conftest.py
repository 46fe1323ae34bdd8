"""Shared fixtures. Tests that need a real tool skip with the reason when it
is missing (scripts/test installs them all), never pass silently."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

BASE_ENV = {
    "DRIVER_VERSION": "535.261.03",
    "TARGETARCH": "amd64",
    # modules only: no NVIDIA userspace on this machine (the userspace tests set "auto")
    "DRIVER_CTR_USERSPACE": "none",
}


def need_tool(name: str) -> str:
    path = shutil.which(name)
    if not path:
        pytest.skip("%s is not installed (scripts/test installs it)" % name)
    return path


@pytest.fixture(name="base_env")
def _base_env() -> dict:
    return dict(BASE_ENV)


@pytest.fixture(name="root")
def _root(tmp_path: Path) -> Path:
    """A temporary host root for DRIVER_CTR_ROOT."""
    r = tmp_path / "root"
    r.mkdir()
    return r


@pytest.fixture(name="cli_env")
def _cli_env(root: Path) -> dict:
    """An environment for running the CLI as a real process against ``root``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DRIVER_", "NVFM_", "RHCOS_", "KERNEL_MODULE"))}
    env.update(BASE_ENV)
    env["DRIVER_CTR_ROOT"] = str(root)
    env["DRIVER_CTR_LOG_FORMAT"] = "json"
    env["PYTHONPATH"] = str(REPO)
    from harness import path_with

    env["PATH"] = path_with(env)  # the stand-in node tools first (harness.node_tools)
    return env


@pytest.fixture(name="built_template", scope="session")
def _built_template(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    """One completed hand-off (both sides, fixture modules), made once per session."""
    from harness import (
        RHEL_KERNEL,
        env_for,
        finish,
        make_dtk_image,
        make_fixture_modules,
        make_shared_dir,
        start_driver,
        start_dtk,
        stop,
    )

    base = tmp_path_factory.mktemp("built")
    root = base / "root"
    root.mkdir()
    make_dtk_image(root)
    mods = make_fixture_modules(base / "fixture", RHEL_KERNEL)
    env = env_for(root, DRIVER_CTR_FIXTURE_MODULES=str(mods))
    shared = make_shared_dir(root)
    drv, dtk = start_driver(env), start_dtk(env, shared)
    d = finish(drv)
    assert d.returncode == 0, d.stderr
    stop(dtk)
    return root, mods


@pytest.fixture(name="built")
def _built(built_template: tuple, root: Path) -> tuple:
    """A completed hand-off in this test's own root (a copy of the session's): (env, shared)."""
    from harness import copy_root, env_for, make_shared_dir

    template, mods = built_template
    copy_root(template, root)
    return env_for(root, DRIVER_CTR_FIXTURE_MODULES=str(mods)), make_shared_dir(root)


@pytest.fixture(autouse=True)
def _the_product_runs_only_with_stand_in_node_tools(monkeypatch: pytest.MonkeyPatch) -> None:
    """The guard of "tests never touch their host": a test that starts the product as a process on this
    machine (``python -m driver_ctr``) must give it the stand-in node tools first on its PATH (harness.env_for),
    so no modprobe, insmod, rmmod, mount or umount of the product reaches the host's kernel or mount namespace,
    whatever that kernel could load. Loading for real is the VM tier's, in the guest."""
    import subprocess

    from harness import guard_node_tools

    real = subprocess.Popen

    class GuardedPopen(real):  # type: ignore[misc,valid-type]
        def __init__(self, args, *a, **kw):  # type: ignore[no-untyped-def]
            argv = [str(x) for x in args] if isinstance(args, (list, tuple)) else [str(args)]
            launcher = bool(argv) and argv[0].endswith("/nvidia-driver")  # the DTK side's launcher only builds
            if "driver_ctr" in argv[1:3] or launcher:
                guard_node_tools(kw.get("env") or dict(os.environ))
            super().__init__(args, *a, **kw)

    monkeypatch.setattr(subprocess, "Popen", GuardedPopen)
