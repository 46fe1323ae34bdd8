"""The dnf backend (RHEL, RHCOS nodes): the node kernel's devel tree from Red Hat's repositories.

- **Preflight**, before any dnf call and without the network: the entitlement certificate and its key
  (``/etc/pki/entitlement/*.pem`` and ``*-key.pem``, or CRI-O's ``/run/secrets/etc-pki-entitlement``),
  readable and not expired (``openssl x509 -checkend``); a repository configuration
  (``/etc/yum.repos.d/*.repo``, e.g. ``redhat.repo``) that parses (dnf itself skips a file it cannot
  parse and carries on with no repository); and the trusted CA bundle the operator mounts (where dnf
  reads the system trust: nothing to pass). Everything wrong is named in one message.
- **Proxies** reach dnf through the environment (``https_proxy``/``HTTPS_PROXY``, any case: the fallback
  sets both); a download failure is explained (:mod:`.download_errors`): the proxy refused, the CDN
  refused the certificate, a mirror without the repository (404).
- **A node-local repository** (``DRIVER_CTR_LOCAL_REPO``, RPM files) holding every package is installed
  from with every repository disabled: no network.
- **The reference's repository ladder**: ``rhocp-<OPENSHIFT_VERSION>-for-rhel-<major>-<arch>-rpms`` when
  set, then the EUS baseos and appstream repositories, each kept only if ``dnf makecache`` succeeds with
  it; ``--releasever`` is ``DNF_RELEASEVER``, else the kernel's RHEL minor (``el9_4`` -> 9.4), then the
  major. Each step logs what it tried and why it moved on.
- **Packages**: exactly the node kernel's ``kernel[-rt|-64k]-{headers,devel,core}`` (headers are not
  flavoured) and ``elfutils-libelf-devel``; then the gcc the kernel was built with
  (:mod:`.kernel_compiler`), when the image's gcc is another version.
"""

from __future__ import annotations

import configparser
import re
import shutil
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from ..toolkit.errors import CommandFailed, InvalidValue
from ..toolkit.inputs import UnreadableInput, read_input, read_input_text
from ..toolkit.kernel_tree import compiler_version, present_compiler_version
from ..toolkit.paths import HostPaths
from ..toolkit.runner import Runner
from ..toolkit.shared_fs import Confined
from ..toolkit.versions import parse_kernel_release
from .base import FallbackFailed, Job, PackageManager
from .download_errors import explain
from .kernel_compiler import kernel_compiler_text
from .package_contents import (
    cpio_members,
    install,
    local_archives,
    mark_complete,
    mark_incomplete,
    private_scratch,
    unpack,
    wanted,
)

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


def certificate_problems(cert: Path, key: Path, runner: Runner) -> List[str]:
    """An entitlement pair that cannot serve: not PEM, unreadable, or expired (openssl, no network)."""
    problems = []
    try:
        if b"PRIVATE KEY-----" not in read_input(key, "certificate")[:4096]:
            problems.append("the entitlement key %s is not a PEM private key" % key)
    except UnreadableInput as exc:
        problems.append("the entitlement key: %s" % exc)
    try:
        read_input(cert, "certificate")  # a regular file within its bound before openssl opens it
    except UnreadableInput as exc:
        return problems + ["the entitlement certificate: %s" % exc]
    try:
        r = runner.run(
            ["openssl", "x509", "-in", str(cert), "-noout", "-enddate", "-checkend", "0"], check=False, timeout=60
        )
    except CommandFailed:  # no openssl in this image: dnf will say
        return problems
    end = re.search(r"notAfter=(.*)", r.stdout)
    if r.returncode != 0 and end:
        problems.append(
            "the entitlement certificate %s expired on %s: renew the entitlement and update the "
            "etc-pki-entitlement secret" % (cert, end.group(1).strip())
        )
    elif r.returncode != 0:
        problems.append("the entitlement certificate %s is not a readable PEM certificate" % cert)
    return problems


def repo_file_problems(repos: Path) -> List[str]:
    """Repository files dnf would skip (it then carries on with no repository at all)."""
    problems = []
    for f in sorted(repos.glob("*.repo")):
        parser = configparser.ConfigParser(interpolation=None, strict=False)
        try:
            parser.read_string(read_input_text(f, "repository file"), source=str(f))
        except configparser.Error as exc:
            problems.append("the repository file %s does not parse: %s" % (f, str(exc).replace("\n", " ")))
        except UnreadableInput as exc:
            problems.append("the repository file: %s" % exc)
    return problems


