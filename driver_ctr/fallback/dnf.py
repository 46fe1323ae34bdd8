"""The dnf backend (RHEL, RHCOS nodes): the node kernel's devel tree from Red Hat's repositories.

- **Preflight**, before any dnf call and without the network: the entitlement certificate and its key
  (``/etc/pki/entitlement/*.pem`` and ``*-key.pem``, or CRI-O's ``/run/secrets/etc-pki-entitlement``),
  a repository configuration (``/etc/yum.repos.d/*.repo``, e.g. ``redhat.repo``), and the trusted CA
  bundle the operator mounts; everything missing is named in one message.
- **The reference's repository ladder**: ``rhocp-<OPENSHIFT_VERSION>-for-rhel-<major>-<arch>-rpms`` when
  set, then the EUS baseos and appstream repositories, each kept only if ``dnf makecache`` succeeds with
  it; ``--releasever`` is ``DNF_RELEASEVER``, else the kernel's RHEL minor (``el9_4`` -> 9.4), then the
  major. Each step logs what it tried and why it moved on.
- **Packages**: exactly the node kernel's ``kernel[-rt|-64k]-{headers,devel,core}`` (headers are not
  flavoured), ``elfutils-libelf-devel``, and the gcc the kernel was built with when ``.config`` is
  readable later (the builder compares compilers and says so).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import List, Mapping, Optional, Sequence, Tuple

from ..toolkit.errors import CommandFailed, InvalidValue
from ..toolkit.log import Logger
from ..toolkit.paths import HostPaths
from ..toolkit.runner import Runner
from ..toolkit.versions import parse_kernel_release
from .base import FallbackFailed, PackageManager

ENTITLEMENT_DIRS = ("/etc/pki/entitlement", "/run/secrets/etc-pki-entitlement")
REPOS_DIR = "/etc/yum.repos.d"
CA_BUNDLE = "/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem"
LIKELY_CAUSE = (
    "the EUS repositories are not enabled for this RHEL minor (gpu-driver-container#793), a repository lags "
    "behind a new kernel, or a mirror lacks it; a node-local repository (DRIVER_CTR_LOCAL_REPO) also serves"
)


def entitlement_pairs(paths: HostPaths) -> List[Tuple[Path, Path]]:
    """(certificate, key) pairs of the entitlement directories."""
    pairs = []
    for d in ENTITLEMENT_DIRS:
        base = paths.host(d)
        if base.is_dir():
            for key in sorted(base.glob("*-key.pem")):
                cert = key.with_name(key.name[: -len("-key.pem")] + ".pem")
                if cert.is_file():
                    pairs.append((cert, key))
    return pairs


def preflight(paths: HostPaths) -> List[str]:
    """What is missing for an entitled dnf install; [] when nothing. No network, no dnf."""
    problems = []
    if not entitlement_pairs(paths):
        problems.append(
            "no entitlement certificate: expected <id>.pem and <id>-key.pem in %s (the operator mounts "
            "the etc-pki-entitlement secret; CRI-O injects it at %s)"
            % (paths.host(ENTITLEMENT_DIRS[0]), paths.host(ENTITLEMENT_DIRS[1]))
        )
    repos = paths.host(REPOS_DIR)
    if not (repos.is_dir() and any(repos.glob("*.repo"))):
        problems.append("no repository configuration: expected redhat.repo (or another *.repo) in %s" % repos)
    if not paths.host(CA_BUNDLE).is_file():
        problems.append(
            "no trusted CA bundle at %s (the operator's gpu-operator-trusted-ca ConfigMap)" % paths.host(CA_BUNDLE)
        )
    return problems


def rhel_releasevers(kernel: str, dnf_releasever: str) -> List[str]:
    """The releasevers to try, in order: DNF_RELEASEVER, else the kernel's minor, then the major."""
    try:
        kr = parse_kernel_release(kernel)
    except InvalidValue:
        kr = None
    major = (kr.rhel_version.split(".")[0] if kr is not None and kr.rhel_version else "") or "9"
    first = dnf_releasever or (kr.rhel_version if kr is not None else "") or major
    return [first] + ([major] if major != first else [])


def kernel_package_names(kernel: str) -> List[str]:
    """``kernel[-rt|-64k]-devel/-core`` and ``kernel-headers`` of exactly this kernel."""
    base = re.sub(r"\+(rt|64k|debug)$", "", kernel)
    flavour = kernel[len(base) + 1 :] if kernel != base else ""
    prefix = "kernel-%s" % flavour if flavour else "kernel"
    return [
        "kernel-headers-%s" % base,
        "%s-devel-%s" % (prefix, base),
        "%s-core-%s" % (prefix, base),
        "elfutils-libelf-devel",
    ]


