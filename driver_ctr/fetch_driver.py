"""``scripts/fetch-driver``: the NVIDIA driver ``.run`` for a version and arch, for image builds.

``<base>/<version>/NVIDIA-Linux-<arch>-<version>.run``, with ``<base>`` NVIDIA's
download site by default (``https://us.download.nvidia.com/tesla``, as NVIDIA's
own Dockerfiles) or a mirror for air-gapped builds. The file is:

- verified against a sha256 given with ``--sha256``, else the published
  ``<file>.sha256sum`` next to it (``<hex>  <name>``); a mismatch removes it;
- resumed after an interruption (``<name>.part`` is continued with a Range request);
- fetched through the proxy the environment names (``HTTPS_PROXY``, ``NO_PROXY``;
  requests reads them) and against ``--ca-bundle`` when given;
- published by rename only once verified, executable; progress shows on a terminal;
- bounded: at most the published size (``Content-Length``), else ``--max-size``, and the whole fetch within
  ``--deadline`` seconds (a mirror dripping a byte every few seconds never resets it); the checksum is 64
  hexadecimal digits before any download; ``<name>.part`` is never opened through a link.

Every failure is one message: 404 (the version does not exist for this arch at
that base), TLS, connection, checksum mismatch.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import socket
import stat
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Optional, Sequence

import requests

from .toolkit.errors import DriverCtrError, FileSystemError, InvalidValue
from .toolkit.redact import redact_url_credentials
from .toolkit.sources import run_file_name
from .toolkit.versions import normalize_arch, parse_driver_version

DEFAULT_BASE_URL = "https://us.download.nvidia.com/tesla"
CHUNK = 64 << 10  # small enough that a cut loses little of what arrived
TIMEOUT_S = (15.0, 60.0)  # connect, read (between bytes)
MAX_BYTES = 2 << 30  # a driver .run is ~0.4 GiB; the bound when the server publishes no size
DEADLINE_S = 3600.0
CHECKSUM_LIMIT = 64 << 10
_HEX = re.compile(r"^[0-9a-fA-F]{64}$")


class FetchFailed(DriverCtrError):
    """The driver could not be fetched; the message says why and what to check."""


@dataclass(frozen=True)
class Request:
    version: str
    arch: str  # x86_64 or aarch64
    base_url: str = DEFAULT_BASE_URL
    sha256: str = ""
    dest_dir: Path = Path(".")
    ca_bundle: Optional[str] = None
    max_bytes: int = MAX_BYTES
    deadline_s: float = DEADLINE_S

    @property
    def name(self) -> str:
        return run_file_name(self.arch, self.version)

    @property
    def url(self) -> str:
        return "%s/%s/%s" % (self.base_url.rstrip("/"), self.version, self.name)


def _get(session: requests.Session, req: Request, url: str, **kw: object) -> requests.Response:
    try:
        return session.get(url, timeout=TIMEOUT_S, verify=req.ca_bundle or True, **kw)  # type: ignore[arg-type]
    except requests.exceptions.SSLError as exc:
        raise FetchFailed(
            "TLS verification failed for %s: %s (a mirror with its own CA: --ca-bundle)"
            % (redact_url_credentials(url), _reason(exc))
        ) from None
    except requests.exceptions.ProxyError as exc:
        raise FetchFailed("the proxy refused %s: %s" % (redact_url_credentials(url), _reason(exc))) from None
    except requests.exceptions.RequestException as exc:
        raise FetchFailed("cannot reach %s: %s" % (redact_url_credentials(url), _reason(exc))) from None


def _reason(exc: BaseException) -> str:
    return redact_url_credentials(str(exc).splitlines()[0])[:300]


def published_sha256(session: requests.Session, req: Request) -> str:
    url = req.url + ".sha256sum"
    r = _get(session, req, url, stream=True)
    with r:
        if r.status_code == 404:
            raise FetchFailed(
                "no checksum to verify against: %s is not published; give the driver's sha256 with "
                "--sha256" % redact_url_credentials(url)
            )
        if r.status_code != 200:
            raise FetchFailed("%s answered %d" % (redact_url_credentials(url), r.status_code))
        body = b""
        for chunk in r.iter_content(4096):
            body += chunk
            if len(body) > CHECKSUM_LIMIT:
                raise FetchFailed(
                    "%s is over %d bytes: not a checksum file" % (redact_url_credentials(url), CHECKSUM_LIMIT)
                )
    words = body.decode("utf-8", "replace").split()
    if not words or not _HEX.match(words[0]):
        raise FetchFailed('%s does not hold a sha256 ("<64 hex digits>  <name>")' % redact_url_credentials(url))
    return words[0].lower()


def _progress(out: Optional[IO[str]], done: int, total: Optional[int], started: float) -> None:
    if out is None:
        return
    rate = done / max(time.monotonic() - started, 1e-3) / (1 << 20)
    if total:
        out.write("\r%s: %5.1f%% of %d MiB, %.1f MiB/s " % ("fetch", 100.0 * done / total, total >> 20, rate))
    else:
        out.write("\r%s: %d MiB, %.1f MiB/s " % ("fetch", done >> 20, rate))
    out.flush()


def fetch(req: Request, session: Optional[requests.Session] = None, progress: Optional[IO[str]] = None) -> Path:
    """Download, verify and publish the ``.run``; returns its path."""
    if req.sha256 and not _HEX.match(req.sha256):
        raise InvalidValue("--sha256", req.sha256, "64 hexadecimal digits")
    deadline = time.monotonic() + req.deadline_s
    session = session or requests.Session()
    want = req.sha256.lower() or published_sha256(session, req)
    req.dest_dir.mkdir(parents=True, exist_ok=True)
    final = req.dest_dir / req.name
    part = req.dest_dir / (req.name + ".part")
    have = _part_size(part)
    headers = {"Range": "bytes=%d-" % have} if have else {}
    r = _get(session, req, req.url, headers=headers, stream=True)
    watchdog = _Watchdog(r, max(0.0, deadline - time.monotonic()))
    with r, watchdog:
        if r.status_code == 404:
            raise FetchFailed(
                "driver %s does not exist for %s at %s (404): check the version and the arch"
                % (req.version, req.arch, redact_url_credentials(req.url))
            )
        if r.status_code in (206, 416) and have:  # continued, or the part is already whole
            append = True
        elif r.status_code == 200:
            have, append = 0, False  # no resume from this server: start again
        else:
            raise FetchFailed("%s answered %d %s" % (redact_url_credentials(req.url), r.status_code, r.reason))
        total = None
        if r.status_code != 416 and r.headers.get("Content-Length", "").isdigit():
            total = have + int(r.headers["Content-Length"])
        bound = total if total is not None else req.max_bytes
        if bound > req.max_bytes:
            raise FetchFailed("%s is %d bytes, over --max-size %d" % (req.name, bound, req.max_bytes))
        started = time.monotonic()
        done = have
        try:
            with _open_part(part, append) as f:
                if r.status_code != 416:
                    for chunk in r.iter_content(CHUNK):
                        done += len(chunk)
                        if done > bound:
                            raise FetchFailed(
                                "%s sent more than %s bytes: stopped"
                                % (redact_url_credentials(req.url), "its published %d" % bound if total else bound)
                            )
                        f.write(chunk)
                        _progress(progress, done, total, started)
                        watchdog.check(req)
        except requests.exceptions.RequestException as exc:
            watchdog.check(req)
            raise FetchFailed(
                "the download of %s broke off after %d bytes (%s); run again to resume" % (req.name, done, _reason(exc))
            ) from None
        except FetchFailed:
            if done > bound:
                part.unlink()
            raise
    if progress is not None:
        progress.write("\n")
    if total is not None and done != total:
        raise FetchFailed(
            "the download of %s ended after %d of %d bytes; run again to resume" % (req.name, done, total)
        )
    got = _sha256(part)
    if got != want:
        part.unlink()
        raise FetchFailed("sha256 of %s is %s, expected %s: the file was removed" % (req.name, got, want))
    part.chmod(0o755)
    os.replace(str(part), str(final))
    return final


class _Watchdog:
    """Ends the fetch at its deadline: a read blocked on a mirror that drips a byte now and then (each byte
    resets the read timeout) is cut by shutting the connection's socket down."""

    def __init__(self, r: requests.Response, seconds: float) -> None:
        self.r = r
        self.seconds = seconds
        self.expired = threading.Event()
        self.timer = threading.Timer(seconds, self._fire)
        self.timer.daemon = True

    def __enter__(self) -> "_Watchdog":
        self.timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.timer.cancel()

    def _fire(self) -> None:
        self.expired.set()
        try:
            _socket_of(self.r).shutdown(socket.SHUT_RDWR)
        except (OSError, AttributeError):
            pass

    def check(self, req: Request) -> None:
        if self.expired.is_set():
            raise FetchFailed(
                "the download of %s did not finish within --deadline %.0f s; run again to resume"
                % (req.name, req.deadline_s)
            )


