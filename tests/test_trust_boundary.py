"""The shared directory is a trust boundary (issue 10): what a broken or hostile
DTK container (or a crash) leaves there never reaches outside it, never hangs,
never leaks. Each test names the finding it guards; each failed on the code
before the fix. Real processes on a temporary root, fixture modules."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO
from harness import (
    PROMPT_S,
    RHEL_KERNEL,
    env_for,
    finish,
    make_dtk_image,
    make_fixture_modules,
    make_shared_dir,
    nvd,
    run_both,
    start_driver,
    start_dtk,
    stop,
    wait_for_file,
)
from hypothesis import given, settings
from hypothesis import strategies as st

NV = "kernel/drivers/video"


def _outside(tmp_path, n=4):
    out = tmp_path / "outside"
    out.mkdir()
    for i in range(n):
        (out / ("keep-%d" % i)).write_text("host data %d\n" % i)
    return out


# -- escapes and data loss -----------------------------------------------------------


def test_1_stale_symlink_is_replaced_not_followed(built, root, tmp_path):
    """stale/ pointing outside: the old generation is moved into a real stale/ and
    nothing outside is moved into or deleted."""
    env, shared = built
    outside = _outside(tmp_path)
    assert not (shared / "stale").exists()  # one generation so far
    (shared / "stale").symlink_to(outside)
    d, _ = run_both(root, dict(env, DRIVER_CONFIG_DIGEST="other-config"))  # new inputs: a new generation
    assert d.returncode == 0, d.stderr
    assert sorted(p.name for p in outside.iterdir()) == ["keep-%d" % i for i in range(4)]
    assert (shared / "stale").is_dir() and not (shared / "stale").is_symlink()
    assert list((shared / "stale").glob("gen-1-*/driver_built"))


def test_2_drivers_symlink_is_not_written_through(built, root, tmp_path):
    env, shared = built
    outside = _outside(tmp_path)
    (root / "drivers").mkdir(exist_ok=True)
    (root / "drivers/nvidia.conf").write_text("NVreg_Test=1\n")
    (shared / "drivers").symlink_to(outside)
    d, _ = run_both(root, dict(env, DRIVER_CONFIG_DIGEST="other-config"))
    assert d.returncode == 0, d.stderr
    assert not (outside / "nvidia.conf").exists()
    assert (shared / "drivers").is_dir() and not (shared / "drivers").is_symlink()
    assert (shared / "drivers/nvidia.conf").read_text() == "NVreg_Test=1\n"


def test_3_modules_dir_that_is_a_symlink_is_refused(built, tmp_path):
    env, shared = built
    elsewhere = tmp_path / "elsewhere"
    os.rename(shared / "modules", elsewhere)  # a valid tree, outside
    (shared / "modules").symlink_to(elsewhere)
    d = finish(start_driver(env))
    assert d.returncode == 1
    assert "shared-nvidia-driver-toolkit/modules: is a symlink" in d.stderr


def test_4_unlisted_file_of_any_kind_is_refused(built):
    env, shared = built
    (shared / "modules" / NV / "notes.txt").write_text("not in the manifest\n")
    d = finish(start_driver(env))
    assert d.returncode == 1
    assert "notes.txt: not listed in the manifest" in d.stderr


# -- hangs ------------------------------------------------------------------------------


def test_5_release_file_that_is_a_fifo_is_named_not_waited_on(root):
    make_dtk_image(root)
    rel = root / "etc/driver-toolkit-release.json"
    rel.unlink()
    os.mkfifo(rel)
    env = env_for(root)
    shared = make_shared_dir(root)
    drv, dtk = start_driver(env), start_dtk(env, shared)
    d = finish(drv, 30)
    assert d.returncode == 1
    assert "driver-toolkit-release.json is malformed" in d.stderr and "is a FIFO, not a regular file" in d.stderr
    assert dtk.poll() is None  # idles after saying so, and a TERM ends it
    assert stop(dtk) < PROMPT_S


def test_6_huge_non_json_failure_flag_is_named_fast_with_bounded_output(built):
    env, shared = built
    (shared / "driver_built").unlink()
    (shared / "driver_build_failed").write_bytes(b"x" * (4 << 20))
    t0 = time.monotonic()
    d = finish(start_driver(dict(env, DRIVER_CTR_START_TIMEOUT="60")), 30)
    assert time.monotonic() - t0 < PROMPT_S
    assert d.returncode == 1
    assert "driver_build_failed: is 4194304 bytes, over the bound of 1048576" in d.stderr
    assert len(d.stderr) < 64 << 10


@pytest.mark.parametrize("kind", ["dir", "fifo"])
def test_7_parameter_file_that_is_not_a_regular_file_is_named(built, root, kind):
    env, shared = built
    conf = root / "drivers/nvidia.conf"
    conf.parent.mkdir(exist_ok=True)
    conf.mkdir() if kind == "dir" else os.mkfifo(conf)
    r = nvd(env, "load")
    assert r.returncode == 1
    what = "a directory" if kind == "dir" else "a FIFO"
    assert "%s: parameter file is %s, not a regular file" % (conf, what) in r.stderr


# -- malformed records ------------------------------------------------------------------


@pytest.mark.parametrize(
    "flag, body, message",
    [
        ("driver_toolkit_broken", '{"reasons": 5}', "field 'reasons': expected a list, got 5"),
        ("driver_toolkit_broken", '{"reasons": "DTK too old"}', "field 'reasons': expected a list"),
        ("driver_build_failed", "\x00\xff\xfe garbage", "flag body is not JSON"),
        ("driver_built", '{"generation": "1"}', "field 'generation': expected a whole number or null, got \"1\""),
    ],
)
def test_8_9_malformed_flag_bodies_are_named_at_once(built, flag, body, message):
    env, shared = built
    if flag != "driver_built":
        (shared / "driver_built").unlink()
    (shared / flag).write_bytes(body.encode("latin-1"))
    t0 = time.monotonic()
    d = finish(start_driver(dict(env, DRIVER_CTR_START_TIMEOUT="60", DRIVER_CTR_BUILD_TIMEOUT="60")), 30)
    assert time.monotonic() - t0 < PROMPT_S
    assert d.returncode == 1 and "Traceback" not in d.stderr
    assert "%s: %s" % (flag, message) in d.stderr


def test_10_stale_that_is_a_regular_file_is_replaced(built, root):
    env, shared = built
    assert not (shared / "stale").exists()  # one generation so far
    (shared / "stale").write_text("not a directory\n")
    d, _ = run_both(root, dict(env, DRIVER_CONFIG_DIGEST="other-config"))
    assert d.returncode == 0, d.stderr
    assert (shared / "stale").is_dir() and list((shared / "stale").glob("gen-1-*"))


# -- resources and secrets --------------------------------------------------------------


def test_11_a_huge_listed_file_is_hashed_in_chunks_and_bounded(built):
    """A 256 MiB file listed with its correct sha256: verified with little memory
    (streamed), and refused by name when over DRIVER_CTR_MODULE_SIZE_LIMIT."""
    env, shared = built
    big = shared / "modules" / "firmware.bin"
    with open(big, "wb") as f:
        f.truncate(256 << 20)
    h = hashlib.sha256()
    with open(big, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    m = json.loads((shared / "manifest.json").read_text())
    m["build"]["files"].append({"path": "firmware.bin", "sha256": h.hexdigest(), "size": 256 << 20})
    (shared / "manifest.json").write_text(json.dumps(m))
    code = (
        "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)"
    )
    r = subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            sys.executable,
            "-m",
            "driver_ctr",
            "ocp_dtk_entrypoint",
            "nv-ctr-run-with-dtk",
            "--dry-run",
        ],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    max_rss_kib = int(r.stdout.split()[-1])
    assert max_rss_kib < 128 << 10, "max RSS %d KiB: the file was read whole" % max_rss_kib
    d = finish(start_driver(dict(env, DRIVER_CTR_MODULE_SIZE_LIMIT=str(100 << 20))), 60)
    assert d.returncode == 1
    assert "firmware.bin: is 268435456 bytes, over the bound of 104857600" in d.stderr


def test_12_an_enormous_value_is_not_echoed_whole(root):
    env = env_for(root, DRIVER_VERSION="5" * 120000)
    r = nvd(env, "status")
    assert r.returncode == 1
    assert "(120000 characters)" in r.stderr and len(r.stderr) < 2000


_PASSWORD = st.text(
    alphabet=st.characters(blacklist_categories=("Cs", "Zs", "Zl", "Zp", "Cc"), blacklist_characters="\"'`"),
    min_size=1,
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(password=_PASSWORD, user=st.from_regex(r"[a-z0-9._-]{1,12}", fullmatch=True))
def test_13_proxy_credentials_are_redacted_whatever_the_password(password, user):
    from driver_ctr.toolkit.log import _redact
    from driver_ctr.toolkit.redact import redact_url_credentials
    from driver_ctr.toolkit.settings import Settings

    url = "http://%s:%s@proxy.example:3128" % (user, password)
    assert redact_url_credentials(url) == "http://***@proxy.example:3128"
    line = "cannot reach %s now" % url
    assert redact_url_credentials(line) == "cannot reach http://***@proxy.example:3128 now"
    assert json.dumps(_redact(None, "info", {"event": "x", "proxy": url})) == json.dumps(
        {"event": "x", "proxy": "http://***@proxy.example:3128"}
    )
    s = Settings.from_env({"DRIVER_VERSION": "535.261.03", "TARGETARCH": "amd64", "HTTPS_PROXY": url})
    assert s.describe()["HTTPS_PROXY"] == "http://***@proxy.example:3128"
    assert "HTTPS_PROXY" not in s.shared()


def test_13_the_two_reported_leaks():
    from driver_ctr.toolkit.redact import redact_url_credentials

    assert redact_url_credentials("http://u:p@ss3cretpw@proxy:3128") == "http://***@proxy:3128"
    assert redact_url_credentials("http://u:s3cret/pw@proxy:3128") == "http://***@proxy:3128"


def test_18_redaction_is_linear():
    """A 1 MiB message with a long word before a URL (the old regex was quadratic:
    minutes) is redacted in a child that must finish within PROMPT_S, and costs
    about 16x a 64 KiB one (linear), not 256x (quadratic)."""
    code = """
