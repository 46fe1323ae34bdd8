"""The apt backend (Debian, Ubuntu nodes): the kernel's headers and modules, unpacked into the root.

Packages: ``linux-headers-<kver>`` and what it needs of its own kind (``linux-headers-<…>-common``,
``linux-kbuild-<…>``), and the module tree: ``linux-modules-<kver>`` on Ubuntu, ``linux-image-<kver>`` on
Debian. They are fetched with ``apt-get download`` (or taken from the node-local repository) and unpacked
as their archives stream, under the rules of :mod:`package_contents` (a trust boundary): never installed
as a boot kernel, no maintainer scripts, no initramfs, only the kernel's build-tree paths. The root's own
merged-usr links (``/lib -> usr/lib``) are kept.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from ..toolkit.errors import CommandFailed, InvalidValue
from ..toolkit.shared_fs import Confined
from ..toolkit.versions import compare_kernel_releases, parse_kernel_release
from .base import FallbackFailed, Job, PackageManager
from .package_contents import (
    install,
    local_archives,
    mark_incomplete,
    private_scratch,
    tar_members,
    unpack,
    wanted,
)

_OWN_KIND = re.compile(r"^linux-(headers|kbuild)-")
LIKELY_CAUSE = (
    "the node runs a kernel the configured sources do not carry: the archive keeps only the current kernel "
    "ABI (an older point release is gone; snapshot.debian.org has it), or a mirror lags; or give the packages "
    "in a node-local repository (DRIVER_CTR_LOCAL_REPO)"
)


class AptBackend(PackageManager):
    name = "apt"

    family = "debian"
    os_ids = ("debian", "ubuntu")

    def __init__(self, job: Job) -> None:
        super().__init__(job)
        self.env["DEBIAN_FRONTEND"] = "noninteractive"
        self._local: Optional[Dict[str, Path]] = None

    @property
    def options(self) -> List[str]:
        """apt's options: a scratch target (a preflight's root) gets its own apt lists and cache, made on
        first use; the machine's apt state is never touched."""
        if not self.job.scratch:
            return []
        state = self.job.paths.host("/var/lib/driver-ctr/apt")
        for d in ("lists/partial", "cache/archives/partial"):
            (state / d).mkdir(parents=True, exist_ok=True)
        return ["-o", "Dir::State::Lists=%s/lists" % state, "-o", "Dir::Cache=%s/cache" % state]

    def available(self) -> str:
        missing = [t for t in ("apt-get", "apt-cache", "dpkg-deb") if not shutil.which(t)]
        return "" if not missing else "%s not installed in this image" % ", ".join(missing)

    def refresh(self) -> None:
        try:
            self.runner.run(["apt-get", *self.options, "update", "-q"], env=self.env, timeout=900)
        except CommandFailed as exc:
            raise FallbackFailed(
                "apt-get update failed (the sources, the proxy or the network): %s" % exc.summary
            ) from None

    # -- the node-local repository ---------------------------------------------------

    def local_packages(self) -> Dict[str, Path]:
        """Package name -> .deb of the node-local repository (read once)."""
        if self._local is None:
            self._local = {}
            for deb in local_archives(self.local_repo, ".deb", self.log):
                name = self.runner.run(["dpkg-deb", "-f", str(deb), "Package"], timeout=60).stdout.strip()
                self._local[name] = deb
        return self._local

    def local_kernel_packages(self) -> List[str]:
        kernel = self.kernel
        """The kernel's packages when the local repository holds them all (headers and modules), else []."""
        local = self.local_packages()
        headers = "linux-headers-" + kernel
        modules = [n for n in ("linux-modules-" + kernel, "linux-image-" + kernel) if n in local]
        if headers not in local or not modules:
            if self.local_repo is not None and local:
                lacks = [headers] if headers not in local else []
                lacks += [] if modules else ["linux-modules-%s or linux-image-%s" % (kernel, kernel)]
                self.log.warning(
                    "the node-local repository lacks the kernel's packages: using apt's sources",
                    repository=str(self.local_repo),
                    lacks=lacks,
                )
            return []
        own = sorted(n for n in local if _OWN_KIND.match(n) and n != headers)
        return [headers] + own + modules[:1]

    # -- the configured sources --------------------------------------------------------

    def _exists(self, name: str) -> bool:
        r = self.runner.run(
            ["apt-cache", *self.options, "show", "--no-all-versions", name], env=self.env, timeout=120, check=False
        )
        return r.returncode == 0 and bool(r.stdout.strip())

    def kernel_packages(self) -> List[str]:
        kernel = self.kernel
        headers = "linux-headers-" + kernel
        if not self._exists(headers):
            raise FallbackFailed(
                "no package %s in apt's configured sources (after apt-get update); likely cause: %s"
                % (headers, LIKELY_CAUSE)
            )
        r = self.runner.run(
            [
                "apt-cache",
                *self.options,
                "depends",
                "--no-recommends",
                "--no-suggests",
                "--no-conflicts",
                "--no-breaks",
                "--no-replaces",
                "--no-enhances",
                headers,
            ],
            env=self.env,
            timeout=120,
        )
        own = [
            line.split(":", 1)[1].strip()
            for line in r.stdout.splitlines()
            if line.strip().startswith("Depends:") and _OWN_KIND.match(line.split(":", 1)[1].strip())
        ]
        modules = next((n for n in ("linux-modules-" + kernel, "linux-image-" + kernel) if self._exists(n)), None)
        if modules is None:
            raise FallbackFailed(
                "no package with the modules of %s (linux-modules-%s or linux-image-%s) in apt's "
                "configured sources; likely cause: %s" % (kernel, kernel, kernel, LIKELY_CAUSE)
            )
        return [headers] + sorted(set(own)) + [modules]

    def newest_kernel(self) -> str:
        """The newest ``linux-headers-<kver>`` of the running kernel's flavour (``amd64``, ``cloud-amd64``,
        ``generic``) in apt's sources, compared as dpkg does."""
        variant = parse_kernel_release(self.kernel).variant
        r = self.runner.run(
            ["apt-cache", *self.options, "search", "--names-only", "^linux-headers-[0-9].*-%s$" % re.escape(variant)],
            env=self.env,
            timeout=120,
        )
        found = []
        for line in r.stdout.splitlines():
            name = line.split(" ", 1)[0]
            try:
                release = parse_kernel_release(name[len("linux-headers-") :])
            except InvalidValue:
                continue  # linux-headers-6.1.0-28-common and the like
            if release.variant == variant:
                found.append(release)
        if not found:
            raise FallbackFailed("apt's sources carry no linux-headers-<version>-%s" % variant)
        newest = found[0]
        for release in found[1:]:
            if compare_kernel_releases(release, newest) > 0:
                newest = release
        return newest.raw

    # -- installing ----------------------------------------------------------------------

    def install(self, names: Sequence[str]) -> List[str]:
        """Each package unpacked into private scratch under :mod:`package_contents`' rules, then only the
        kernel's build-tree paths moved into the root."""
        local = self.local_packages()
        prefixes = wanted(self.kernel)
        with tempfile.TemporaryDirectory(prefix="driver-ctr-apt-") as t:
            work = Path(t)
            fetch = [n for n in names if n not in local]
            if fetch:
                try:
                    self.runner.run(
                        ["apt-get", *self.options, "download", "-q", *fetch], cwd=str(work), env=self.env, timeout=1800
                    )
                except CommandFailed as exc:
                    raise FallbackFailed("apt-get download %s failed: %s" % (" ".join(fetch), exc.summary)) from None
            debs = [local[n] for n in names if n in local] + sorted(work.glob("*.deb"))
            scratch = private_scratch(self.root)
            try:
                for deb in debs:
                    with self.runner.stream(["dpkg-deb", "--fsys-tarfile", str(deb)]) as tar:
                        unpack(deb.name, tar_members(tar), Confined(scratch), prefixes)
                mark_incomplete(self.root, self.kernel, list(names))  # the first write into the root is next
                placed = install(Confined(scratch), Confined(self.root), prefixes)
            finally:
                Confined(scratch.parent).remove(scratch.name)
            self.log.info(
                "kernel packages unpacked",
                packages=list(names),
                root=str(self.root),
                files=len(placed),
                from_local_repo=[n for n in names if n in local],
            )
        return list(names)
