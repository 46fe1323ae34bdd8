"""The host cache on its own: keys, publication, verification, pruning."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from harness import make_fixture_modules

from driver_ctr.toolkit.host_cache import HostCache, cache_key
from driver_ctr.toolkit.records import BuildInputs, BuildRecord
from driver_ctr.toolkit.settings import DEFAULT_MODULE_SIZE_LIMIT
from driver_ctr.toolkit.trees import describe_tree

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
        builder="kbuild",
        files=describe_tree(t, DEFAULT_MODULE_SIZE_LIMIT),
        details={"flavour": "proprietary", "signing_fingerprint": fp},
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
    assert sorted(f.path for f in e.files) == sorted(
        f.path for f in describe_tree(path / "modules", DEFAULT_MODULE_SIZE_LIMIT)
    )
    assert cache.lookup(_inputs(k), "other-fingerprint") is None  # signed with another key: a miss
    assert cache.lookup(_inputs(k, driver_version="550.54.14"), "") is None
    tree = cache.adopt(e, tmp_path / "trees")
    assert tree is not None and tree.parent == tmp_path / "trees"
    assert list(describe_tree(tree, DEFAULT_MODULE_SIZE_LIMIT)) == e.files


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


def test_a_dead_writers_leftovers_are_swept_whatever_their_age_a_live_writers_kept(tmp_path):
    """Issue 20.4: a killed `update -k` left a full .tmp copy that a rerun within 10 minutes kept (so it shipped
    in the image). A temporary is a live writer's while its flock is held (seen across the pid namespaces of
    both containers), so a young one nobody holds is swept and a held one is kept, whatever their ages."""
    import fcntl

    (tmp_path / "cache").mkdir()
    cache = HostCache(tmp_path / "cache")
    dead, live = tmp_path / "cache/.tmp-abc-1", tmp_path / "cache/.tmp-def-2"
    dead.mkdir()
    (dead / "nvidia.ko").write_bytes(b"half a copy")
    live.mkdir()
    os.utime(str(live), (time.time() - 3600, time.time() - 3600))
    (tmp_path / "cache/.tmp-stray").symlink_to(tmp_path)  # a link of that name is removed as itself
    fd = os.open(str(live), os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        assert sorted(cache.clean_temporaries()) == [".tmp-abc-1", ".tmp-stray"]
        assert not dead.exists() and live.is_dir() and (tmp_path / "cache").is_dir()
    finally:
        os.close(fd)
    assert cache.clean_temporaries() == [".tmp-def-2"]


def test_unsafe_kernel_names_cannot_escape_the_cache(tmp_path):
    cache = HostCache(tmp_path)
    for bad in ("../etc", "", "..", "a/b"):
        with pytest.raises(ValueError):
            cache.entry_dir(bad, "k")


def _outside(tmp_path: Path) -> Path:
    out = tmp_path / "outside"
    out.mkdir()
    for i in range(6):
        (out / ("keep-%d" % i)).write_text("host data %d\n" % i)
    return out


def test_discarding_a_corrupt_entry_never_follows_a_link_out_of_the_store(tmp_path):
    """Issue 20.4: with the store's <kernel> directory a link, discarding a corrupt entry deleted 36 files
    outside the store. The link is removed as itself; what it pointed at is untouched."""
    (tmp_path / "cache").mkdir()
    cache = HostCache(tmp_path / "cache")
    kernel = "6.1.0-57-amd64"
    entry = Path(_store(cache, tmp_path, kernel))
    outside = _outside(tmp_path)
    key = entry.name
    (outside / key).mkdir()
    (outside / key / "entry.json").write_text("{not json")  # a corrupt entry, reached through the link
    os.rename(str(tmp_path / "cache" / kernel), str(tmp_path / "moved"))
    (tmp_path / "cache" / kernel).symlink_to(outside)
    assert cache.lookup(_inputs(kernel), "") is None
    assert not os.path.lexists(str(tmp_path / "cache" / kernel))
    assert sorted(p.name for p in outside.iterdir()) == sorted(["keep-%d" % i for i in range(6)] + [key])
    assert (outside / key / "entry.json").read_text() == "{not json"


def test_storing_replaces_a_planted_link_and_writes_nothing_through_it(tmp_path):
    (tmp_path / "cache").mkdir()
    cache = HostCache(tmp_path / "cache")
    kernel = "6.1.0-57-amd64"
    outside = _outside(tmp_path)
    (tmp_path / "cache" / kernel).symlink_to(outside)
    entry = Path(_store(cache, tmp_path, kernel))
    assert not (tmp_path / "cache" / kernel).is_symlink() and entry.parent == tmp_path / "cache" / kernel
    assert sorted(p.name for p in outside.iterdir()) == ["keep-%d" % i for i in range(6)]
    assert cache.lookup(_inputs(kernel), "") is not None


def test_two_writers_of_one_entry_converge_on_the_first(tmp_path, capfd):
    """Issue 20.4: two stores interleaved exactly gave an ENOTEMPTY traceback. The second writer finds the
    first's entry at its final rename, keeps it and says so."""
    (tmp_path / "cache").mkdir()
    cache = HostCache(tmp_path / "cache")
    other = HostCache(tmp_path / "cache")
    kernel = "6.1.0-57-amd64"
    real_replace = cache.fs.replace

    def publish_first(src: str, dst: str) -> None:
        if src.startswith(".tmp-") and "/" in dst and not (tmp_path / "cache" / dst).exists():
            _store(other, tmp_path / "other", kernel)  # the other writer's rename lands first
        real_replace(src, dst)

    cache.fs.replace = publish_first  # type: ignore[method-assign]
    (tmp_path / "other").mkdir()
    entry = Path(_store(cache, tmp_path, kernel))
    assert "another writer stored the same entry meanwhile: theirs kept" in capfd.readouterr().err
    assert cache.lookup(_inputs(kernel), "") is not None
    assert [p.name for p in (tmp_path / "cache").iterdir() if p.name.startswith(".")] == []
    assert entry.is_dir()


