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
    AT_ONCE_S,
    PROMPT_S,
    RHEL_KERNEL,
    env_for,
    finish,
    make_dtk_image,
    make_fixture_modules,
    make_shared_dir,
    nvd,
    package_job,
    path_with,
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
    assert time.monotonic() - t0 < AT_ONCE_S
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
    assert time.monotonic() - t0 < AT_ONCE_S
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
    # issue 20.6: the same proxy without a scheme (the README accepts it) in status, its JSON, logs and errors
    bare = "%s:%s@proxy.example:3128" % (user, password)
    assert redact_url_credentials(bare) == "***@proxy.example:3128"
    assert redact_url_credentials("the proxy %s refused" % bare) == "the proxy ***@proxy.example:3128 refused"
    assert redact_url_credentials("https_proxy=" + bare) == "https_proxy=***@proxy.example:3128"
    s = Settings.from_env({"DRIVER_VERSION": "535.261.03", "TARGETARCH": "amd64", "HTTPS_PROXY": bare})
    assert s.describe()["HTTPS_PROXY"] == "***@proxy.example:3128"
    assert json.dumps(_redact(None, "info", {"event": "x", "proxy": bare})) == json.dumps(
        {"event": "x", "proxy": "***@proxy.example:3128"}
    )


def test_13_the_two_reported_leaks():
    from driver_ctr.toolkit.redact import redact_url_credentials

    assert redact_url_credentials("http://u:p@ss3cretpw@proxy:3128") == "http://***@proxy:3128"
    assert redact_url_credentials("http://u:s3cret/pw@proxy:3128") == "http://***@proxy:3128"


def test_18_redaction_is_linear():
    """A 1 MiB message with a long word before a URL (the old regex was quadratic:
    minutes) is redacted in a child that must finish within AT_ONCE_S, and costs
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
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=AT_ONCE_S)
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
        end = time.monotonic() + AT_ONCE_S  # the DTK side sweeps once it holds its lock
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
    env = dict(env, PATH=path_with(env, bindir), DRIVER_CTR_USERSPACE="auto")
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


# -- issue 20: every input from outside is hostile until verified ---------------------------------------------
# An audit ran a hostile or broken node against the surfaces outside the shared dir; each test below names its
# finding and failed on the code before the fix.


def _promptly(call, *args):
    """``call(*args)`` in a thread: its result, or the exception it raised; a call still blocked after
    PROMPT_S (a blocking open of a FIFO never returns) fails the test."""
    import concurrent.futures

    pool = concurrent.futures.ThreadPoolExecutor(1)
    future = pool.submit(call, *args)
    try:
        return future.result(timeout=PROMPT_S)
    except concurrent.futures.TimeoutError:
        raise AssertionError("%s(%s) blocked" % (call.__name__, ", ".join(map(str, args)))) from None
    except Exception as exc:  # noqa: BLE001 - the caller asserts on it
        return exc
    finally:
        pool.shutdown(wait=False)


def _hostile(path, kind):
    """A FIFO, /dev/zero behind a link, or a file over its kind's bound at ``path``."""
    from driver_ctr.toolkit.inputs import LIMITS

    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "fifo":
        os.mkfifo(str(path))
    elif kind == "device":
        path.symlink_to("/dev/zero")
    else:
        with open(str(path), "wb") as f:
            f.truncate(max(LIMITS.values()) + 1)


HOSTILE = ["fifo", "device", "oversize"]
NAMED = {"fifo": "a FIFO, not a regular file", "device": "a character device", "oversize": "over the bound"}


@pytest.mark.parametrize("kind", HOSTILE)
def test_20_1_mofeds_symvers_is_named_never_read_blocking(root, kind):
    from driver_ctr.toolkit.mofed import find_ofa_kernel
    from driver_ctr.toolkit.paths import HostPaths

    tree = root / "run/mellanox/drivers/usr/src/ofa_kernel/default"
    _hostile(tree / "Module.symvers", kind)
    found, why = _promptly(find_ofa_kernel, HostPaths(root=str(root)), "6.1.0-57-amd64", "amd64", False)
    assert found is None and NAMED[kind] in why and "Module.symvers" in why