def preflight(paths: HostPaths, runner: Runner) -> List[str]:
    """What is missing or wrong for an entitled dnf install; [] when nothing. No network, no dnf."""
    problems = []
    pairs = entitlement_pairs(paths)
    for cert, key in pairs:
        problems += certificate_problems(cert, key, runner)
    if not pairs:
        problems.append(
            "no entitlement certificate: expected <id>.pem and <id>-key.pem in %s (the operator mounts "
            "the etc-pki-entitlement secret; CRI-O injects it at %s)"
            % (paths.host(ENTITLEMENT_DIRS[0]), paths.host(ENTITLEMENT_DIRS[1]))
        )
    repos = paths.host(REPOS_DIR)
    if not (repos.is_dir() and any(repos.glob("*.repo"))):
        problems.append("no repository configuration: expected redhat.repo (or another *.repo) in %s" % repos)
    else:
        problems += repo_file_problems(repos)
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

    family = "rhel"
    os_ids = ("rhel", "rhcos", "centos", "fedora")

    def __init__(self, job: Job) -> None:
        super().__init__(job)
        self.paths = job.settings.paths  # the container's (the kernel's .config is read there)
        self.arch = job.settings.target_arch
        self.openshift_version = job.settings.openshift_version
        self.releasevers = rhel_releasevers(self.kernel, job.settings.dnf_releasever)
        self.repos: List[str] = []  # the ladder's repositories kept
        self.releasever: Optional[str] = None
        self.tried: List[str] = []
        self._local: Optional[Dict[str, Path]] = None
        self.offline = False  # the kernel's packages came from the node-local repository

    def available(self) -> str:
        return "" if shutil.which("dnf") else "dnf is not installed in this image"

    def _dnf(self, *args: str, releasever: str, offline: bool = False) -> List[str]:
        # a repository we depend on fails loudly: a refused certificate is an error, not an empty repository
        argv = ["dnf", "-y", "--releasever=%s" % releasever, "--setopt=skip_if_unavailable=False"]
        if str(self.root) != "/":
            argv.append("--installroot=%s" % self.root)
        if offline:
            return argv + ["--disablerepo=*"] + list(args)
        return argv + ["--enablerepo=%s" % r for r in self.repos] + list(args)

    def _makecache(self, releasever: str) -> Tuple[bool, str]:
        r = self.runner.run(self._dnf("makecache", releasever=releasever), env=self.env, timeout=900, check=False)
        text = r.stdout + r.stderr
        if r.returncode == 0 and "There are no enabled repositories" in text:
            return False, "no enabled repository (check enabled=1 in the repository files)"
        unknown = re.search(r"Unknown repo: '?([^'\s]+)", text)
        if r.returncode != 0 and unknown:
            return False, "%s is not in the repository files (not entitled, or not for this RHEL)" % unknown.group(1)
        return r.returncode == 0, "" if r.returncode == 0 else explain(text, self.env)

    def preflight(self) -> List[str]:
        if self.local_kernel_packages():
            return []  # the node-local repository serves: no entitlement needed
        return preflight(self.paths, self.runner)

    # -- the node-local repository ---------------------------------------------------

    def local_packages(self) -> Dict[str, Path]:
        """What the node-local repository's RPMs answer to (name, name-version-release, with .arch) -> file."""
        if self._local is None:
            self._local = {}
            rpms = local_archives(self.local_repo, ".rpm", self.log)
            if rpms:
                qf = "%{NAME} %{VERSION} %{RELEASE} %{ARCH}\\n"
                try:
                    out = self.runner.run(["rpm", "-qp", "--nosignature", "--qf", qf, *map(str, rpms)], timeout=120)
                except CommandFailed as exc:
                    raise FallbackFailed(
                        "the node-local repository %s holds an RPM that does not read: %s"
                        % (self.local_repo, exc.summary)
                    ) from None
                for rpm, line in zip(rpms, out.stdout.splitlines()):
                    n, v, r, a = line.split()
                    for spec in (n, "%s-%s-%s" % (n, v, r), "%s-%s-%s.%s" % (n, v, r, a)):
                        self._local[spec] = rpm
        return self._local

    def local_kernel_packages(self) -> List[str]:
        names = kernel_package_names(self.kernel)
        local = self.local_packages()
        return names if all(n in local for n in names) else []

    # -- the configured sources --------------------------------------------------------

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
        last = ""
        for rv in self.releasevers:
            ok, last = self._makecache(rv)
            self.tried.append("metadata with releasever %s: %s" % (rv, "ok" if ok else last))
            if ok:
                self.releasever = rv
                self.log.info("dnf metadata ready", releasever=rv, extra_repositories=self.repos)
                return
            self.log.info("dnf makecache failed: trying the next releasever", releasever=rv, reason=last)
        raise FallbackFailed(
            "dnf could not update its metadata with releasevers %s: %s (tried: %s)"
            % (", ".join(self.releasevers), last, "; ".join(self.tried))
        )

    def kernel_packages(self) -> List[str]:
        return kernel_package_names(self.kernel)

    def newest_kernel(self) -> str:
        """The newest ``kernel-devel`` the repositories carry, as ``uname -r`` names it."""
        rv = self.releasever or self.releasevers[0]
        argv = self._dnf(
            "repoquery",
            "--latest-limit=1",
            "--arch=%s" % self.arch,
            "--qf=%{VERSION}-%{RELEASE}.%{ARCH}",
            "kernel-devel",
            releasever=rv,
        )
        r = self.runner.run(argv, env=self.env, timeout=600)
        lines = [line.strip() for line in r.stdout.splitlines() if line.strip()]
        if not lines:
            raise FallbackFailed(
                "the repositories searched (%s) carry no kernel-devel"
                % (", ".join(self.repos) or "the configured ones")
            )
        return lines[-1]

    # -- installing ----------------------------------------------------------------------

    def install(self, names: Sequence[str]) -> List[str]:
        """The node-local repository's RPMs are unpacked under :mod:`package_contents`' rules (only the
        kernel's build-tree paths reach the root, no scriptlet runs); the repositories' through dnf."""
        local = self.local_packages()
        if all(n in local for n in names):
            self.offline = True
            return self._unpack_local(names)
        mark_incomplete(self.root, self.kernel, list(names))  # rpm writes as soon as dnf has downloaded
        try:
            return self._dnf_install(names)
        except FallbackFailed as exc:
            if exc.nothing_installed:
                mark_complete(self.root, self.kernel, nothing_written=True)
            raise

    def _unpack_local(self, names: Sequence[str]) -> List[str]:
        root = self.root
        prefixes = wanted(self.kernel)
        scratch = private_scratch(root)
        try:
            for n in names:
                rpm = self.local_packages()[n]
                with self.runner.stream(["rpm2cpio", str(rpm)]) as cpio:
                    unpack(rpm.name, cpio_members(cpio), Confined(scratch), prefixes)
            mark_incomplete(root, self.kernel, list(names))  # the first write into the root is next
            placed = install(Confined(scratch), Confined(root), prefixes)
        except CommandFailed as exc:
            raise FallbackFailed("an RPM of the node-local repository does not unpack: %s" % exc.summary) from None
        finally:
            Confined(scratch.parent).remove(scratch.name)
        self.log.info("kernel packages unpacked", packages=list(names), files=len(placed), from_local_repo=True)
        return list(names)

    def _dnf_install(self, names: Sequence[str]) -> List[str]:
        rv = self.releasever or self.releasevers[0]
        local = self.local_packages()
        offline = all(n in local for n in names)
        argv = self._dnf("install", *(str(local[n]) if offline else n for n in names), releasever=rv, offline=offline)
        try:
            self.runner.run(argv, env=self.env, timeout=1800)
        except CommandFailed as exc:
            text = exc.stdout + exc.stderr
            m = re.search(r"(?:No match for argument|Unable to find a match): (\S+)", text)
            if m:
                raise FallbackFailed.before_install(
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
            if "Curl error" in text or "Status code" in text:
                raise FallbackFailed.before_install(
                    "dnf install could not download: %s" % explain(text, self.env)
                ) from None
            raise FallbackFailed("dnf install failed: %s" % exc.summary) from None
        self.log.info("packages installed", packages=list(names), from_local_repo=offline)
        return list(names)

    def install_compiler(self) -> List[str]:
        """The gcc the kernel was built with, when the image's gcc is another version."""
        kernel = self.kernel
        text = kernel_compiler_text(self.paths, kernel, self.runner)
        want = compiler_version(text)
        if not want:
            self.log.warning("cannot tell which compiler built the kernel: keeping the image's", kernel=kernel)
            return []
        have = present_compiler_version(self.runner, "gcc")
        if have == want:
            self.log.info("the image's gcc is the kernel's", version=have, kernel_compiler=text)
            return []
        if self.offline and "gcc-%s" % want not in self.local_packages():
            self.log.warning(
                "the node-local repository has not the kernel's gcc: keeping the image's",
                wanted="gcc-%s" % want,
                image_gcc=have or "none",
            )
            return []
        self.log.info("installing the kernel's gcc", kernel_compiler=text, image_gcc=have or "none")
        return self._dnf_install(["gcc-%s" % want])