import sys, time
from driver_ctr.toolkit.redact import redact_url_credentials
def cost(n):
    text = "a" * n + " http://user:pw@host"  # a long word, then a URL: every start in the word was a scan
    t0 = time.perf_counter()
    out = redact_url_credentials(text)
    assert out.endswith(" http://***@host"), out[-40:]
    return time.perf_counter() - t0
small, large = cost(64 << 10), cost(1 << 20)
print(small, large)
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=PROMPT_S)
    assert r.returncode == 0, r.stderr
    small, large = (float(x) for x in r.stdout.split())
    assert large < 16 * 8 * max(small, 1e-4)


# -- crash, restart and signals -----------------------------------------------------------


def test_15_not_ready_is_written_before_waiting_for_the_dtk(root):
    """A serving container was killed (Ready stays); its successor says NotReady
    before it waits for the DTK."""
    make_dtk_image(root)
    status = root / "run/nvidia/validations/.driver-daemons-status"
    status.parent.mkdir(parents=True)
    status.write_text("Ready\n")
    env = env_for(root, DRIVER_CONFIG_DIGEST="another-digest")
    shared = make_shared_dir(root)
    drv = start_driver(env, dry_run=False)
    wait_for_file(shared / "dir_prepared")
    assert status.read_text() == "NotReady\n"
    assert stop(drv) < PROMPT_S and drv.returncode == 0
    assert not status.exists()  # nothing is ready after it stopped