@pytest.mark.parametrize("kind", HOSTILE)
def test_20_1_entitlement_key_certificate_and_repository_files_are_named(tmp_path, kind):
    from fakes import FakeRunner

    from driver_ctr.fallback.dnf import certificate_problems, repo_file_problems

    key, cert, repos = tmp_path / "e-key.pem", tmp_path / "e.pem", tmp_path / "yum.repos.d"
    _hostile(key, kind)
    _hostile(cert, kind)
    _hostile(repos / "redhat.repo", kind)
    problems = _promptly(certificate_problems, cert, key, FakeRunner())  # openssl is never reached
    assert len(problems) == 2 and all(NAMED[kind] in p for p in problems), problems
    assert "entitlement key" in problems[0] and "entitlement certificate" in problems[1]
    (repo_problem,) = _promptly(repo_file_problems, repos)
    assert NAMED[kind] in repo_problem and "redhat.repo" in repo_problem


@pytest.mark.parametrize("kind", HOSTILE)
def test_20_1_os_release_parameter_vgpu_and_signing_files_are_named(root, tmp_path, kind):
    from driver_ctr.fallback.node_os import read_node_os
    from driver_ctr.node.module_params import read_param_files
    from driver_ctr.toolkit.errors import DriverCtrError
    from driver_ctr.toolkit.signing import certificate_fingerprint

    os_release, drivers, cert = tmp_path / "os-release", tmp_path / "drivers", tmp_path / "signing.pem"
    _hostile(os_release, kind)
    _hostile(drivers / "nvidia.conf", kind)
    _hostile(cert, kind)
    for call, arg in ((read_node_os, os_release), (read_param_files, drivers), (certificate_fingerprint, cert)):
        err = _promptly(call, arg)
        assert isinstance(err, DriverCtrError) and NAMED[kind] in str(err), (call.__name__, err)


@pytest.mark.parametrize("kind", HOSTILE)
def test_20_1_gridd_conf_is_named_and_nothing_is_written(root, kind):
    from driver_ctr.node.vgpu import GRIDD_CONF, install_licence
    from driver_ctr.toolkit.settings import Settings

    env = env_for(root, DRIVER_TYPE="vgpu")
    _hostile(root / "drivers/gridd.conf", kind)
    err = _promptly(install_licence, Settings.from_env(env), None)
    assert NAMED[kind] in str(err)
    assert not (root / GRIDD_CONF.lstrip("/")).exists()


def test_20_1_a_large_input_read_ends_on_cancellation(tmp_path):
    from driver_ctr.toolkit.errors import Cancelled
    from driver_ctr.toolkit.inputs import read_input
    from driver_ctr.toolkit.waiting import Cancellation

    big = tmp_path / "Module.symvers"
    with open(str(big), "wb") as f:
        f.truncate(64 << 20)
    cancel = Cancellation()
    cancel.set()
    with pytest.raises(Cancelled):
        read_input(big, "kernel tree file", cancel=cancel)


def test_20_1_the_dtk_sides_log_tail_reads_the_end_of_the_log_only(tmp_path):
    import tracemalloc

    from driver_ctr.toolkit.dtk_side import _log_tail

    log = tmp_path / "build.log"
    with open(str(log), "wb") as f:
        f.truncate(256 << 20)  # 256 MiB of NULs (sparse), then the compiler's last words
        f.seek(0, os.SEEK_END)
        f.write(b"nv.c:1:1: error: the last words\nmake: *** Error 1\n")
    tracemalloc.start()
    tail = _log_tail(log)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert tail.endswith("nv.c:1:1: error: the last words\nmake: *** Error 1")
    assert peak < 4 << 20, peak  # a few buffers of 64 KiB, not the file


