"""What every package-manager backend offers (in the shape of cloud-init's PackageManager)."""

from __future__ import annotations

from typing import List, Sequence

from ..toolkit.errors import DriverCtrError


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


class PackageManager:
    """One backend: which node OSes it serves, and how it gets a kernel's trees into the root."""

    name = "abstract"

    def preflight(self) -> List[str]:
        """What is missing before anything runs (no network): [] when nothing."""
        return []

    def available(self) -> str:
        """'' when this backend can run here, else why not."""
        raise NotImplementedError

    def local_kernel_packages(self, kernel: str) -> List[str]:
        """The kernel's packages when the node-local repository holds them all, else []."""
        return []

    def refresh(self) -> None:
        """Update the package index from the configured sources."""
        raise NotImplementedError

    def kernel_packages(self, kernel: str) -> List[str]:
        """The packages that hold ``kernel``'s build tree and module tree."""
        raise NotImplementedError

    def install(self, names: Sequence[str], kernel: str) -> List[str]:
        """Put ``names``, the packages of ``kernel``'s trees, into the root (unpacked, never as a boot
        kernel); returns what was installed."""
        raise NotImplementedError

    def install_compiler(self, kernel: str) -> List[str]:
        """The compiler ``kernel`` was built with, once its trees are in (when it is not here already)."""
        return []
