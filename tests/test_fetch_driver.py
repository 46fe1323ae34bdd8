"""scripts/fetch-driver against a local HTTP(S) server serving a stand-in .run
(NVIDIA's download site is not reachable here): the layout, the published and
the given checksum, resume after a cut, and one clear message per failure."""

from __future__ import annotations

import hashlib
import http.server
import ssl
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import REPO, need_tool

VERSION = "535.261.03"
NAME = "NVIDIA-Linux-x86_64-%s.run" % VERSION
PAYLOAD = b"#!/bin/sh\necho stand-in NVIDIA installer\n" + bytes(range(256)) * 4096  # ~1 MiB


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves files from ``server.files`` (path -> bytes), with Range; ``server.cut``
    stops a full response after that many bytes (a broken connection)."""

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        files = self.server.files  # type: ignore[attr-defined]
        self.server.requests.append((self.path, self.headers.get("Range")))  # type: ignore[attr-defined]
        body = files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        mode = getattr(self.server, "mode", "")
        if mode in ("endless", "drip"):  # a hostile or broken mirror: no end, or a byte now and then
            self.send_response(200)
            if mode == "drip":
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            try:
                for _ in range(100_000):  # bounded: the client stops long before
                    self.wfile.write(b"x" if mode == "drip" else bytes(1 << 16))
                    self.wfile.flush()
                    if mode == "drip":
                        self.server.dripped.wait(0.3)  # type: ignore[attr-defined]
            except OSError:
                pass
            return
        start = 0
        rng = self.headers.get("Range")
        if rng and rng.startswith("bytes="):
            start = int(rng[len("bytes=") :].split("-")[0])
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", "bytes */%d" % len(body))
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", "bytes %d-%d/%d" % (start, len(body) - 1, len(body)))
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        cut = self.server.cut  # type: ignore[attr-defined]
        data = body[start:]
        if cut and not rng:
            self.wfile.write(data[:cut])
            self.wfile.flush()
            self.connection.shutdown(2)
            return
        self.wfile.write(data)


@pytest.fixture(name="server")
def _server(tmp_path):
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.files = {
        "/tesla/%s/%s" % (VERSION, NAME): PAYLOAD,
        "/tesla/%s/%s.sha256sum" % (VERSION, NAME): ("%s  %s\n" % (hashlib.sha256(PAYLOAD).hexdigest(), NAME)).encode(),
    }
    srv.cut = 0
    srv.requests = []
    srv.mode = ""
    srv.dripped = threading.Event()  # never set: the drip's pause
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv
    srv.shutdown()


def _fetch(server, out: Path, *extra: str, scheme: str = "http"):
    base = "%s://127.0.0.1:%d/tesla" % (scheme, server.server_address[1])
    return subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts/fetch-driver"),
            VERSION,
            "--arch",
            "amd64",
            "--base-url",
            base,
            "-o",
            str(out),
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin"},
    )


def test_fetches_and_verifies_against_the_published_checksum(server, tmp_path):
    r = _fetch(server, tmp_path / "drivers")
    assert r.returncode == 0, r.stderr
    run = tmp_path / "drivers" / NAME
    assert r.stdout.strip() == str(run) and run.read_bytes() == PAYLOAD
    assert run.stat().st_mode & 0o111 and not list((tmp_path / "drivers").glob("*.part"))
    assert ("/tesla/%s/%s.sha256sum" % (VERSION, NAME), None) in server.requests


def test_a_cut_download_resumes_where_it_stopped(server, tmp_path):
    server.cut = 300_000
    r = _fetch(server, tmp_path)
    assert r.returncode == 1 and "run again to resume" in r.stderr
    kept = (tmp_path / (NAME + ".part")).stat().st_size
    assert 0 < kept <= 300_000 and not (tmp_path / NAME).exists()
    server.cut = 0
    r = _fetch(server, tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / NAME).read_bytes() == PAYLOAD
    assert ("/tesla/%s/%s" % (VERSION, NAME), "bytes=%d-" % kept) in server.requests


def test_missing_version_is_a_404_naming_version_and_arch(server, tmp_path):
    r = _fetch(server, tmp_path, "--sha256", "0" * 64, "--arch", "arm64")
    assert r.returncode == 1
    assert "driver 535.261.03 does not exist for aarch64 at" in r.stderr and "(404)" in r.stderr


def test_a_checksum_mismatch_removes_the_file(server, tmp_path):
    r = _fetch(server, tmp_path, "--sha256", "ab" * 32)
    assert r.returncode == 1
    assert "expected %s: the file was removed" % ("ab" * 32) in r.stderr
    assert not list(tmp_path.iterdir())


def test_no_published_checksum_asks_for_one(server, tmp_path):
    del server.files["/tesla/%s/%s.sha256sum" % (VERSION, NAME)]
    r = _fetch(server, tmp_path)
    assert r.returncode == 1 and "give the driver's sha256 with --sha256" in r.stderr
    assert not list(tmp_path.iterdir())


def test_tls_failure_is_named_and_a_ca_bundle_fixes_it(server, tmp_path):
    openssl = need_tool("openssl")
    key, cert = tmp_path / "k.pem", tmp_path / "c.pem"
    subprocess.run(
        [
            openssl,
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(cert), str(key))
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    r = _fetch(server, tmp_path / "a", scheme="https")
    assert r.returncode == 1 and "TLS verification failed for https://127.0.0.1" in r.stderr
    assert "--ca-bundle" in r.stderr
    r = _fetch(server, tmp_path / "b", "--ca-bundle", str(cert), scheme="https")
    assert r.returncode == 0, r.stderr


def test_bad_arguments_are_named():
    r = subprocess.run(
        [sys.executable, str(REPO / "scripts/fetch-driver"), "535.x", "--sha256", "zz"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 1 and "535.x" in r.stderr


# -- issue 20.5: a hostile or broken mirror is bounded ----------------------------------------------------------


def test_a_checksum_that_is_not_64_hex_digits_is_refused_before_any_download(server, tmp_path):
    r = _fetch(server, tmp_path, "--sha256", "z" * 64)
    assert r.returncode == 1 and "64 hexadecimal digits" in r.stderr
    assert server.requests == []
    server.files["/tesla/%s/%s.sha256sum" % (VERSION, NAME)] = ("%s  %s\n" % ("g" * 64, NAME)).encode()
    r = _fetch(server, tmp_path)
    assert r.returncode == 1 and 'does not hold a sha256 ("<64 hex digits>' in r.stderr
    assert [p for p, _ in server.requests] == ["/tesla/%s/%s.sha256sum" % (VERSION, NAME)]


def test_an_endless_body_stops_at_the_size_bound_and_leaves_nothing(server, tmp_path):
    server.mode = "endless"
    r = _fetch(server, tmp_path, "--sha256", "ab" * 32, "--max-size", str(4 << 20))
    assert r.returncode == 1 and "sent more than 4194304 bytes: stopped" in r.stderr, r.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_dripping_mirror_ends_at_the_deadline(server, tmp_path):
    server.mode = "drip"
    r = _fetch(server, tmp_path, "--sha256", "ab" * 32, "--deadline", "2")
    assert r.returncode == 1 and "did not finish within --deadline 2 s" in r.stderr, r.stderr


def test_a_planted_part_link_is_never_appended_through(server, tmp_path):
    outside = tmp_path / "outside"
    outside.write_bytes(b"host data\n")
    out = tmp_path / "drivers"
    out.mkdir()
    (out / (NAME + ".part")).symlink_to(outside)
    r = _fetch(server, out)
    assert r.returncode == 0, r.stderr
    assert outside.read_bytes() == b"host data\n" and (out / NAME).read_bytes() == PAYLOAD


def test_a_published_checksum_file_is_read_with_a_bound(server, tmp_path):
    server.files["/tesla/%s/%s.sha256sum" % (VERSION, NAME)] = b"a" * (1 << 20)
    r = _fetch(server, tmp_path)
    assert r.returncode == 1 and "is over 65536 bytes: not a checksum file" in r.stderr


def test_a_full_disk_is_a_named_error(server, tmp_path):
    """Issue 20: fetch-driver on a full disk printed a traceback."""
    from harness import run_with_small_disk

    out = tmp_path / "small"
    script = "%s %s %s --arch amd64 --base-url http://127.0.0.1:%d/tesla -o %s; echo rc=$?" % (
        sys.executable,
        REPO / "scripts/fetch-driver",
        VERSION,
        server.server_address[1],
        out,
    )
    r = run_with_small_disk(out, "256k", script, {"PATH": "/usr/bin:/bin"})
    assert "rc=1" in r.stdout, r.stdout + r.stderr
    assert "No space left on device (ENOSPC)" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
