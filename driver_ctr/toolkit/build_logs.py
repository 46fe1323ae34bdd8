"""Build logs that survive the pod: each build's log is also kept on the node, under ``/var/log/driver-ctr``.

The shared directory is an emptyDir (gone with the pod) and a local build's log lives in a temporary
directory: after a CrashLoopBackOff or a pod deletion, the compiler's words were lost. Each finished
build (success or failure; the DTK side's, a local or fallback build's) is copied to
``/var/log/driver-ctr/build-<kernel>-<generation>-<UTC time>.log`` (``local`` for a build without a
generation; a retry of a generation keeps its own), written atomically; the newest :data:`KEEP` are
kept. ``status`` names the last one.
Both containers mount the node's ``/var/log`` in the operator's DaemonSet.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import List, Optional, Union

from .fsio import atomic_write_bytes
from .paths import HostPaths

LOG_DIR = "/var/log/driver-ctr"
KEEP = 10
LIMIT = 8 << 20  # the tail of a build log kept on the node


def log_dir(paths: HostPaths) -> Path:
    return paths.host(LOG_DIR)


def keep_build_log(paths: HostPaths, log: Path, kernel: str, generation: Union[int, str, None]) -> Optional[Path]:
    """Copy ``log`` to the node's log directory; returns the copy, or None when it cannot be written
    (no ``/var/log`` mounted, read-only): keeping a log never fails a build."""
    now = time.time()
    when = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + ".%03dZ" % (int(now * 1000) % 1000)
    tag = "%s-%s" % (generation if generation is not None else "local", when)
    dest = log_dir(paths) / ("build-%s-%s.log" % (kernel, tag))
    try:
        with open(str(log), "rb") as f:
            size = os.fstat(f.fileno()).st_size
            f.seek(max(0, size - LIMIT))
            data = f.read()
        dest.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(dest, data)
        for old in build_logs(paths)[KEEP:]:
            old.unlink()
    except OSError:
        return None
    return dest


def build_logs(paths: HostPaths) -> List[Path]:
    """The kept build logs, newest first."""
    d = log_dir(paths)
    try:
        logs = [p for p in d.glob("build-*.log") if p.is_file() and not p.is_symlink()]
    except OSError:
        return []
    return sorted(logs, key=lambda p: p.stat().st_mtime_ns, reverse=True)