def test_20_7_build_logs_never_follow_a_link_and_rotate_only_their_own(root, tmp_path):
    from driver_ctr.toolkit.build_logs import KEEP, build_logs, keep_build_log
    from driver_ctr.toolkit.paths import HostPaths

    paths = HostPaths(root=str(root))
    log = tmp_path / "build.log"
    log.write_text("the compiler's words\n")
    other = _outside(tmp_path)
    (other / "build-6.1.0-1-amd64-1-20260101T000000.000Z.log").write_text("someone else's\n")
    (root / "var/log").mkdir(parents=True)
    (root / "var/log/driver-ctr").symlink_to(other)
    assert keep_build_log(paths, log, "6.1.0-57-amd64", 1) is None  # never written through the link
    assert build_logs(paths) == []
    assert len(list(other.iterdir())) == 5
    (root / "var/log/driver-ctr").unlink()
    d = root / "var/log/driver-ctr"
    d.mkdir()
    (d / "build-notes.log").write_text("an admin's file of a similar name\n")
    (d / "build-x\ninjected-1-20260101T000000.000Z.log").write_text("a name with a newline\n")
    kept = [keep_build_log(paths, log, "6.1.0-57-amd64", g) for g in range(KEEP + 3)]
    assert all(k is not None for k in kept)
    assert build_logs(paths) == kept[::-1][:KEEP]
    assert (d / "build-notes.log").is_file() and (d / "build-x\ninjected-1-20260101T000000.000Z.log").is_file()


@pytest.mark.parametrize("raised, words", [("ENOSPC", "No space left on device (ENOSPC)"), ("bug", "RuntimeError")])
def test_20_3_any_failure_of_the_dtk_side_is_signalled_and_the_driver_side_reports_it(root, tmp_path, raised, words):
    """A full disk in the build (an OSError) or a bug (any exception) ends the DTK side with
    driver_build_failed carrying the reason, and the driver side reports it at once, not at its deadline."""
    make_dtk_image(root)
    mods = make_fixture_modules(tmp_path / "fixture", RHEL_KERNEL)
    (mods / "RAISE").write_text(raised)
    env = env_for(root, DRIVER_CTR_FIXTURE_MODULES=str(mods))
    shared = make_shared_dir(root)
    drv = start_driver(env)
    dtk = start_dtk(env, shared)
    wait_for_file(shared / "driver_build_failed")
    t0 = time.monotonic()
    d = finish(drv, PROMPT_S)
    assert time.monotonic() - t0 < PROMPT_S
    assert d.returncode == 1 and words in d.stderr, d.stderr[-2000:]
    k = finish(dtk, PROMPT_S)
    assert k.returncode == 1 and words in k.stderr
    assert json.loads((shared / "driver_build_failed").read_text())["message"].count(words) == 1
    assert ("Traceback" in k.stderr) == (raised == "bug")  # a bug shows where it is; a full disk does not


def test_20_3_a_full_shared_dir_at_prepare_is_a_named_error_and_leaves_nothing_half_written(root, tmp_path):
    from harness import run_with_small_disk

    make_dtk_image(root)
    env = env_for(root, DRIVER_CTR_FIXTURE_MODULES=str(make_fixture_modules(tmp_path / "fixture", RHEL_KERNEL)))
    shared = make_shared_dir(root)
    script = '%s -m driver_ctr ocp_dtk_entrypoint nv-ctr-run-with-dtk --dry-run; echo "rc=$?"; echo "left: $($LEFT)"'
    r = run_with_small_disk(shared, "16k", script % sys.executable, env, timeout=AT_ONCE_S)
    assert "rc=1" in r.stdout, r.stdout + r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert "No space left on device (ENOSPC)" in r.stderr and str(shared) in r.stderr
    (left,) = [l for l in r.stdout.splitlines() if l.startswith("left:")]
    assert ".tmp" not in left and "dir_prepared" not in left, left  # no temporary, nothing a DTK side trusts


