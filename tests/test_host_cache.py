"""The host cache on its own: keys, publication, verification, pruning."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from harness import make_fixture_modules

from driver_ctr.toolkit.host_cache import HostCache, cache_key
from driver_ctr.toolkit.protocol import BuildInputs, BuildRecord, describe_tree

NV = "kernel/drivers/video"


def _inputs(kernel: str, **over) -> BuildInputs:
    d = {
        "kernel_release": kernel,
        "driver_version": "535.261.03",
        "kernel_module_type": "auto",
        "driver_config_digest": "3522141578",
        "gpu_direct_rdma_enabled": False,
        "gds_enabled": False,
        "gdrcopy_enabled": False,
        "target_arch": "x86_64",
    }
    d.update(over)
    return BuildInputs(**d)


def _tree(tmp: Path, kernel: str) -> Path:
    t = tmp / ("tree-" + kernel)
    make_fixture_modules(t / NV, kernel)
    (t / "modules.dep").write_text("%s/nvidia.ko:\n" % NV)
    return t


def _store(cache: HostCache, tmp: Path, kernel: str, fp: str = "") -> Path:
    t = _tree(tmp, kernel)
    build = BuildRecord(
        builder="kbuild", files=describe_tree(t), details={"flavour": "proprietary", "signing_fingerprint": fp}
    )
    return cache.store(_inputs(kernel), build, t).path


def test_key_covers_every_input_and_the_signing_fingerprint():
    base = cache_key(_inputs("k1"), "")
    assert cache_key(_inputs("k1"), "") == base
    for field, value in (
        ("kernel_release", "k2"),
        ("driver_version", "550.1"),
        ("kernel_module_type", "open"),
        ("driver_config_digest", "1"),
        ("gpu_direct_rdma_enabled", True),
        ("target_arch", "aarch64"),
    ):
        assert cache_key(_inputs("k1", **{field: value}), "") != base, field
    assert cache_key(_inputs("k1"), "ab" * 32) != base


def test_store_then_lookup_round_trip(tmp_path):
    cache = HostCache(tmp_path / "cache")
    (tmp_path / "cache").mkdir()
    k = "6.1.0-56-amd64"
    path = _store(cache, tmp_path, k)
    assert path.parent.name == k and (path / "entry.json").is_file()
    assert not list((tmp_path / "cache").glob(".tmp-*"))
    e = cache.lookup(_inputs(k), "")
    assert e is not None and e.record.build.details == {"flavour": "proprietary", "signing_fingerprint": ""}
    assert sorted(f.path for f in e.files) == sorted(f.path for f in describe_tree(path / "modules"))
    assert cache.lookup(_inputs(k), "other-fingerprint") is None  # signed with another key: a miss
    assert cache.lookup(_inputs(k, driver_version="550.54.14"), "") is None
    tree = cache.adopt(e, tmp_path / "trees")
    assert tree is not None and tree.parent == tmp_path / "trees"
    assert list(describe_tree(tree)) == e.files


def test_entry_for_other_inputs_is_discarded(tmp_path):
    """An entry whose entry.json names other inputs (copied around by hand) is never used."""
    (tmp_path / "cache").mkdir()
    cache = HostCache(tmp_path / "cache")
    k = "6.1.0-56-amd64"
    path = _store(cache, tmp_path, k)
    data = json.loads((path / "entry.json").read_text())
    data["inputs"]["driver_config_digest"] = "999"
    (path / "entry.json").write_text(json.dumps(data))
    assert cache.lookup(_inputs(k), "") is None
    assert not path.exists()


def test_prune_keeps_the_newest_kernels_and_never_the_current_one(tmp_path):
    (tmp_path / "cache").mkdir()
    cache = HostCache(tmp_path / "cache", keep=10)
    kernels = ["6.1.0-%d-amd64" % i for i in (50, 51, 52, 53)]
    for i, k in enumerate(kernels):
        _store(cache, tmp_path, k)
        os.utime(str(tmp_path / "cache" / k), (1000 + i, 1000 + i))  # 50 oldest .. 53 newest
    cache.keep = 2
    # the node went back to 6.1.0-50: kept with the newest other one
    removed = cache.prune("6.1.0-50-amd64")
    assert sorted(removed) == ["6.1.0-51-amd64", "6.1.0-52-amd64"]
    left = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert left == ["6.1.0-50-amd64", "6.1.0-53-amd64"]


def test_crashed_writers_leftovers_are_cleaned_only_when_old(tmp_path):
    (tmp_path / "cache").mkdir()
    cache = HostCache(tmp_path / "cache")
    old = tmp_path / "cache/.tmp-abc-1"
    young = tmp_path / "cache/.tmp-def-2"
    old.mkdir()
    young.mkdir()
    os.utime(str(old), (time.time() - 3600, time.time() - 3600))
    cache.clean_temporaries()
    assert not old.exists() and young.exists()  # young: maybe another container's store in progress


def test_unsafe_kernel_names_cannot_escape_the_cache(tmp_path):
    cache = HostCache(tmp_path)
    for bad in ("../etc", "", "..", "a/b"):
        with pytest.raises(ValueError):
            cache.entry_dir(bad, "k")
