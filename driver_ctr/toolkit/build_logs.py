"""Build logs that survive the pod: each build's log is also kept on the node, under ``/var/log/driver-ctr``.

The shared directory is an emptyDir (gone with the pod) and a local build's log lives in a temporary
directory: after a CrashLoopBackOff or a pod deletion, the compiler's words were lost. Each finished
build (success or failure; the DTK side's, a local or fallback build's) is copied to
``/var/log/driver-ctr/build-<kernel>-<generation>-<UTC time>.log`` (``local`` for a build without a
generation; a retry of a generation keeps its own), written atomically; the newest :data:`KEEP` are
kept. ``status`` names the last one.
Both containers mount the node's ``/var/log`` in the operator's DaemonSet. The directory is a node path
that another pod could plant: it is never followed through a link (a symlink there means no log is kept),
and rotation removes only files of this module's own name pattern, through the directory's descriptor.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import List, Optional, Union

from .errors import ProtocolError
from .inputs import read_tail
from .paths import HostPaths
from .shared_fs import Confined

LOG_DIR = "/var/log/driver-ctr"
KEEP = 10
LIMIT = 8 << 20  # the tail of a build log kept on the node
_OURS = re.compile(r"^build-[A-Za-z0-9._+~-]+-(\d+|local)-\d{8}T\d{6}\.\d{3}Z\.log$")


def log_dir(paths: HostPaths) -> Path:
    return paths.host(LOG_DIR)


def keep_build_log(paths: HostPaths, log: Path, kernel: str, generation: Union[int, str, None]) -> Optional[Path]:
    """Copy the tail of ``log`` to the node's log directory; returns the copy, or None when it cannot be
    written (no ``/var/log`` mounted, read-only, a link where the directory belongs): keeping a log never
    fails a build."""
    now = time.time()
    when = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + ".%03dZ" % (int(now * 1000) % 1000)
    tag = "%s-%s" % (generation if generation is not None else "local", when)
    name = "build-%s-%s.log" % (kernel, tag)
    d = log_dir(paths)
    try:
        d.parent.mkdir(parents=True, exist_ok=True)
        if not d.is_symlink():
            d.mkdir(exist_ok=True)
        fs = Confined(d)
        fs.write_atomic(name, read_tail(log, "build log", LIMIT))
        for old in _ours(fs)[KEEP:]:
            fs.remove(old)
    except (OSError, ProtocolError):
        return None
    return d / name


def _ours(fs: Confined) -> List[str]:
    """This module's logs in the directory, newest first (regular files of its own name pattern only)."""
    found = []
    for n in fs.listdir():
        st = fs.stat(n) if _OURS.match(n) else None
        if st is not None and st.st_mode & 0o170000 == 0o100000:
            found.append((st.st_mtime_ns, n))
    return [n for _, n in sorted(found, reverse=True)]


def build_logs(paths: HostPaths) -> List[Path]:
    """The kept build logs, newest first; none when the directory is absent or not a real directory."""
    d = log_dir(paths)
    try:
        return [d / n for n in _ours(Confined(d))]
    except (OSError, ProtocolError):
        return []