def test_20_3_a_full_shared_dir_during_the_dtk_build_is_signalled_and_reported(root, tmp_path):
    """The DTK side fills the shared dir while staging its build: it still writes driver_build_failed (the
    build log's room is given back when the flag cannot be written) and the driver side reports the cause."""
    from harness import run_with_small_disk

    make_dtk_image(root)
    mods = make_fixture_modules(tmp_path / "fixture", RHEL_KERNEL)
    with open(str(mods / "nvidia-big.ko"), "wb") as f:
        f.write(os.urandom(3 << 20))  # larger than the room left once the driver side has prepared
    env = env_for(root, DRIVER_CTR_FIXTURE_MODULES=str(mods))
    shared = make_shared_dir(root)
    script = (
        "(until [ -f {s}/dir_prepared ]; do sleep 0.05; done; exec {s}/ocp_dtk_entrypoint dtk-build-driver) "
        "2>{t}/dtk.err & dtk=$!\n"
        '{py} -m driver_ctr ocp_dtk_entrypoint nv-ctr-run-with-dtk --dry-run; echo "rc=$?"\n'
        'wait "$dtk"; echo "dtk=$?"\n'
    ).format(s=shared, t=tmp_path, py=sys.executable)
    r = run_with_small_disk(shared, "3m", script, env, timeout=AT_ONCE_S * 3)
    dtk_err = (tmp_path / "dtk.err").read_text()
    assert "rc=1" in r.stdout and "dtk=1" in r.stdout, r.stdout + r.stderr[-2000:] + dtk_err[-2000:]
    assert "No space left on device (ENOSPC)" in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr + dtk_err


# -- 20.2: package contents are a trust boundary ------------------------------------------------------------------

PK = "6.1.0-99-amd64"


def _headers(extra=()):
    from harness import tar_entry

    hdr = "./usr/src/linux-headers-%s" % PK
    return [
        tar_entry(hdr, "dir", mode=0o755),
        tar_entry(hdr + "/Makefile", data=b"all:\n"),
        tar_entry(hdr + "/.config", data=b"CONFIG_MODULES=y\n"),
        tar_entry("./lib/modules/%s/build" % PK, "symlink", link="/usr/src/linux-headers-%s" % PK),
        *extra,
    ]


def _apt_install(root, tmp_path, packages):
    """The apt backend installing ``packages`` ({name: members}) from a node-local repository into ``root``."""
    from harness import make_deb

    from driver_ctr.fallback.apt import AptBackend
    from driver_ctr.toolkit.runner import Runner

    repo = tmp_path / "repo"
    repo.mkdir(exist_ok=True)
    for name, members in packages.items():
        make_deb(repo / (name + ".deb"), name, members)
    apt = AptBackend(package_job(root, PK, Runner(), repo))
    return apt.install(list(packages))


def _listing(d):
    return sorted(str(p.relative_to(d)) + ("@" if p.is_symlink() else "") for p in d.rglob("*"))


def test_20_2_a_package_installs_only_the_kernels_build_tree_never_the_daemonsets_mounts(root, tmp_path):
    from harness import tar_entry

    (root / "usr/lib").mkdir(parents=True)
    (root / "lib").symlink_to("usr/lib")  # a merged-usr root: its own link is the one gone through
    planted = [
        tar_entry("./run/nvidia/validations/.driver-ctr-ready", data=b"ready\n"),
        tar_entry("./var/lib/driver-ctr/cache/%s/k/entry.json" % PK, data=b"{}"),
        tar_entry("./var/log/driver-ctr/build-x.log", data=b"forged\n"),
        tar_entry("./etc/modprobe.d/evil.conf", data=b"install nvidia /bin/sh\n"),
    ]
    _apt_install(root, tmp_path, {"linux-headers-" + PK: _headers(planted)})
    assert not (root / "run").exists() and not (root / "var/lib/driver-ctr/cache").exists()
    assert not (root / "var/log").exists() and not (root / "etc").exists()
    assert (root / ("usr/src/linux-headers-%s/Makefile" % PK)).is_file()
    assert os.readlink(str(root / "usr/lib/modules" / PK / "build")) == "/usr/src/linux-headers-%s" % PK
    assert (root / "lib").is_symlink()
    assert [p.name for p in (root / "var/tmp").iterdir()] == []  # the scratch is gone