class DnfBackend(PackageManager):
    name = "dnf"

    def __init__(
        self,
        paths: HostPaths,
        runner: Runner,
        env: Mapping[str, str],
        log: Logger,
        kernel: str,
        arch: str,
        openshift_version: str = "",
        dnf_releasever: str = "",
    ) -> None:
        self.paths = paths
        self.runner = runner
        self.env = dict(env)
        self.log = log
        self.kernel = kernel
        self.arch = arch
        self.openshift_version = openshift_version
        self.releasevers = rhel_releasevers(kernel, dnf_releasever)
        self.repos: List[str] = []  # the ladder's repositories kept
        self.releasever: Optional[str] = None
        self.tried: List[str] = []

    def available(self) -> str:
        return "" if shutil.which("dnf") else "dnf is not installed in this image"

    def _dnf(self, *args: str, releasever: str) -> List[str]:
        # a repository we depend on fails loudly: a refused certificate is an error, not an empty repository
        argv = ["dnf", "-y", "--releasever=%s" % releasever, "--setopt=skip_if_unavailable=False"]
        root = self.paths.host("/")
        if str(root) != "/":
            argv.append("--installroot=%s" % root)
        return argv + ["--enablerepo=%s" % r for r in self.repos] + list(args)

    def _makecache(self, releasever: str) -> Tuple[bool, str]:
        r = self.runner.run(self._dnf("makecache", releasever=releasever), env=self.env, timeout=900, check=False)
        last = (r.stderr or r.stdout).strip().splitlines()
        return r.returncode == 0, last[-1] if last else "exit %d" % r.returncode

    def preflight(self) -> List[str]:
        return preflight(self.paths)

    def refresh(self) -> None:
        major = self.releasevers[-1]
        ladder = []
        if self.openshift_version:
            ladder.append(["rhocp-%s-for-rhel-%s-%s-rpms" % (self.openshift_version, major, self.arch)])
        ladder.append(
            [
                "rhel-%s-for-%s-baseos-eus-rpms" % (major, self.arch),
                "rhel-%s-for-%s-appstream-eus-rpms" % (major, self.arch),
            ]
        )
        for step in ladder:
            self.repos += step
            ok, why = self._makecache(self.releasevers[0])
            self.tried.append("%s with releasever %s: %s" % ("+".join(step), self.releasevers[0], "ok" if ok else why))
            if not ok:
                self.log.info(
                    "repository not usable here: moving on",
                    repositories=step,
                    releasever=self.releasevers[0],
                    reason=why,
                )
                self.repos = self.repos[: -len(step)]
        for rv in self.releasevers:
            ok, why = self._makecache(rv)
            self.tried.append("metadata with releasever %s: %s" % (rv, "ok" if ok else why))
            if ok:
                self.releasever = rv
                self.log.info("dnf metadata ready", releasever=rv, extra_repositories=self.repos)
                return
            self.log.info("dnf makecache failed: trying the next releasever", releasever=rv, reason=why)
        raise FallbackFailed(
            "dnf could not update its metadata with releasevers %s (an entitlement problem when "
            "the CDN refuses the certificate): %s" % (", ".join(self.releasevers), "; ".join(self.tried))
        )

    def kernel_packages(self, kernel: str) -> List[str]:
        return kernel_package_names(kernel)

    def install(self, names: Sequence[str]) -> List[str]:
        rv = self.releasever or self.releasevers[0]
        try:
            self.runner.run(self._dnf("install", *names, releasever=rv), env=self.env, timeout=1800)
        except CommandFailed as exc:
            m = re.search(r"(?:No match for argument|Unable to find a match): (\S+)", exc.stdout + exc.stderr)
            if m:
                raise FallbackFailed(
                    "no package %s for kernel %s in the repositories searched (%s; releasevers "
                    "tried: %s); likely cause: %s"
                    % (
                        m.group(1),
                        self.kernel,
                        ", ".join(self.repos) or "the configured ones",
                        ", ".join(self.releasevers),
                        LIKELY_CAUSE,
                    )
                ) from None
            raise FallbackFailed("dnf install failed: %s" % exc.summary) from None
        return list(names)
