"""Every file the product reads but does not own: the one way to read an input from outside.

MOFED's tree, entitlement certificates and keys, repository files, os-release, the operator's parameter and
vGPU files, bundle and cache records, build logs, checksums: each is whatever the node, an image or a
ConfigMap put there. A read here

- opens the file non-blocking: a FIFO, a device or a socket is a named error, never a hang (and
  ``/dev/zero`` behind a link never fills the memory);
- follows a symlink to its target (Kubernetes mounts ConfigMaps and Secrets through links) but accepts
  only a regular file there;
- is bounded by the kind of input (:data:`LIMITS`): a larger file is a named error before it is read;
- reads in chunks and checks the cancellation between them, so a SIGTERM ends a large read promptly.

A caller that must not follow a link (a store, a tree the product writes) opens through
:mod:`shared_fs`'s descriptors instead.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Dict, Optional, Protocol

from .errors import ProtocolError

KIB = 1 << 10
MIB = 1 << 20

# The bound of each kind of input: far above any real one, far below what would hurt a 300 MiB container.
LIMITS: Dict[str, int] = {
    "os-release": 64 * KIB,
    "parameter file": 64 * KIB,
    "checksum file": 64 * KIB,
    "record": 1 * MIB,  # a bundle's or cache entry's entry.json, a DTK release file, the protocol's JSON files
    "certificate": 1 * MIB,  # an entitlement certificate or key, a signing certificate
    "repository file": 1 * MIB,
    "vGPU file": 1 * MIB,  # gridd.conf, a client configuration token
    "kernel tree file": 128 * MIB,  # .config, Module.symvers, modules.dep, modules.builtin (a few MiB each)
    "kernel image": 256 * MIB,  # a vmlinuz (~10 MiB)
}
CHUNK = 1 * MIB


class _Cancel(Protocol):
    def check(self) -> None: ...


class UnreadableInput(ProtocolError):
    """An input from outside is not a regular file within its bound (a FIFO, a device, a directory, a file
    over the size bound of its kind), or cannot be opened. A :class:`ProtocolError`, so every reader that
    treats a hostile shared-dir file treats a hostile input alike; ``path`` names it."""


def _open(path: Path, what: str) -> int:
    try:
        return os.open(str(path), os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise UnreadableInput(path, "%s is missing" % what) from None
    except OSError as exc:
        raise UnreadableInput(path, "%s cannot be opened: %s" % (what, exc.strerror or exc)) from None


def describe_mode(mode: int) -> str:
    for test, name in (
        (stat.S_ISLNK, "a symlink"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISREG, "a regular file"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "a special file"


def _checked(fd: int, path: Path, what: str, limit: int) -> os.stat_result:
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise UnreadableInput(path, "%s is %s, not a regular file" % (what, describe_mode(st.st_mode)))
    if st.st_size > limit:
        os.close(fd)
        raise UnreadableInput(path, "%s is %d bytes, over the bound of %d for a %s" % (what, st.st_size, limit, what))
    return st


def read_input(path: Path, what: str, limit: Optional[int] = None, cancel: Optional[_Cancel] = None) -> bytes:
    """The bytes of the regular file ``path`` (an input of kind ``what``), at most ``limit`` bytes (default:
    the bound of that kind in :data:`LIMITS`)."""
    bound = limit if limit is not None else LIMITS[what]
    fd = _open(path, what)
    _checked(fd, path, what, bound)
    chunks = []
    size = 0
    with os.fdopen(fd, "rb") as f:
        while True:
            if cancel is not None:
                cancel.check()
            chunk = f.read(min(CHUNK, bound + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
            if size > bound:
                raise UnreadableInput(path, "%s grew over the bound of %d bytes while read" % (what, bound))
    return b"".join(chunks)


def read_input_text(path: Path, what: str, limit: Optional[int] = None, cancel: Optional[_Cancel] = None) -> str:
    """:func:`read_input` decoded as UTF-8, undecodable bytes replaced."""
    return read_input(path, what, limit, cancel).decode("utf-8", "replace")


def read_tail(path: Path, what: str, nbytes: int = 64 * KIB) -> bytes:
    """The last ``nbytes`` of the regular file ``path`` (a build log of any size), never more."""
    fd = _open(path, what)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise UnreadableInput(path, "%s is %s, not a regular file" % (what, describe_mode(st.st_mode)))
    with os.fdopen(fd, "rb") as f:
        if st.st_size > nbytes:
            f.seek(st.st_size - nbytes)
        return f.read(nbytes)
