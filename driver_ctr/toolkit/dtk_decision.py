"""Is this Driver Toolkit image usable for the node kernel? The broken-DTK decision.

:func:`inspect_dtk` reads what the image holds (``/etc/driver-toolkit-release.json``
and the kernel trees actually present); :func:`decide` is a pure function of
that and the node kernel. The reference only tested for
``/lib/modules/$(uname -r)/vmlinuz``; here the versions are compared with rpm
semantics, flavours matched to their own packages, and the build tree checked.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from .errors import InvalidValue, ProtocolError
from .inputs import read_input
from .paths import HostPaths
from .versions import KernelRelease, compare_kernel_releases, parse_kernel_release

USABLE = "usable"
BROKEN = "broken"

CAUSE_STALE_LABEL = (
    "the DTK is older than the node kernel: most likely the node's NFD label "
    "feature.node.kubernetes.io/system-os_release.OSTREE_VERSION is stale after an "
    "upgrade and selected the previous release's DTK (gpu-operator#990); check NFD "
    "and delete the driver pod once the label is right"
)
CAUSE_NODE_OLDER = (
    "the DTK is newer than the node kernel: the node has not rebooted into the RHCOS "
    "this DaemonSet was rendered for, or its label is ahead of its kernel"
)
CAUSE_NO_TREE = "the DTK image lacks the kernel-devel tree for the node kernel"


@dataclass(frozen=True)
class DtkFacts:
    """What the DTK image holds, as read from its filesystem."""

    release_json: Optional[Dict[str, Any]]
    release_json_error: str = ""
    build_tree: Optional[str] = None  # resolved /lib/modules/<k>/build with a Makefile
    build_tree_problem: str = ""
    usr_src_kernel: bool = False  # /usr/src/kernels/<k>
    vmlinuz: bool = False  # /lib/modules/<k>/vmlinuz
    kernels_present: Tuple[str, ...] = ()


@dataclass(frozen=True)
class DtkDecision:
    verdict: str
    node_kernel: str
    dtk_kernels: Dict[str, str] = field(default_factory=dict)
    newer: str = ""  # "node", "dtk", "same" or "" when unknown
    rhcos_version: str = ""
    rhel_version: str = ""
    reasons: Tuple[str, ...] = ()
    likely_cause: str = ""
    notes: Tuple[str, ...] = ()

    @property
    def broken(self) -> bool:
        return self.verdict == BROKEN

    def as_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d["reasons"] = list(self.reasons)
        d["notes"] = list(self.notes)
        return d


def inspect_dtk(paths: HostPaths, node_kernel: str) -> DtkFacts:
    """Read the DTK image's release file and kernel trees (no decisions here)."""
    rj: Optional[Dict[str, Any]] = None
    rj_error = ""
    p = paths.dtk_release_json
    if p.exists() or p.is_symlink():
        try:
            data = json.loads(read_input(p, "record").decode("utf-8"))
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
            for k in ("KERNEL_VERSION", "RT_KERNEL_VERSION", "RHEL_VERSION"):
                if k in data and not isinstance(data[k], str):
                    raise ValueError("%s is not a string" % k)
            rj = data
        except ProtocolError as exc:
            rj_error = "%s is malformed: %s" % (p, exc.message)
        except (ValueError, UnicodeDecodeError, OSError) as exc:
            rj_error = "%s is malformed: %s" % (p, exc)
    mod = paths.module_dir(node_kernel)
    build = mod / "build"
    tree: Optional[str] = None
    problem = ""
    if not (build.exists() or build.is_symlink()):
        problem = "%s does not exist" % build
    else:
        target = paths.follow(build)
        if not target.is_dir():
            problem = "%s does not resolve to a directory (%s)" % (build, target)
        elif not (target / "Makefile").is_file():
            problem = "%s (%s) has no Makefile: not a kernel-devel tree" % (build, target)
        else:
            tree = str(target)
    present: Tuple[str, ...] = ()
    if paths.lib_modules.is_dir():
        present = tuple(sorted(d.name for d in paths.lib_modules.iterdir() if d.is_dir()))
    return DtkFacts(
        release_json=rj,
        release_json_error=rj_error,
        build_tree=tree,
        build_tree_problem=problem,
        usr_src_kernel=(paths.kernels_src / node_kernel).is_dir(),
        vmlinuz=(mod / "vmlinuz").is_file(),
        kernels_present=present,
    )


_RHEL_FLAVOUR_SUFFIX = re.compile(r"\+(rt|64k)(-debug)?$|\+debug$")


