"""The entitlement-based fallback: install the node kernel's build tree here, then build.

When the Driver Toolkit cannot build (or there is none), the driver container installs the node
kernel's build tree and module tree from the distribution's repositories, so that
``/lib/modules/<kver>`` looks like a DTK image's, and the same kbuild builder runs. The broken-DTK
decision (``dtk_decision.inspect_dtk``) is the post-check: "installed but still unusable" is said
with the same words.

One backend per file, chosen from the node's OS (``/host-etc/os-release``): ``apt`` (Debian,
Ubuntu) and ``dnf`` (RHEL, RHCOS, with entitlement certificates). ``DRIVER_CTR_LOCAL_REPO`` (a
directory of .debs or RPMs, e.g. a hostPath) is used first, with no network. The package manager runs
with the container's environment in the C locale, its proxies in both cases (curl, under dnf, ignores
an upper-case ``HTTP_PROXY``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List, Optional

from ..toolkit.dtk_decision import inspect_dtk
from ..toolkit.errors import CommandFailed, InvalidValue
from ..toolkit.log import Logger
from ..toolkit.paths import HostPaths
from ..toolkit.runner import Runner
from ..toolkit.settings import Settings
from ..toolkit.versions import parse_kernel_release
from .apt import AptBackend
from .base import FallbackFailed, PackageManager
from .dnf import DnfBackend
from .node_os import NodeOS, read_node_os
from .package_contents import mark_complete, mirror_merged_usr

SUPPORT_NOTE = (
    "NVIDIA does not support entitled builds on OpenShift 4.10 and later; the Driver Toolkit is the supported "
    "path: fix the DTK (see the reasons) when you can"
)
__all__ = ["FallbackFailed", "PackageManager", "install_kernel_tree", "SUPPORT_NOTE"]


def node_family(settings: Settings, kernel: str) -> str:
    """``debian`` or ``rhel``: from the node's os-release when mounted, else from the kernel release."""
    path = settings.paths.host_os_release
    if path.exists() or path.is_symlink():
        return read_node_os(path).family()
    try:
        distro = parse_kernel_release(kernel).distro
    except InvalidValue:
        return ""
    return NodeOS(id=distro).family()


def package_manager_env(settings: Settings) -> Dict[str, str]:
    """The container's environment in the C locale, each proxy setting under both of its names."""
    env = dict(os.environ, LC_ALL="C")
    for name, value in settings.proxies:
        env[name.lower()] = env[name.upper()] = value
    return env


def backend_for(
    settings: Settings, kernel: str, runner: Runner, log: Logger, target: Optional[HostPaths] = None
) -> PackageManager:
    """The node's package manager, installing into ``target``'s root (default: the settings' own). A target
    that is not the settings' own root (a preflight's scratch) keeps apt's state there too."""
    target = target or settings.paths
    family = node_family(settings, kernel)
    local = settings.host_path("local_repo")
    env = package_manager_env(settings)
    root = target.host("/")
    scratch = target != settings.paths
    if family == "debian":
        return AptBackend(
            root,
            runner,
            dict(env, DEBIAN_FRONTEND="noninteractive"),
            log,
            local,
            apt_state=target.host("/var/lib/driver-ctr/apt") if scratch else None,
        )
    if family == "rhel":
        return DnfBackend(
            settings.paths,
            runner,
            env,
            log,
            kernel,
            settings.target_arch,
            settings.openshift_version,
            settings.dnf_releasever,
            local,
            root=root,
        )
    raise FallbackFailed(
        "no package-manager backend for this node (os-release %s, kernel %s)" % (settings.paths.host_os_release, kernel)
    )


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
    problems = backend.preflight()
    if problems:
        raise FallbackFailed(
            "the entitled build cannot start (%s):\n%s" % (backend.name, "\n".join("  - " + p for p in problems))
        )
    why = backend.available()
    if why:
        raise FallbackFailed("the %s backend cannot run: %s" % (backend.name, why))
    names = backend.local_kernel_packages(kernel)
    if names:
        log.info("the node-local repository holds the kernel's packages: no network", packages=names)
    else:
        backend.refresh()
        names = backend.kernel_packages(kernel)
    installed = backend.install(names, kernel)  # marks the install incomplete before its first write
    installed += backend.install_compiler(kernel)
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