HOSTILE_MEMBERS = {
    "a character device": ("./usr/src/linux-headers-%s/null" % PK, "chr", {}),
    "a FIFO": ("./usr/src/linux-headers-%s/fifo" % PK, "fifo", {}),
    "the setuid bit": ("./usr/src/linux-headers-%s/su" % PK, "file", {"mode": 0o4755}),
    "the setgid bit": ("./usr/src/linux-headers-%s/sg" % PK, "file", {"mode": 0o2755}),
    "a link out of the package's tree": ("./usr/src/linux-headers-%s/x" % PK, "symlink", {"link": "../../../../.."}),
    "a link out of the kernel's build tree": ("./lib/modules/%s/kernel" % PK, "symlink", {"link": "/etc"}),
    "a name that climbs out": ("../../etc/cron.d/x", "file", {}),
}


@pytest.mark.parametrize("why", sorted(HOSTILE_MEMBERS))
def test_20_2_a_hostile_member_refuses_the_package_by_name_and_nothing_is_installed(root, tmp_path, why):
    from harness import tar_entry

    from driver_ctr.fallback.package_contents import UnsafePackage

    name, kind, kw = HOSTILE_MEMBERS[why]
    with pytest.raises(UnsafePackage) as exc:
        _apt_install(root, tmp_path, {"linux-headers-" + PK: _headers([tar_entry(name, kind, **kw)])})
    assert why in str(exc.value) and "linux-headers-%s.deb" % PK in str(exc.value)
    assert _listing(root) == ["var", "var/tmp"]  # nothing installed, the scratch gone


def test_20_2_a_link_of_one_package_is_never_written_through_by_the_next(root, tmp_path):
    from harness import tar_entry

    from driver_ctr.fallback.package_contents import UnsafePackage

    link = tar_entry("./lib/modules/%s/kernel" % PK, "symlink", link="/usr/src/linux-headers-%s" % PK)
    through = [tar_entry("./lib/modules/%s/kernel/evil.ko" % PK, data=b"\x7fELF")]
    with pytest.raises(UnsafePackage) as exc:
        _apt_install(root, tmp_path, {"linux-headers-" + PK: _headers([link]), "linux-image-" + PK: through})
    assert "would be written through a link" in str(exc.value)
    assert _listing(root) == ["var", "var/tmp"]


def test_20_2_a_link_already_in_the_root_is_never_written_through(root, tmp_path):
    from harness import tar_entry

    from driver_ctr.toolkit.errors import ProtocolError

    outside = _outside(tmp_path)
    (root / "lib/modules" / PK).mkdir(parents=True)
    (root / "lib/modules" / PK / "kernel").symlink_to(outside)
    with pytest.raises(ProtocolError):
        _apt_install(root, tmp_path, {"linux-image-" + PK: [tar_entry("./lib/modules/%s/kernel/a.ko" % PK)]})
    assert sorted(p.name for p in outside.iterdir()) == ["keep-%d" % i for i in range(4)]


def test_20_2_the_size_bound_refuses_a_package_before_its_data_is_written(tmp_path):
    import io

    from harness import make_deb, tar_entry

    from driver_ctr.fallback.package_contents import UnsafePackage, tar_members, unpack, wanted
    from driver_ctr.toolkit.shared_fs import Confined

    big = tar_entry("./usr/src/linux-headers-%s/zeros" % PK, data=bytes(2 << 20))
    deb = make_deb(tmp_path / "bomb.deb", "bomb", _headers([big]))
    tar = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], capture_output=True, check=True).stdout
    (tmp_path / "scratch").mkdir()
    with pytest.raises(UnsafePackage, match="over the bound of 1048576 bytes"):
        unpack("bomb.deb", tar_members(io.BytesIO(tar)), Confined(tmp_path / "scratch"), wanted(PK), bound=1 << 20)
    assert not (tmp_path / ("scratch/usr/src/linux-headers-%s/zeros" % PK)).exists()


