"""Bad input in the shared directory or the DTK image: a named error, no partial state."""

from __future__ import annotations

import json

import pytest
from harness import (
    env_for,
    finish,
    make_dtk_image,
    make_shared_dir,
    start_driver,
    start_dtk,
    stop,
)

from driver_ctr.toolkit import protocol as proto
from driver_ctr.toolkit.errors import ProtocolError


def test_malformed_release_json_is_named_and_signals_fallback(root, tmp_path):
    make_dtk_image(root)
    (root / "etc/driver-toolkit-release.json").write_text('{"KERNEL_VERSION": ')
    env = env_for(root)
    shared = make_shared_dir(root)
    drv, dtk = start_driver(env), start_dtk(env, shared)
    d = finish(drv)
    stop(dtk)
    assert d.returncode == 1
    assert "driver-toolkit-release.json is malformed" in d.stderr
    assert not (shared / "driver_build_started").exists() and not (shared / "modules").exists()


def test_malformed_settings_json_fails_both_sides_by_name(root, tmp_path):
    make_dtk_image(root)
    env = env_for(root, DRIVER_CTR_START_TIMEOUT="30")
    shared = make_shared_dir(root)
    drv = start_driver(env)
    from harness import wait_for_file

    wait_for_file(shared / "dir_prepared")
    (shared / "settings.json").write_text('{"protocol": 1, "env": {"DRIVER_VERSION": 535}}')
    r = finish(start_dtk(env, shared))
    d = finish(drv)
    assert r.returncode == 1 and "settings.json" in r.stderr and "must be a string" in r.stderr
    assert d.returncode == 1 and "settings.json" in d.stderr
    assert not (shared / "driver_built").exists()


def test_malformed_manifest_starts_a_new_generation(built, root):
    env, shared = built
    (shared / "manifest.json").write_text("[1, 2")
    # driver side: an unreadable manifest is never trusted; a new generation is prepared
    d = finish(start_driver(dict(env, DRIVER_CTR_START_TIMEOUT="1")))
    assert "unreadable manifest" in d.stderr and "manifest.json" in d.stderr
    m = json.loads((shared / "manifest.json").read_text())
    assert "build" not in m and not (shared / "driver_built").exists()


@pytest.mark.parametrize("rel", ["../../etc/passwd", "/etc/passwd", "kernel//x.ko", ""])
def test_unsafe_paths_in_manifest_are_refused(built, rel):
    env, shared = built
    m = json.loads((shared / "manifest.json").read_text())
    m["build"]["files"][0]["path"] = rel
    (shared / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ProtocolError) as exc:
        proto.SharedDir(shared).read_manifest()
    assert "unsafe staged path" in str(exc.value) and "manifest.json" in exc.value.path


def test_symlink_in_staged_tree_is_refused(built):
    env, shared = built
    link = shared / "modules/kernel/drivers/video/nvidia.ko"
    link.unlink()
    link.symlink_to("/etc/passwd")
    d = finish(start_driver(env))
    assert d.returncode == 1
    assert "symlink" in d.stderr and "nvidia.ko" in d.stderr


def test_flag_that_is_a_directory_is_named(built):
    env, shared = built
    (shared / "driver_built").unlink()
    (shared / "driver_built").mkdir()
    d = finish(start_driver(env))
    assert d.returncode == 1
    assert "driver_built: is a directory where a regular file is expected" in d.stderr


def test_atomic_write_leaves_old_or_new(tmp_path, monkeypatch):
    """A write that fails after the temp file was written (here: the rename)
    leaves the old complete file and no temp file."""
    import os

    from driver_ctr.toolkit import fsio

    p = tmp_path / "x.json"
    fsio.atomic_write_json(p, {"a": 1})

    def failing_replace(src, dst):
        assert os.path.getsize(src) > 0  # the new content was written, then the rename fails
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fsio.os, "replace", failing_replace)
    with pytest.raises(OSError):
        fsio.atomic_write_json(p, {"a": 2})
    monkeypatch.undo()
    assert fsio.read_json(p, "x") == {"a": 1}
    assert [f.name for f in tmp_path.iterdir()] == ["x.json"]
    fsio.atomic_write_json(p, {"a": 2})
    assert fsio.read_json(p, "x") == {"a": 2}
