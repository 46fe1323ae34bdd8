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
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Optional, Sequence

from .errors import BuildFailed, CommandFailed
from .inputs import UnreadableInput, read_input
from .modinfo import has_signature
from .runner import Runner

if TYPE_CHECKING:
    from .settings import Settings

_PEM = re.compile(rb"-----BEGIN CERTIFICATE-----(.+?)-----END CERTIFICATE-----", re.S)


def certificate_fingerprint(cert: Path) -> str:
    """sha256 of the certificate's DER bytes (PEM or DER file)."""
    try:
        raw = read_input(cert, "certificate")
    except UnreadableInput as exc:
        raise BuildFailed("sign", "the signing certificate: %s" % exc) from None
    m = _PEM.search(raw)
    der = base64.b64decode(b"".join(m.group(1).split())) if m else raw
    return hashlib.sha256(der).hexdigest()


@dataclass(frozen=True)
class Signing:
    """The key and certificate to sign with (paths where they are mounted) and the hash."""

    key: Path
    cert: Path
    hash_algo: str = "sha256"

    @classmethod
    def from_settings(cls, settings: "Settings") -> Optional["Signing"]:
        if not settings.signing_key:
            return None
        return cls(Path(settings.signing_key), Path(settings.signing_cert), settings.signing_hash)

    def fingerprint(self) -> str:
        return certificate_fingerprint(self.cert)


def signing_fingerprint(signing: Optional[Signing]) -> str:
    """The fingerprint that keys cached builds: '' when signing is off."""
    return signing.fingerprint() if signing is not None else ""


def sign_modules(
    modules: Sequence[Path],
    sign_file: Optional[Path],
    signing: Signing,
    runner: Runner,
    log_file: Optional[IO[bytes]] = None,
) -> None:
    """Sign each module in place, then check each carries the signature trailer."""
    if sign_file is None:
        raise BuildFailed("sign", "signing was asked for but the kernel build tree has no executable scripts/sign-file")
    for p in (signing.key, signing.cert):
        if not p.is_file():
            raise BuildFailed("sign", "signing file %s does not exist or is not a regular file" % p)
    for m in modules:
        try:
            runner.run(
                [str(sign_file), signing.hash_algo, str(signing.key), str(signing.cert), str(m)],
                timeout=120,
                stdout_file=log_file,
            )
        except CommandFailed as exc:
            raise BuildFailed("sign", "sign-file failed for %s: %s" % (m.name, exc.summary), exc.tail) from None
        if not has_signature(m):
            raise BuildFailed("sign", "%s carries no signature after sign-file" % m.name)