def _socket_of(r: requests.Response) -> socket.socket:
    """The socket a streamed response is read from: the connection's, or (urllib3 2 hands it to the response)
    the one under the response's buffered reader."""
    sock = getattr(getattr(r.raw, "connection", None), "sock", None)
    if sock is None:
        sock = r.raw._fp.fp.raw._sock
    return sock  # type: ignore[no-any-return]


def _part_size(part: Path) -> int:
    """The size of an earlier ``.part`` to resume; a link or anything else there is removed as itself."""
    try:
        st = os.lstat(str(part))
    except FileNotFoundError:
        return 0
    if stat.S_ISREG(st.st_mode):
        return st.st_size
    part.unlink()
    return 0


def _open_part(part: Path, append: bool) -> IO[bytes]:
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | (os.O_APPEND if append else os.O_TRUNC)
    return os.fdopen(os.open(str(part), flags, 0o644), "ab" if append else "wb")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with os.fdopen(os.open(str(path), os.O_RDONLY | os.O_NOFOLLOW), "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="fetch-driver", description=__doc__.split("\n\n")[0])
    p.add_argument("version", help="driver version, e.g. 535.261.03")
    p.add_argument("--arch", default=os.uname().machine, help="x86_64/amd64 or aarch64/arm64 (default: this machine)")
    p.add_argument(
        "--base-url",
        default=os.environ.get("DRIVER_BASE_URL", DEFAULT_BASE_URL),
        help="where <version>/NVIDIA-Linux-<arch>-<version>.run lives (default %(default)s)",
    )
    p.add_argument("--sha256", default="", help="the expected sha256 (default: the published <file>.sha256sum)")
    p.add_argument("-o", "--output-dir", default=".", help="where to put the .run (default: .)")
    p.add_argument("--ca-bundle", default=None, help="CA bundle for a mirror with its own certificate authority")
    p.add_argument(
        "--max-size",
        type=int,
        default=MAX_BYTES,
        metavar="BYTES",
        help="the most a server that publishes no size may send (default %(default)s)",
    )
    p.add_argument(
        "--deadline", type=float, default=DEADLINE_S, metavar="SECONDS", help="the whole fetch's (default %(default)s)"
    )
    a = p.parse_args(argv)
    try:
        version = parse_driver_version(a.version).raw
        arch = normalize_arch(a.arch)
        path = fetch(
            Request(version, arch, a.base_url, a.sha256, Path(a.output_dir), a.ca_bundle, a.max_size, a.deadline),
            progress=sys.stderr if sys.stderr.isatty() else None,
        )
    except DriverCtrError as exc:
        sys.stderr.write("fetch-driver: %s\n" % exc)
        return 1
    except OSError as exc:  # a full disk, a read-only output directory: named, never a traceback
        sys.stderr.write("fetch-driver: %s\n" % FileSystemError(exc, "writing the driver"))
        return 1
    sys.stdout.write("%s\n" % path)
    return 0
