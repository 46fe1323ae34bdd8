"""The DTK-side program: pure Python, Python 3.9 at most, imports only the
standard library, itself and the vendored packages, runs from the shared dir
on the one interpreter PATH offers."""

from __future__ import annotations

import ast
import io
import json
import subprocess
import sys
import zipfile

from conftest import REPO, need_tool
from harness import (
    PROMPT_S,
    RHEL_KERNEL,
    env_for,
    finish,
    fixture_python,
    make_dtk_image,
    make_fixture_modules,
    make_shared_dir,
    start_driver,
)

from driver_ctr import payload
from driver_ctr.toolkit.protocol import SharedDir

TOOLKIT = REPO / "driver_ctr/toolkit"
VENDORED_TOP = {"structlog", "elftools", "inotify_simple"}


def _zip():
    return zipfile.ZipFile(io.BytesIO(payload.zipapp_bytes()))


def test_zipapp_holds_only_pure_python():
    names = _zip().namelist()
    assert "__main__.py" in names and "driver_ctr/toolkit/dtk_main.py" in names
    tops = {n.split("/")[0] for n in names}
    assert tops == {"__main__.py", "driver_ctr", "structlog", "elftools", "inotify_simple.py"}
    assert not [n for n in names if n.endswith((".so", ".pyd", ".dll", ".c"))]
    driver_side = [n for n in names if n.startswith("driver_ctr/") and not n.startswith("driver_ctr/toolkit/")]
    assert driver_side == ["driver_ctr/__init__.py"]


def test_toolkit_imports_only_stdlib_itself_and_vendored():
    """The dependency direction is a test: the toolkit never imports the driver side,
    psutil or requests."""
    stdlib = set(sys.stdlib_module_names)
    files = payload.toolkit_files(TOOLKIT)
    assert TOOLKIT / "dtk_side.py" in files and len(files) > 20
    for f in files:
        tree = ast.parse(f.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    depth = len(f.relative_to(TOOLKIT).parts)  # 1 for toolkit/x.py, 2 for toolkit/sub/x.py
                    assert node.level <= depth, "%s: relative import leaves the toolkit" % f
                    continue
                mods = [node.module]
            else:
                continue
            for m in mods:
                top = m.split(".")[0]
                assert top in stdlib or top in VENDORED_TOP, "%s imports %s" % (f.name, m)


def test_dtk_side_needs_at_most_python_3_9(tmp_path):
    """vermin over everything the zipapp carries (our toolkit and the vendored code)."""
    vermin = need_tool("vermin")
    d = tmp_path / "z"
    _zip().extractall(d)
    r = subprocess.run(
        [
            vermin,
            "--no-tips",
            "--eval-annotations",
            "-t=3.9-",
            "--violations",
            "--exclude-regex",
            r"construct/lib/py3compat\.py$",
            str(d),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_zipapp_runs_from_shared_dir_with_only_the_chosen_interpreter(root, tmp_path):
    """PATH holds one python3 that runs isolated (-I -S: no site-packages), so every import of the product
    must come from the zipapp; the DTK side then builds (with the fixture builder, fixture_dtk.py)."""
    make_dtk_image(root)
    mods = make_fixture_modules(tmp_path / "fixture", RHEL_KERNEL)
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "python3").symlink_to(fixture_python(isolated=True) / "python3")
    for tool in ("sh", "dirname", "mv", "printf", "sleep", "cat"):
        p = need_tool(tool)
        (bindir / tool).symlink_to(p)
    env = env_for(root, DRIVER_CTR_FIXTURE_MODULES=str(mods))
    shared = make_shared_dir(root)
    drv = start_driver(env)
    from harness import wait_for_file

    wait_for_file(shared / "dir_prepared")
    dtk_env = {k: v for k, v in env.items() if k != "PYTHONPATH"}
    dtk_env["PATH"] = str(bindir)
    dtk = subprocess.Popen(
        [str(shared / "ocp_dtk_entrypoint"), "dtk-build-driver"],
        env=dtk_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    d = finish(drv)
    dtk.terminate()
    out, err = dtk.communicate(timeout=10)
    assert d.returncode == 0, d.stderr + err
    assert json.loads((shared / "manifest.json").read_text())["build"]["builder"] == "fixture"


def test_launcher_without_python_signals_broken(tmp_path):
    """No Python >= 3.9 in the DTK image (a RHEL 8 based DTK has 3.6): driver_toolkit_broken names every
    interpreter tried with its version, and the likely cause with the supported OpenShift range."""
    shared = tmp_path / "shared"
    shared.mkdir()
    payload.install(SharedDir(shared))
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for tool in ("sh", "dirname", "mv", "printf", "sleep"):
        (bindir / tool).symlink_to(need_tool(tool))
    (bindir / "python3").write_text('#!/bin/sh\ncase "$2" in *print*) echo 3.6 ;; *) exit 1 ;; esac\n')
    (bindir / "python3").chmod(0o755)
    p = subprocess.Popen(
        [str(shared / "ocp_dtk_entrypoint"), "dtk-build-driver"],
        env={"PATH": str(bindir)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    from harness import stop, wait_for_file

    wait_for_file(shared / "driver_toolkit_broken", 10)
    assert stop(p) < PROMPT_S
    body = json.loads((shared / "driver_toolkit_broken").read_text())
    assert "no Python >= 3.9" in body["reasons"][0]
    assert " python3(3.6) " in body["reasons"][0] and "python3.11(absent)" in body["reasons"][0]
    assert "OpenShift 4.12 and older" in body["likely_cause"] and "4.13 or later" in body["likely_cause"]
    # the driver side's typed reader accepts what the shell launcher wrote
    from driver_ctr.toolkit import protocol as proto

    flag = proto.SharedDir(shared).read_flag(proto.Broken)
    assert flag is not None and flag.generation is None and "no Python >= 3.9" in flag.reasons[0]
    assert flag.likely_cause == payload.NO_PYTHON_CAUSE


def test_toolkit_subpackages_are_in_the_zipapp(tmp_path, monkeypatch):
    """A module in a toolkit subpackage reaches the zip (the walk is recursive)."""
    fake = tmp_path / "driver_ctr"
    (fake / "toolkit" / "sub").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "toolkit" / "__init__.py").write_text("")
    (fake / "toolkit" / "sub" / "__init__.py").write_text("")
    (fake / "toolkit" / "sub" / "planted.py").write_text("X = 1\n")
    monkeypatch.setattr(payload, "__file__", str(fake / "payload.py"))
    names = _zip().namelist()
    assert "driver_ctr/toolkit/sub/planted.py" in names and "driver_ctr/toolkit/sub/__init__.py" in names


def test_zipapp_is_deterministic():
    assert payload.zipapp_bytes() == payload.zipapp_bytes()
