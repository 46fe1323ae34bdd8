"""What every package-manager backend is given and offers (in the shape of cloud-init's PackageManager).

A backend is made for one job (:class:`Job`: the settings, the kernel whose trees it installs, where they
go, the runner, the log), with that one constructor; the fallback picks its class from the registry in
``fallback/__init__.py``, keyed by the node's distribution family.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Dict, List, Optional, Sequence, Tuple

from ..toolkit.errors import DriverCtrError
from ..toolkit.log import Logger
from ..toolkit.paths import HostPaths
from ..toolkit.runner import Runner
from ..toolkit.settings import Settings


class FallbackFailed(DriverCtrError):
    """The fallback could not install the kernel's build tree; the message says what was tried.
    ``nothing_installed``: it failed before anything was written into the root (a package missing, a
    download refused)."""

    nothing_installed = False

    @classmethod
    def before_install(cls, message: str) -> "FallbackFailed":
        exc = cls(message)
        exc.nothing_installed = True
        return exc


@dataclass(frozen=True)
class Job:
    """One install of a kernel's trees: what every backend is constructed with.

    ``target``: where the trees go; None is the settings' own root. Another one (a preflight's scratch
    root) keeps the package manager's state there too."""

    settings: Settings
    kernel: str
    runner: Runner
    log: Logger
    target: Optional[HostPaths] = None

    @property
    def paths(self) -> HostPaths:
        return self.target or self.settings.paths

    @property
    def root(self) -> Path:
        return self.paths.host("/")

    @property
    def scratch(self) -> bool:
        """The trees go to a scratch root, not the settings' own."""
        return self.paths != self.settings.paths

    @property
    def local_repo(self) -> Optional[Path]:
        """``DRIVER_CTR_LOCAL_REPO``, re-rooted (used first, with no network)."""
        return self.settings.host_path("local_repo")

    def env(self) -> Dict[str, str]:
        """The container's environment in the C locale, each proxy setting under both of its names (curl,
        under dnf, ignores an upper-case ``HTTP_PROXY``)."""
        env = dict(os.environ, LC_ALL="C")
        for name, value in self.settings.proxies:
            env[name.lower()] = env[name.upper()] = value
        return env


class PackageManager(ABC):
    """One backend: the family of node OSes it serves (``os_ids``: the os-release IDs, ID_LIKE included),
    and how it gets the job's kernel trees into the root."""

    name: ClassVar[str]
    family: ClassVar[str]
    os_ids: ClassVar[Tuple[str, ...]]

    def __init__(self, job: Job) -> None:
        self.job = job
        self.kernel = job.kernel
        self.root = job.root
        self.runner = job.runner
        self.log = job.log
        self.local_repo = job.local_repo
        self.env = job.env()

    def preflight(self) -> List[str]:
        """What is missing before anything runs (no network): [] when nothing."""
        return []

    @abstractmethod
    def available(self) -> str:
        """'' when this backend can run here, else why not."""

    def local_kernel_packages(self) -> List[str]:
        """The kernel's packages when the node-local repository holds them all, else []."""
        return []

    @abstractmethod
    def refresh(self) -> None:
        """Update the package index from the configured sources."""

    @abstractmethod
    def kernel_packages(self) -> List[str]:
        """The packages that hold the kernel's build tree and module tree."""

    @abstractmethod
    def install(self, names: Sequence[str]) -> List[str]:
        """Put ``names``, the packages of the kernel's trees, into the root (unpacked, never as a boot
        kernel); returns what was installed."""

    def newest_kernel(self) -> str:
        """After :meth:`refresh`: the newest kernel of the job kernel's flavour the sources carry
        (``update -k latest``)."""
        raise FallbackFailed("the %s backend cannot tell the newest kernel its sources carry" % self.name)

    def install_compiler(self) -> List[str]:
        """The compiler the kernel was built with, once its trees are in (when it is not here already)."""
        return []