def test_a_signal_during_the_verifying_copy_ends_it_and_keeps_the_good_entry(tmp_path, monkeypatch):
    """Issue 20.8: the verifying copy of a large bundle (4.3 s for 1 GiB) did not check for cancellation;
    now each chunk does, and a cancellation is never taken for a corrupt entry."""
    from driver_ctr.toolkit.errors import Cancelled
    from driver_ctr.toolkit.waiting import Cancellation

    (tmp_path / "cache").mkdir()
    cache = HostCache(tmp_path / "cache")
    kernel = "6.1.0-57-amd64"
    t = _tree(tmp_path, kernel)
    with open(str(t / NV / "firmware.bin"), "wb") as f:
        f.truncate(32 << 20)
    cache.store(_inputs(kernel), BuildRecord(builder="kbuild", files=describe_tree(t, DEFAULT_MODULE_SIZE_LIMIT)), t)
    entry = cache.lookup(_inputs(kernel), "", verify=False)
    assert entry is not None
    cancel = Cancellation()
    cancel.set()
    monkeypatch.setattr(Cancellation, "installed", cancel)
    with pytest.raises(Cancelled):
        cache.adopt(entry, tmp_path / "trees")
    with pytest.raises(Cancelled):
        cache.lookup(_inputs(kernel), "")
    monkeypatch.setattr(Cancellation, "installed", None)
    assert cache.lookup(_inputs(kernel), "") is not None  # still there, still good
    assert list((tmp_path / "trees").iterdir()) == []  # no partial copy left behind


def test_an_oversize_entry_record_is_discarded_without_being_read(tmp_path):
    """Issue 20.1: a bundle's entry.json was read whole (0.4-0.6 GiB of memory for a large one)."""
    import tracemalloc

    (tmp_path / "cache").mkdir()
    cache = HostCache(tmp_path / "cache")
    kernel = "6.1.0-57-amd64"
    entry = Path(_store(cache, tmp_path, kernel))
    with open(str(entry / "entry.json"), "r+b") as f:
        f.truncate(600 << 20)  # sparse: 600 MiB of record
    tracemalloc.start()
    assert cache.lookup(_inputs(kernel), "") is None
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 16 << 20 and not entry.exists()


def test_a_store_reached_through_a_link_is_the_links_target(tmp_path):
    """The store's own configured path may lead through a link (a test keeps its real builds that way); inside
    the store nothing is followed."""
    (tmp_path / "kept").mkdir()
    (tmp_path / "cache").symlink_to(tmp_path / "kept")
    cache = HostCache(tmp_path / "cache")
    kernel = "6.1.0-57-amd64"
    _store(cache, tmp_path, kernel)
    assert cache.lookup(_inputs(kernel), "") is not None and cache.kernels() == [kernel]
    assert (tmp_path / "kept" / kernel).is_dir()