def test_16_each_side_sweeps_its_own_temporaries(built):
    env, shared = built
    left = [
        shared / ".manifest.json.drv-999-deadbeef.tmp",
        shared / ".driver_built.dtk-999-deadbeef.tmp",
        shared / ".settings.json.drv-998-cafebabe.tmp",
    ]
    for p in left:
        p.write_text("half-written")
    drv, dtk = start_driver(env), start_dtk(env, shared)
    try:
        d = finish(drv)
        assert d.returncode == 0, d.stderr
        end = time.monotonic() + PROMPT_S  # the DTK side sweeps once it holds its lock
        while any(p.exists() for p in left) and time.monotonic() < end:
            time.sleep(0.05)
    finally:
        stop(dtk)
    assert not [p for p in left if p.exists()]
    assert not list(shared.glob(".*.tmp"))


RUN_THAT_HANGS = """#!/bin/sh
# a stand-in .run whose every action takes long
echo "$@" >> "$(dirname "$0")/calls"
sleep 30
"""


def test_17_sigterm_during_the_run_extraction_stops_the_dtk_side(root, tmp_path):
    """The .run's extraction is a child like any other: a TERM stops it, and the DTK side, at once."""
    from harness import installed_kernel, make_real_kernel_root

    kernel = installed_kernel(r"6\.1\.0-\d+-amd64")  # a real tree: kbuild opens it before the sources
    make_real_kernel_root(root, kernel)
    (root / "drivers").mkdir()
    (root / "drivers/NVIDIA-Linux-x86_64-535.261.03.run").write_text(RUN_THAT_HANGS)
    env = env_for(root, kernel)
    env["PATH"] = env["PATH"] + ":/sbin:/usr/sbin"
    shared = make_shared_dir(root)
    drv, dtk = start_driver(env), start_dtk(env, shared)
    wait_for_file(shared / "drivers/calls", timeout=60)  # the extraction is under way
    assert stop(dtk) < PROMPT_S and dtk.returncode == 0
    assert stop(drv) < PROMPT_S


