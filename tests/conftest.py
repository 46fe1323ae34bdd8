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
    return env
