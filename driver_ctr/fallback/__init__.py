"""The entitlement-based fallback: install the node kernel's build tree here, then build.

When the Driver Toolkit cannot build (or there is none), the driver container installs the node
kernel's build tree and module tree from the distribution's repositories, so that
``/lib/modules/<kver>`` looks like a DTK image's, and the same kbuild builder runs. The broken-DTK
decision (``dtk_decision.inspect_dtk``) is the post-check: "installed but still unusable" is said
with the same words.

One backend per file (``base.PackageManager``), chosen from the node's OS (``/host-etc/os-release``)
through :data:`BACKENDS`: ``apt`` (Debian, Ubuntu) and ``dnf`` (RHEL, RHCOS, with entitlement
certificates). ``DRIVER_CTR_LOCAL_REPO`` (a
directory of .debs or RPMs, e.g. a hostPath) is used first, with no network. The package manager runs
with the container's environment in the C locale, its proxies in both cases (curl, under dnf, ignores
an upper-case ``HTTP_PROXY``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Type

from ..toolkit.dtk_decision import inspect_dtk
from ..toolkit.errors import CommandFailed, InvalidValue
from ..toolkit.log import Logger
from ..toolkit.paths import HostPaths
from ..toolkit.runner import Runner
from ..toolkit.settings import Settings
from ..toolkit.versions import parse_kernel_release
from .apt import AptBackend
from .base import FallbackFailed, Job, PackageManager
from .custom_ca import install_custom_cas
from .dnf import DnfBackend
from .node_os import NodeOS, read_node_os
from .package_contents import mark_complete, mirror_merged_usr

SUPPORT_NOTE = (
    "NVIDIA does not support entitled builds on OpenShift 4.10 and later; the Driver Toolkit is the supported "
    "path: fix the DTK (see the reasons) when you can"
)
__all__ = ["FallbackFailed", "PackageManager", "install_kernel_tree", "newest_kernel", "LATEST", "SUPPORT_NOTE"]


# The package-manager backends, keyed by the node's distribution family: a new one is its file and a line here.
BACKENDS: Dict[str, Type[PackageManager]] = {cls.family: cls for cls in (AptBackend, DnfBackend)}


def family_of(node: NodeOS) -> str:
    """The family of the first backend serving the node's OS (its ID or an ID_LIKE), else ''."""
    ids = (node.id,) + node.id_like
    return next((family for family, cls in BACKENDS.items() if any(i in cls.os_ids for i in ids)), "")


def node_family(settings: Settings, kernel: str) -> str:
    """The node's family: from its os-release when mounted, else from the kernel release."""
    path = settings.paths.host_os_release
    if path.exists() or path.is_symlink():
        return family_of(read_node_os(path))
    try:
        distro = parse_kernel_release(kernel).distro
    except InvalidValue:
        return ""
    return family_of(NodeOS(id=distro))


def backend_for(
    settings: Settings, kernel: str, runner: Runner, log: Logger, target: Optional[HostPaths] = None
) -> PackageManager:
    """The node's package manager, installing ``kernel``'s trees into ``target``'s root (default: the
    settings' own)."""
    cls = BACKENDS.get(node_family(settings, kernel))
    if cls is None:
        raise FallbackFailed(
            "no package-manager backend for this node (os-release %s, kernel %s; backends: %s)"
            % (
                settings.paths.host_os_release,
                kernel,
                ", ".join("%s for %s" % (c.name, f) for f, c in BACKENDS.items()),
            )
        )
    return cls(Job(settings, kernel, runner, log, target))


LATEST = "latest"  # update -k latest: the newest kernel the package sources carry


def newest_kernel(settings: Settings, runner: Runner, log: Logger, root: Optional[Path] = None) -> str:
    """The newest kernel of the running kernel's flavour that the node's package sources carry (the
    reference's ``update -k latest``). ``root``: a preflight's scratch root, where apt keeps its state."""
    target = HostPaths(root=str(root)) if root is not None else None
    backend = backend_for(settings, settings.running_kernel(), runner, log, target)
    install_custom_cas(settings.paths, runner, log)
    why = backend.available()
    if why:
        raise FallbackFailed("the %s backend cannot run: %s" % (backend.name, why))
    backend.refresh()
    kernel = backend.newest_kernel()
    log.info("the newest kernel the package sources carry", kernel=kernel, backend=backend.name)
    return kernel


def install_kernel_tree(
    settings: Settings, kernel: str, runner: Runner, log: Logger, root: Optional[Path] = None
) -> List[str]:
    """Make ``/lib/modules/<kernel>`` look like a DTK image's: the node-local repository first
    (no network), else the configured sources; ``depmod``; then the DTK decision's own check of
    the build tree. Returns the packages installed. ``root``: where the trees go (default: the
    container's root); a preflight gives its own scratch root, and nothing outside it changes.
    The backend marks the install incomplete (``kernel_tree.INCOMPLETE``) before its first write into the
    root; it is unmarked here once depmod and the tree check passed."""
    target = settings.paths
    if root is not None:
        mirror_merged_usr(settings.paths.host("/"), root)
        target = HostPaths(root=str(root))
    backend = backend_for(settings, kernel, runner, log, target)
    install_custom_cas(settings.paths, runner, log)  # before any download
    problems = backend.preflight()
    if problems:
        raise FallbackFailed(
            "the entitled build cannot start (%s):\n%s" % (backend.name, "\n".join("  - " + p for p in problems))
        )
    why = backend.available()
    if why:
        raise FallbackFailed("the %s backend cannot run: %s" % (backend.name, why))
    names = backend.local_kernel_packages()
    if names:
        log.info("the node-local repository holds the kernel's packages: no network", packages=names)
    else:
        backend.refresh()
        names = backend.kernel_packages()
    installed = backend.install(names)  # marks the install incomplete before its first write
    installed += backend.install_compiler()
    try:
        runner.run(["depmod", "-b", str(target.host("/")), kernel], timeout=600)
    except CommandFailed as exc:
        raise FallbackFailed("depmod for %s after unpacking failed: %s" % (kernel, exc.summary)) from None
    facts = inspect_dtk(target, kernel)
    if facts.build_tree is None:
        raise FallbackFailed(
            "installed %s, but the kernel build tree is still unusable: %s"
            % (", ".join(installed), facts.build_tree_problem)
        )
    mark_complete(target.host("/"), kernel)
    return installed
