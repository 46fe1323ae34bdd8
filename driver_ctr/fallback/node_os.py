"""The node's OS, from the os-release the DaemonSet mounts at /host-etc/os-release."""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Tuple

from ..toolkit.errors import ProtocolError
from ..toolkit.inputs import read_input_text


@dataclass(frozen=True)
class NodeOS:
    id: str
    version_id: str = ""
    id_like: Tuple[str, ...] = ()


def parse_os_release(text: str) -> Dict[str, str]:
    out: Dict[str, str] = {}
    for line in text.splitlines():
        key, eq, value = line.strip().partition("=")
        if eq and key and not key.startswith("#"):
            try:
                words = shlex.split(value)
            except ValueError:
                continue
            out[key] = words[0] if words else ""
    return out


def read_node_os(path: Path) -> NodeOS:
    """The node's OS; a missing or unreadable file is a ProtocolError naming it."""
    if not (path.exists() or path.is_symlink()):
        raise ProtocolError(path, "the node's os-release is not mounted (the DaemonSet mounts /etc/os-release there)")
    fields = parse_os_release(read_input_text(path, "os-release"))
    return NodeOS(
        id=fields.get("ID", "").lower(),
        version_id=fields.get("VERSION_ID", ""),
        id_like=tuple(fields.get("ID_LIKE", "").lower().split()),
    )
