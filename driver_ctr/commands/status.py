"""``nvidia-driver status [--json]``: what a cluster admin asks first, read-only.

Settings (redacted), the node kernel and how it parses, the loaded driver, the
fast-path facts, the flags present in the shared directory and the last build
log kept on the node (``/var/log/driver-ctr``).
"""

from __future__ import annotations

import json
import sys
from typing import Any, Dict, List

from .. import __version__, precompiled
from ..node.fast_path import decide_fast_path
from ..toolkit import protocol as proto
from ..toolkit.build_logs import build_logs
from ..toolkit.errors import InvalidValue, printable
from ..toolkit.settings import Settings
from ..toolkit.versions import parse_kernel_release
from .options import StatusOptions


def collect(settings: Settings) -> Dict[str, Any]:
    paths = settings.paths
    release = settings.running_kernel()
    kernel: Dict[str, Any] = {"release": release}
    try:
        kr = parse_kernel_release(release)
        kernel.update(
            distro=kr.distro,
            version=kr.version,
            release_part=kr.release,
            arch=kr.arch,
            flavour=kr.flavour,
            rhel_version=kr.rhel_version,
        )
    except InvalidValue as exc:
        kernel["parse_error"] = exc.expected
    fp = decide_fast_path(settings)
    shared = paths.shared_dir
    logs = build_logs(paths)
    return {
        "driver_ctr_version": __version__,
        "settings": settings.describe(),
        "driver": {
            "version": settings.driver_version.raw,
            "branch": settings.driver_branch,
            "kernel_module_type": settings.kernel_module_type,
            "target_arch": settings.target_arch,
        },
        "kernel": kernel,
        "loaded": {
            "nvidia_loaded": fp.facts["nvidia_loaded"],
            "nvidia_version": fp.facts["loaded_version"],
            "state_digest": fp.facts["state_digest"],
            "fast_path": fp.applies,
        },
        "shared_dir": {
            "path": str(shared),
            "flags": sorted(f for f in proto.FLAGS if (shared / f).exists()),
        },
        "last_build_log": str(logs[0]) if logs else "",
        "precompiled_kernels": precompiled.carried_kernels(precompiled.open_store(settings)),
    }


def render_text(info: Dict[str, Any]) -> str:
    """The text form; every value from the node (file names, a digest, settings) with its control characters
    escaped, one fact a line."""
    return "\n".join(printable(line) for line in _lines(info)) + "\n"


def _lines(info: Dict[str, Any]) -> List[str]:
    lines = ["driver-ctr %s" % info["driver_ctr_version"]]
    d, k, l, s = info["driver"], info["kernel"], info["loaded"], info["shared_dir"]
    lines.append(
        "driver:  %s (branch %s, modules %s, %s)"
        % (d["version"], d["branch"], d["kernel_module_type"], d["target_arch"])
    )
    if "parse_error" in k:
        lines.append("kernel:  %s (not a supported release form: expected %s)" % (k["release"], k["parse_error"]))
    else:
        lines.append(
            "kernel:  %s (%s, flavour %s%s)"
            % (
                k["release"],
                k["distro"],
                k["flavour"],
                ", RHEL %s" % k["rhel_version"] if k.get("rhel_version") else "",
            )
        )
    lines.append(
        "loaded:  nvidia %s, state digest %s, fast path %s"
        % (l["nvidia_version"] or "not loaded", l["state_digest"] or "none", "yes" if l["fast_path"] else "no")
    )
    lines.append("shared:  %s [%s]" % (s["path"], ", ".join(s["flags"]) or "no flags"))
    lines.append("build log: %s" % (info["last_build_log"] or "none kept on this node"))
    lines.append("precompiled: %s" % (", ".join(info["precompiled_kernels"]) or "none in this image"))
    lines.append("settings:")
    for key, value in sorted(info["settings"].items()):
        lines.append("  %s=%s" % (key, value))
    return lines


def run(settings: Settings, options: StatusOptions) -> int:
    info = collect(settings)
    if options.json:
        sys.stdout.write(json.dumps(info, indent=2, sort_keys=True) + "\n")
    else:
        sys.stdout.write(render_text(info))
    return 0