def test_20_2_a_half_install_is_redone_never_trusted(root, tmp_path):
    from harness import make_deb

    from driver_ctr.fallback import install_kernel_tree
    from driver_ctr.toolkit.errors import NoKernelTree
    from driver_ctr.toolkit.kernel_tree import open_kernel_tree
    from driver_ctr.toolkit.log import get_logger
    from driver_ctr.toolkit.runner import Runner
    from driver_ctr.toolkit.settings import Settings

    repo = root / "repo"  # DRIVER_CTR_LOCAL_REPO is a node path, under the root
    repo.mkdir()
    make_deb(repo / "h.deb", "linux-headers-" + PK, _headers())
    make_deb(repo / "m.deb", "linux-image-" + PK, [])  # no modules.dep: depmod will make one
    (root / "host-etc").mkdir()
    (root / "host-etc/os-release").write_text('ID=debian\nVERSION_ID="12"\n')
    settings = Settings.from_env(env_for(root, PK, DRIVER_CTR_LOCAL_REPO="/repo"))
    install_kernel_tree(settings, PK, Runner(), get_logger())
    paths = settings.paths
    marker = paths.module_dir(PK) / ".driver-ctr-install-incomplete"
    assert not marker.exists()
    open_kernel_tree(paths, PK)  # complete: trusted
    marker.write_text("installing\n")  # as a start killed mid-install leaves it
    with pytest.raises(NoKernelTree, match="were being installed when a start ended"):
        open_kernel_tree(paths, PK)
    install_kernel_tree(settings, PK, Runner(), get_logger())  # redone, then trusted
    assert not marker.exists()
    open_kernel_tree(paths, PK)


def test_20_2_the_node_local_repositorys_problems_are_named(root, tmp_path, capfd):
    from harness import make_deb

    from driver_ctr.fallback.apt import AptBackend
    from driver_ctr.fallback.base import FallbackFailed
    from driver_ctr.toolkit.runner import Runner

    fifo = tmp_path / "repo-fifo"
    os.mkfifo(str(fifo))
    err = _promptly(AptBackend(package_job(root, PK, Runner(), fifo)).local_kernel_packages)
    assert isinstance(err, FallbackFailed) and "repo-fifo is a FIFO, not a directory" in str(err)
    repo = tmp_path / "repo"
    repo.mkdir()
    os.mkfifo(str(repo / ("linux-headers-%s.deb" % PK)))  # would stall dpkg-deb for its 60 s timeout
    make_deb(repo / "other.deb", "linux-kbuild-6.1", [])
    assert _promptly(AptBackend(package_job(root, PK, Runner(), repo)).local_kernel_packages) == []
    err = capfd.readouterr().err
    assert "node-local repository entry skipped" in err and "is a FIFO" in err
    assert "the node-local repository lacks the kernel's packages" in err and "linux-headers-" + PK in err


def test_20_2_publishing_beside_the_kernels_modules_never_follows_a_link_in_its_tree(root, tmp_path):
    """A package's link inside /lib/modules/<k> had let publish_modules write the fixture .ko files into the
    machine's own /lib/modules (it happened during the audit)."""
    from fakes import FakeRunner

    from driver_ctr.node.state import publish_modules
    from driver_ctr.toolkit.errors import ProtocolError
    from driver_ctr.toolkit.log import get_logger
    from driver_ctr.toolkit.paths import HostPaths

    outside = _outside(tmp_path)
    tree = make_fixture_modules(tmp_path / "tree" / NV, PK).parent.parent.parent
    (root / "lib/modules" / PK).mkdir(parents=True)
    (root / "lib/modules" / PK / "kernel").symlink_to(outside)
    with pytest.raises(ProtocolError, match="where a directory is expected"):
        publish_modules(HostPaths(root=str(root)), tree, PK, FakeRunner(), get_logger())
    assert sorted(p.name for p in outside.iterdir()) == ["keep-%d" % i for i in range(4)]