def test_17_sigterm_during_the_userspace_install_starts_nothing_after(built, root):
    env, shared = built
    (root / "drivers").mkdir(exist_ok=True)
    run = root / "drivers/NVIDIA-Linux-x86_64-535.261.03.run"
    run.write_text(RUN_THAT_HANGS)
    run.chmod(0o755)
    bindir = root.parent / "bin"
    bindir.mkdir()
    for tool in ("modprobe", "mount", "rmmod", "umount"):
        (bindir / tool).write_text('#!/bin/sh\necho %s "$@" >> %s\n' % (tool, root.parent / "ran"))
        (bindir / tool).chmod(0o755)
    env = dict(env, PATH="%s:%s" % (bindir, env["PATH"]), DRIVER_CTR_USERSPACE="auto")
    drv = start_driver(env, dry_run=False)
    wait_for_file(root / "drivers/calls", timeout=60)
    assert stop(drv) < PROMPT_S and drv.returncode == 0
    ran = (root.parent / "ran").read_text() if (root.parent / "ran").exists() else ""
    assert "modprobe" not in ran and "mount --rbind" not in ran, ran


def test_19_what_is_loaded_is_the_copy_that_was_verified(built, root):
    env, shared = built
    d = finish(start_driver(env))
    assert d.returncode == 0, d.stderr
    tree = [json.loads(l) for l in d.stderr.splitlines() if '"dry run' in l][0]["tree"]
    assert tree.startswith(str(root / "run/nvidia/driver-ctr/trees/"))
    m = json.loads((shared / "manifest.json").read_text())
    want = {f["path"]: f["sha256"] for f in m["build"]["files"]}
    (shared / "modules" / NV / "nvidia.ko").write_bytes(b"swapped after verification")
    for rel, digest in want.items():
        assert hashlib.sha256(open(os.path.join(tree, rel), "rb").read()).hexdigest() == digest


def test_20_two_dtk_sides_at_once_do_not_break_each_other(root, tmp_path):
    make_dtk_image(root)
    mods = make_fixture_modules(tmp_path / "fixture", RHEL_KERNEL)
    (mods / "DELAY").write_text("1")
    env = env_for(root, DRIVER_CTR_FIXTURE_MODULES=str(mods))
    shared = make_shared_dir(root)
    drv = start_driver(env)
    first = start_dtk(env, shared)
    wait_for_file(shared / "driver_build_started")
    second = start_dtk(env, shared)  # a restart overlapping its predecessor
    d = finish(drv)
    assert d.returncode == 0, d.stderr
    assert stop(first) < PROMPT_S and first.returncode == 0
    second.send_signal(signal.SIGTERM)
    out, err = second.communicate(timeout=PROMPT_S)
    assert second.returncode == 0, err
    assert "FileNotFoundError" not in err and "Traceback" not in err
    assert "another DTK side holds the shared directory" in err
