"""Signing built modules with the kernel tree's ``scripts/sign-file``.

The key and certificate are read where they are mounted (a Secret volume);
the key is never copied, and only its path appears in logs. The cache key
uses the certificate's fingerprint (public), so modules signed with another
key are never reused.
"""

from __future__ import annotations

import base64
import hashlib
import re
from pathlib import Path
from typing import Optional, Sequence

from .errors import BuildFailed, CommandFailed
from .modinfo import has_signature
from .runner import Runner

_PEM = re.compile(rb"-----BEGIN CERTIFICATE-----(.+?)-----END CERTIFICATE-----", re.S)


def certificate_fingerprint(cert: Path) -> str:
    """sha256 of the certificate's DER bytes (PEM or DER file)."""
    try:
        raw = cert.read_bytes()
    except OSError as exc:
        raise BuildFailed("sign", "cannot read the signing certificate %s: %s" % (cert, exc.strerror)) from None
    m = _PEM.search(raw)
    der = base64.b64decode(b"".join(m.group(1).split())) if m else raw
    return hashlib.sha256(der).hexdigest()


def signing_fingerprint(settings: object) -> str:
    """The fingerprint that keys cached builds: '' when signing is off."""
    cert = getattr(settings, "signing_cert", "")
    return certificate_fingerprint(Path(cert)) if cert else ""


def sign_modules(modules: Sequence[Path], sign_file: Optional[Path], hash_algo: str, key: Path, cert: Path,
                 runner: Runner, log_file: object = None) -> None:
    """Sign each module in place, then check each carries the signature trailer."""
    if sign_file is None:
        raise BuildFailed("sign", "signing was asked for but the kernel build tree has no executable scripts/sign-file")
    for p in (key, cert):
        if not p.is_file():
            raise BuildFailed("sign", "signing file %s does not exist or is not a regular file" % p)
    for m in modules:
        try:
            runner.run([str(sign_file), hash_algo, str(key), str(cert), str(m)], timeout=120,
                       stdout_file=log_file)  # type: ignore[arg-type]
        except CommandFailed as exc:
            raise BuildFailed("sign", "sign-file failed for %s: %s" % (m.name, str(exc).splitlines()[0])) from None
        if not has_signature(m):
            raise BuildFailed("sign", "%s carries no signature after sign-file" % m.name)