def test_20_7_a_preflight_installs_the_kernels_trees_into_its_own_scratch_root_apts_state_too(root, tmp_path):
    from fakes import FakeRunner
    from harness import make_deb

    from driver_ctr.fallback import install_kernel_tree
    from driver_ctr.fallback.apt import AptBackend
    from driver_ctr.toolkit.log import get_logger
    from driver_ctr.toolkit.runner import Runner
    from driver_ctr.toolkit.settings import Settings

    (root / "repo").mkdir()
    make_deb(root / "repo/h.deb", "linux-headers-" + PK, _headers())
    make_deb(root / "repo/m.deb", "linux-image-" + PK, [])
    settings = Settings.from_env(env_for(root, PK, DRIVER_CTR_LOCAL_REPO="/repo"))
    before = _listing(root)
    scratch = tmp_path / "check-root"
    install_kernel_tree(settings, PK, Runner(), get_logger(), root=scratch)
    assert _listing(root) == before  # the running system's root: untouched
    assert (scratch / "lib/modules" / PK / "modules.dep").is_file()
    fake = FakeRunner()
    fake.expect(("apt-get",))
    AptBackend(package_job(scratch, PK, fake)).refresh()
    state = scratch / "var/lib/driver-ctr/apt"
    assert fake.calls == [
        ("apt-get", "-o", "Dir::State::Lists=%s/lists" % state, "-o", "Dir::Cache=%s/cache" % state) + ("update", "-q")
    ]


def test_20_8_unpacking_a_package_ends_on_cancellation(tmp_path, monkeypatch):
    import io

    from harness import make_deb

    from driver_ctr.fallback.package_contents import tar_members, unpack, wanted
    from driver_ctr.toolkit.errors import Cancelled
    from driver_ctr.toolkit.shared_fs import Confined
    from driver_ctr.toolkit.waiting import Cancellation

    deb = make_deb(tmp_path / "h.deb", "h", _headers())
    tar = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], capture_output=True, check=True).stdout
    cancel = Cancellation()
    cancel.set()
    monkeypatch.setattr(Cancellation, "installed", cancel)
    (tmp_path / "scratch").mkdir()
    with pytest.raises(Cancelled):
        unpack("h.deb", tar_members(io.BytesIO(tar)), Confined(tmp_path / "scratch"), wanted(PK))
    assert list((tmp_path / "scratch").iterdir()) == []


# -- 20.6: no echo of what is not ours to print ------------------------------------------------------------------


def test_20_6_an_unparsable_parameter_line_is_named_by_file_and_line_never_printed(tmp_path):
    from driver_ctr.node.module_params import ParameterError, read_param_files

    shadow = tmp_path / "shadow"
    shadow.write_text('root:$6$s3cr3tHASH"unclosed:19000:0:99999:7:::\n')
    drivers = tmp_path / "drivers"
    drivers.mkdir()
    (drivers / "nvidia.conf").symlink_to(shadow)  # a ConfigMap-like link to another file
    with pytest.raises(ParameterError) as exc:
        read_param_files(drivers)
    assert "nvidia.conf:1: the line does not parse" in str(exc.value) and "s3cr3t" not in str(exc.value)
    shadow.write_text("NVreg_A=1 s3cr3t:HASH\n")  # a word that is neither name=value nor a parameter name
    with pytest.raises(ParameterError) as exc:
        read_param_files(drivers)
    assert "nvidia.conf:1: word 2 of the line is not name=value" in str(exc.value) and "s3cr3t" not in str(exc.value)


def test_20_6_the_peermem_sidecars_parameters_are_checked_as_the_load_path_checks_them(root, capfd):
    from harness import make_fixture_module

    from driver_ctr.commands.peermem import checked_parameters
    from driver_ctr.node.module_params import ParameterError
    from driver_ctr.toolkit.log import get_logger
    from driver_ctr.toolkit.settings import Settings

    settings = Settings.from_env(env_for(root))
    mods = root / "run/nvidia/driver/lib/modules" / RHEL_KERNEL
    make_fixture_module(mods / NV, "nvidia-peermem", RHEL_KERNEL)  # declares NVreg_Test:uint, as fixtures do
    (mods / "modules.dep").write_text("%s/nvidia-peermem.ko:\n" % NV)
    (root / "drivers").mkdir()
    conf = root / "drivers/nvidia-peermem.conf"
    conf.write_text("NVreg_Test=7 peerdirect_secret=hunter2\n")
    assert checked_parameters(settings, get_logger()) == ["NVreg_Test=7"]  # the unknown one dropped
    err = capfd.readouterr().err
    assert "unknown module parameter dropped" in err and "hunter2" not in err
    conf.write_text("\nNVreg_Test=-1\n")
    with pytest.raises(ParameterError, match=r"nvidia-peermem.conf:2: NVreg_Test='-1': expected an integer"):
        checked_parameters(settings, get_logger())