def _without_flavour(v: Optional[str]) -> Optional[str]:
    """A release without its RHEL flavour suffix (``+rt``, ``+64k``, ``+debug``);
    Debian's ``+debNN`` is part of the release and stays."""
    return _RHEL_FLAVOUR_SUFFIX.sub("", v) if v else None


def _dtk_kernel_for(node: KernelRelease, rj: Dict[str, Any]) -> Tuple[str, Optional[str]]:
    """(field name, DTK kernel V-R.A) that must equal the node kernel's."""
    if node.flavour == "rt":
        return "RT_KERNEL_VERSION", _without_flavour(rj.get("RT_KERNEL_VERSION"))
    # 64k kernels come from the same source RPM: same V-R.A, +64k packages.
    return "KERNEL_VERSION", _without_flavour(rj.get("KERNEL_VERSION"))


def decide(node_kernel: str, facts: DtkFacts, rhcos_version: str = "") -> DtkDecision:
    """The verdict: ``usable`` or ``broken``, with every reason."""
    reasons: List[str] = []
    notes: List[str] = []
    dtk_kernels: Dict[str, str] = {}
    newer = ""
    cause = ""
    rhel_version = ""
    try:
        node = parse_kernel_release(node_kernel)
    except InvalidValue as exc:
        return DtkDecision(
            BROKEN,
            node_kernel,
            reasons=("node kernel %r cannot be parsed: expected %s" % (node_kernel, exc.expected),),
            rhcos_version=rhcos_version,
        )
    if facts.release_json_error:
        reasons.append(facts.release_json_error)
    rj = facts.release_json
    if rj is not None:
        rhel_version = str(rj.get("RHEL_VERSION", ""))
        for k in ("KERNEL_VERSION", "RT_KERNEL_VERSION"):
            if rj.get(k):
                dtk_kernels[k] = rj[k]
        fieldname, dtk_v = _dtk_kernel_for(node, rj)
        if not dtk_v:
            flavour = {"rt": "real-time (+rt)", "64k": "64k-page (+64k)"}.get(node.flavour, "standard")
            reasons.append(
                "node runs a %s kernel %s but the DTK release file has no %s" % (flavour, node_kernel, fieldname)
            )
            cause = CAUSE_NO_TREE
        else:
            try:
                dtk = parse_kernel_release(dtk_v)
            except InvalidValue:
                reasons.append("DTK %s %r is not a kernel release" % (fieldname, dtk_v))
                dtk = None
            if dtk is not None:
                if dtk.distro != node.distro or dtk.arch != node.arch:
                    reasons.append(
                        "DTK %s %s is for %s/%s, the node kernel %s for %s/%s"
                        % (fieldname, dtk_v, dtk.distro, dtk.arch, node_kernel, node.distro, node.arch)
                    )
                else:
                    c = compare_kernel_releases(node, dtk)
                    newer = "same" if c == 0 else ("node" if c > 0 else "dtk")
                    if c != 0:
                        reasons.append(
                            "node kernel %s differs from the DTK's %s %s (%s is newer)"
                            % (node.base, fieldname, dtk.base, "the node" if c > 0 else "the DTK")
                        )
                        cause = CAUSE_STALE_LABEL if c > 0 else CAUSE_NODE_OLDER
    elif not facts.release_json_error:
        notes.append("no /etc/driver-toolkit-release.json: the kernel trees alone decide")
    if facts.build_tree is None:
        reasons.append("no kernel build tree for %s: %s" % (node_kernel, facts.build_tree_problem))
        if not cause:
            cause = CAUSE_NO_TREE
        if facts.kernels_present:
            notes.append("kernel trees present in the DTK: %s" % ", ".join(facts.kernels_present))
        if facts.usr_src_kernel:
            notes.append(
                "/usr/src/kernels/%s exists: kernel-devel is installed but %s/build does not lead to it"
                % (node_kernel, "/lib/modules/" + node_kernel)
            )
    if not facts.vmlinuz:
        notes.append("no /lib/modules/%s/vmlinuz (the reference's only check): not needed to build" % node_kernel)
    return DtkDecision(
        verdict=BROKEN if reasons else USABLE,
        node_kernel=node_kernel,
        dtk_kernels=dtk_kernels,
        newer=newer,
        rhcos_version=rhcos_version,
        rhel_version=rhel_version,
        reasons=tuple(reasons),
        likely_cause=cause if reasons else "",
        notes=tuple(notes),
    )
