"""A stand-in for Red Hat's CDN: an HTTPS repository on 127.0.0.1 that refuses any client without a
certificate signed by its CA, as the CDN refuses a client without an entitlement certificate.

- ``certificates(d)``: a test CA, a server certificate for 127.0.0.1, an entitlement (client) certificate
  and key signed by the CA, one that expired in 2020, and a self-signed one the server refuses (openssl,
  at test time);
- ``kernel_rpms(repo, kernel)``: RPMs built at test time with rpmbuild, carrying a real kernel build tree
  and module tree of this machine (Debian's, at their own paths) under the package names the dnf backend
  asks for (``kernel-devel-<k>``, ``kernel-core-<k>``, ``kernel-headers-<k>``), plus an empty
  ``elfutils-libelf-devel``; ``createrepo_c`` makes the metadata. Cached by kernel under .cache/;
- ``serve(repo, certs)``: the HTTPS server (client certificate required), as a context manager.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import os
import shutil
import ssl
import subprocess
import threading
from pathlib import Path
from typing import Dict, Iterator

from conftest import REPO
from harness import copy_kernel_trees

SPEC = """%%global debug_package %%{nil}
%%global __os_install_post %%{nil}
%%define _binary_payload w1.gzdio
%%define _build_id_links none
Name: %(name)s
Version: 1
Release: 1
Summary: driver-ctr test stand-in for a RHEL kernel package
License: GPL-2.0
BuildArch: x86_64
AutoReqProv: no
%%description
Stand-in.
%%install
mkdir -p %%{buildroot}
cp -a %(tree)s/. %%{buildroot}/
%%files
%(files)s
"""


def certificates(d: Path) -> Dict[str, Path]:
    d.mkdir(parents=True, exist_ok=True)

    def ossl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=str(d))

    ossl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=test CDN CA",
    )
    for name, subj in (("server", "/CN=127.0.0.1"), ("entitlement", "/CN=1234567890")):
        ossl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", name + "-key.pem", "-out", name + ".csr", "-subj", subj)
        ext = d / (name + ".ext")
        ext.write_text("subjectAltName=IP:127.0.0.1\n" if name == "server" else "extendedKeyUsage=clientAuth\n")
        ossl(
            "x509",
            "-req",
            "-in",
            name + ".csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            name + ".pem",
            "-days",
            "2",
            "-extfile",
            ext.name,
        )
    ossl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "wrong-key.pem",
        "-out",
        "wrong.pem",
        "-days",
        "2",
        "-subj",
        "/CN=not entitled",
    )
    # an entitlement the CA signed, expired in 2020 (openssl ca: the only way to set a past end date here)
    ossl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "expired-key.pem", "-out", "expired.csr", "-subj", "/CN=o")
    (d / "index.txt").write_text("")
    (d / "serial").write_text("01\n")
    (d / "ca.cnf").write_text(
        "[ca]\ndefault_ca = d\n[d]\ndatabase = index.txt\nnew_certs_dir = .\nserial = serial\n"
        "default_md = sha256\npolicy = p\n[p]\ncommonName = supplied\n"
    )
    ossl(
        "ca",
        "-batch",
        "-config",
        "ca.cnf",
        "-cert",
        "ca.pem",
        "-keyfile",
        "ca.key",
        "-in",
        "expired.csr",
        "-out",
        "expired.pem",
        "-startdate",
        "20200101000000Z",
        "-enddate",
        "20200102000000Z",
        "-notext",
    )
    return {
        n: d / n
        for n in (
            "expired.pem",
            "expired-key.pem",
            "ca.pem",
            "server.pem",
            "server-key.pem",
            "entitlement.pem",
            "entitlement-key.pem",
            "wrong.pem",
            "wrong-key.pem",
        )
    }


def _rpm(topdir: Path, name: str, tree: Path) -> Path:
    files = sorted("/" + p.relative_to(tree).as_posix() for p in tree.rglob("*") if not p.is_dir() or p.is_symlink())
    topdir.mkdir(parents=True, exist_ok=True)
    spec = topdir / (name + ".spec")
    spec.write_text(SPEC % {"name": name, "tree": tree, "files": "\n".join('"%s"' % f for f in files) or ""})
    subprocess.run(["rpmbuild", "-bb", "--define", "_topdir %s" % topdir, str(spec)], check=True, capture_output=True)
    return next((topdir / "RPMS/x86_64").glob(name + "-1-1.x86_64.rpm"))


def kernel_rpms(kernel: str) -> Path:
    """A repository (directory with repodata) holding the kernel's packages; cached under .cache/."""
    repo = REPO / ".cache" / "entitled-repo" / kernel
    if (repo / "repodata/repomd.xml").is_file():
        return repo
    shutil.rmtree(str(repo), ignore_errors=True)
    work = repo.parent / (".work-" + kernel)
    shutil.rmtree(str(work), ignore_errors=True)
    devel, core, empty = work / "devel", work / "core", work / "empty"
    copy_kernel_trees(kernel, devel, core / "lib/modules" / kernel)  # Debian's trees, at their own paths
    (empty / "usr/share/doc/stand-in").mkdir(parents=True)
    (empty / "usr/share/doc/stand-in/README").write_text("stand-in\n")
    out = work / "out"
    out.mkdir()
    for name, tree in (
        ("kernel-devel-" + kernel, devel),
        ("kernel-core-" + kernel, core),
        ("kernel-headers-" + kernel, empty),
        ("elfutils-libelf-devel", empty),
    ):
        shutil.copy2(str(_rpm(work / "rpmbuild", name, tree)), str(out))
    subprocess.run(["createrepo_c", "-q", str(out)], check=True)
    repo.parent.mkdir(parents=True, exist_ok=True)
    os.replace(str(out), str(repo))
    shutil.rmtree(str(work), ignore_errors=True)
    return repo


@contextlib.contextmanager
def serve(repo: Path, certs: Dict[str, Path]) -> Iterator[str]:
    """The repository over HTTPS on 127.0.0.1, refusing clients without a certificate of the CA."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(repo)))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(certs["server.pem"]), str(certs["server-key.pem"]))
    ctx.load_verify_locations(str(certs["ca.pem"]))
    ctx.verify_mode = ssl.CERT_REQUIRED
    srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield "https://127.0.0.1:%d/" % srv.server_address[1]
    finally:
        srv.shutdown()
        srv.server_close()
