"""Crash-safe file operations: every write is temp file, fsync, rename, fsync dir.

A crash at any instant leaves either the old complete file or the new one.
Reads of protocol files refuse what is not a regular file.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from .errors import ProtocolError


def fsync_dir(path: Path) -> None:
    fd = os.open(str(path), os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes, mode: int = 0o644) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_dir() and not path.is_symlink():
        raise ProtocolError(path, "is a directory where a file is expected")
    fd, tmp = tempfile.mkstemp(prefix="." + path.name + ".", suffix=".tmp", dir=str(path.parent))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, str(path))
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(exc, OSError) and exc.filename is None:  # a write's error names no file: this one
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise
    fsync_dir(path.parent)


def replace_symlink(link: Path, target: Path) -> None:
    """Make ``link`` a symlink to ``target`` atomically (a temporary link renamed over it)."""
    link.parent.mkdir(parents=True, exist_ok=True)
    tmp = link.with_name(".%s.tmp-link" % link.name)
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(target)
    os.replace(str(tmp), str(link))


def atomic_write_text(path: Path, text: str, mode: int = 0o644) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), mode)


def atomic_write_json(path: Path, data: Any, mode: int = 0o644) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n", mode)


def regular_file_exists(path: Path) -> bool:
    """True for a regular file; False when absent; ProtocolError for anything else
    (a directory, a device, a dangling or any symlink) where a flag file belongs."""
    try:
        st = os.lstat(str(path))
    except FileNotFoundError:
        return False
    import stat as _stat

    if _stat.S_ISREG(st.st_mode):
        return True
    kind = (
        "a directory"
        if _stat.S_ISDIR(st.st_mode)
        else "a symlink"
        if _stat.S_ISLNK(st.st_mode)
        else "not a regular file"
    )
    raise ProtocolError(path, "is %s where a regular file is expected" % kind)


def read_json(path: Path, what: str) -> Any:
    """Read a JSON protocol file; every problem is a ProtocolError naming it."""
    if not regular_file_exists(path):
        raise ProtocolError(path, "%s is missing" % what)
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ProtocolError(path, "%s is not UTF-8 text: %s" % (what, exc)) from None
    except ValueError as exc:
        raise ProtocolError(path, "%s is not valid JSON: %s" % (what, exc)) from None


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(str(path), "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def remove_tree(path: Path) -> None:
    """Remove a file or tree if present (no error when absent)."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(str(path))