def test_20_6_status_escapes_names_from_the_node(root, tmp_path):
    from driver_ctr.commands.status import collect, render_text
    from driver_ctr.toolkit.settings import Settings

    logs = root / "var/log/driver-ctr"
    logs.mkdir(parents=True)
    store = root / "usr/src/nvidia-535.261.03/kernel/precompiled"
    (store / "6.1.0-1-amd64\ninjected: yes").mkdir(parents=True)
    settings = Settings.from_env(env_for(root, HTTPS_PROXY="user:pw@proxy.corp:3128"))
    text = render_text(collect(settings))
    assert "\ninjected: yes" not in text and "6.1.0-1-amd64\\ninjected: yes" in text
    assert "pw@" not in text and "HTTPS_PROXY=***@proxy.corp:3128" in text


# -- 20.10: tests never touch their host ------------------------------------------------------------------------


def test_20_10_the_suite_refuses_to_start_the_product_with_the_hosts_own_tools(root):
    """The guard: a product process started without the stand-in node tools first on its PATH is refused
    before it starts, whatever the host's kernel could load."""
    env = env_for(root)
    with pytest.raises(AssertionError, match="refusing to start the product with the host's own modprobe"):
        subprocess.run([sys.executable, "-m", "driver_ctr", "nvidia-driver", "load"], env=dict(env, PATH="/usr/bin"))


def test_20_10_a_load_on_this_host_goes_to_the_stand_in_tools_which_refuse_it(root, tmp_path):
    """`nvidia-driver load` of a fixture tree: the stand-in modprobe records the insert and refuses it as
    this project's hosts do; the real modprobe never ran an insert (only --show-depends reaches it)."""
    from harness import make_fixture_modules

    record = tmp_path / "tools.log"
    env = env_for(root, DRIVER_CTR_FIXTURE_MODULES=str(make_fixture_modules(tmp_path / "fx", RHEL_KERNEL)))
    make_dtk_image(root)
    d, _ = run_both(root, env)
    assert d.returncode == 0, d.stderr
    r = nvd(dict(env, NODE_TOOLS_LOG=str(record)), "load")
    assert r.returncode == 1 and "the kernel refused module loading" in r.stderr, r.stderr[-2000:]
    ran = record.read_text()
    assert "modprobe -d %s/run/nvidia/driver-ctr/modroot" % root in ran and "--first-time nvidia" in ran


def test_20_7_a_preflights_scratch_root_has_the_images_merged_usr_layout(root, tmp_path):
    """Debian 13's packages ship /usr/lib/modules/<k>: in a merged-usr image (lib -> usr/lib) the preflight's
    scratch root gets the same link, so the trees land where the image would have them (the trixie cells of
    the branch matrix failed without it)."""
    from harness import make_deb, tar_entry

    from driver_ctr.fallback import install_kernel_tree
    from driver_ctr.toolkit.log import get_logger
    from driver_ctr.toolkit.runner import Runner
    from driver_ctr.toolkit.settings import Settings

    (root / "usr/lib").mkdir(parents=True)
    (root / "lib").symlink_to("usr/lib")
    (root / "repo").mkdir()
    headers = [e for e in _headers() if "lib/modules" not in e[0].name]
    build = tar_entry("./usr/lib/modules/%s/build" % PK, "symlink", link="/usr/src/linux-headers-%s" % PK)
    make_deb(root / "repo/h.deb", "linux-headers-" + PK, headers + [build])
    make_deb(root / "repo/m.deb", "linux-image-" + PK, [])
    settings = Settings.from_env(env_for(root, PK, DRIVER_CTR_LOCAL_REPO="/repo"))
    scratch = tmp_path / "check-root"
    install_kernel_tree(settings, PK, Runner(), get_logger(), root=scratch)
    assert (scratch / "lib").is_symlink() and (scratch / ("usr/src/linux-headers-%s/Makefile" % PK)).is_file()
    assert os.readlink(str(scratch / "lib/modules" / PK / "build")) == "/usr/src/linux-headers-%s" % PK
