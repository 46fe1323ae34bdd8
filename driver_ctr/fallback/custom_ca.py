"""The cluster's custom CAs (the operator's ``certConfig`` ConfigMap), installed before any download.

The operator mounts the ConfigMap's certificates where the image's trust store takes them: on Debian and
Ubuntu ``/usr/local/share/ca-certificates`` (``update-ca-certificates``), on RHEL
``/etc/pki/ca-trust/source/anchors`` (``update-ca-trust extract``). A TLS-inspecting proxy's CA then
reaches apt, dnf and curl, as NVIDIA's script does it. A mount that holds no certificate, or an image
without the tool, changes nothing; a failed update is a warning (the download names its own failure).
Under ``DRIVER_CTR_ROOT`` the tool runs chrooted there, as every command against a temporary root.
"""

from __future__ import annotations

from typing import List, Tuple

from ..toolkit.errors import CommandFailed
from ..toolkit.log import Logger
from ..toolkit.paths import HostPaths
from ..toolkit.runner import Runner

# (the directory the operator mounts, the files the tool takes there, the tool's argv)
TRUST_STORES: Tuple[Tuple[str, Tuple[str, ...], Tuple[str, ...]], ...] = (
    ("/usr/local/share/ca-certificates", (".crt",), ("update-ca-certificates",)),
    ("/etc/pki/ca-trust/source/anchors", (".crt", ".pem", ".cer"), ("update-ca-trust", "extract")),
)


def install_custom_cas(paths: HostPaths, runner: Runner, log: Logger) -> List[str]:
    """Run each trust store's tool whose directory holds certificates; returns the directories taken."""
    taken = []
    for directory, suffixes, argv in TRUST_STORES:
        d = paths.host(directory)
        if not d.is_dir() or not any(p.name.endswith(suffixes) for p in d.iterdir()):
            continue
        root = str(paths.host("/"))
        command = list(argv) if root == "/" else ["chroot", root, *argv]
        try:
            runner.run(command, timeout=120)
        except CommandFailed as exc:
            log.warning("the custom CAs could not be installed", directory=str(d), reason=exc.summary)
            continue
        log.info("custom CAs installed", directory=str(d), tool=argv[0])
        taken.append(directory)
    return taken
