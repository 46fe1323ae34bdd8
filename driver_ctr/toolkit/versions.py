"""Version arithmetic: rpm and dpkg comparison, kernel releases, driver versions.

Pure functions only, Python 3.9, standard library. The comparison functions
follow rpm's ``rpmvercmp``/``rpmverCmp`` and dpkg's ``verrevcmp`` letter for
letter; the tests use the real ``rpm`` and ``dpkg`` binaries as oracles.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, Tuple

from .errors import InvalidValue

__all__ = [
    "rpmvercmp",
    "rpm_evr_compare",
    "dpkg_compare",
    "KernelRelease",
    "parse_kernel_release",
    "compare_kernel_releases",
    "rhel_version_from_kernel",
    "DriverVersion",
    "parse_driver_version",
    "normalize_arch",
]


def _sign(n: int) -> int:
    return (n > 0) - (n < 0)


# --------------------------------------------------------------------------
# rpm


def _rpm_isalnum(c: str) -> bool:
    # rpm's risalnum() is ASCII-only, unlike str.isalnum().
    return ("0" <= c <= "9") or ("a" <= c <= "z") or ("A" <= c <= "Z")


def _rpm_isdigit(c: str) -> bool:
    return "0" <= c <= "9"


def _rpm_isalpha(c: str) -> bool:
    return ("a" <= c <= "z") or ("A" <= c <= "Z")


def rpmvercmp(a: str, b: str) -> int:
    """Compare two version (or release) strings exactly as rpm's rpmvercmp().

    Returns -1, 0 or 1. ``~`` sorts before anything, ``^`` after the base
    version, alphanumeric segments compare numerically or lexically, and a
    numeric segment is newer than an alphabetic one.
    """
    if a == b:
        return 0
    i, j = 0, 0
    la, lb = len(a), len(b)
    while i < la or j < lb:
        while i < la and not _rpm_isalnum(a[i]) and a[i] not in "~^":
            i += 1
        while j < lb and not _rpm_isalnum(b[j]) and b[j] not in "~^":
            j += 1
        ca = a[i] if i < la else ""
        cb = b[j] if j < lb else ""
        # Tilde sorts before everything else.
        if ca == "~" or cb == "~":
            if ca != "~":
                return 1
            if cb != "~":
                return -1
            i += 1
            j += 1
            continue
        # Caret: like tilde, but a string that ended is the older one.
        if ca == "^" or cb == "^":
            if not ca:
                return -1
            if not cb:
                return 1
            if ca != "^":
                return 1
            if cb != "^":
                return -1
            i += 1
            j += 1
            continue
        if not (ca and cb):
            break
        si, sj = i, j
        if _rpm_isdigit(a[si]):
            while si < la and _rpm_isdigit(a[si]):
                si += 1
            while sj < lb and _rpm_isdigit(b[sj]):
                sj += 1
            isnum = True
        else:
            while si < la and _rpm_isalpha(a[si]):
                si += 1
            while sj < lb and _rpm_isalpha(b[sj]):
                sj += 1
            isnum = False
        seg_a, seg_b = a[i:si], b[j:sj]
        if not seg_a:  # cannot happen, kept as rpm has it
            return -1
        if not seg_b:
            return 1 if isnum else -1
        if isnum:
            seg_a = seg_a.lstrip("0")
            seg_b = seg_b.lstrip("0")
            if len(seg_a) != len(seg_b):
                return 1 if len(seg_a) > len(seg_b) else -1
        if seg_a != seg_b:
            return 1 if seg_a > seg_b else -1
        i, j = si, sj
    ra = i >= la
    rb = j >= lb
    if ra and rb:
        return 0
    return -1 if ra else 1


def _split_evr(evr: str) -> Tuple[str, str, Optional[str]]:
    """Split ``[epoch:]version[-release]`` as rpm's rpmverParse() does."""
    epoch = ""
    rest = evr
    # rpm: the epoch is the leading run of digits before a ':'.
    k = 0
    while k < len(rest) and rest[k].isdigit():
        k += 1
    if k < len(rest) and rest[k] == ":":
        epoch = rest[:k]
        rest = rest[k + 1 :]
    release: Optional[str] = None
    if "-" in rest:
        dash = rest.rfind("-")
        rest, release = rest[:dash], rest[dash + 1 :]
    return epoch, rest, release


def rpm_evr_compare(a: str, b: str) -> int:
    """Compare ``[epoch:]version[-release]`` strings like rpm 4.18's ``rpm.vercmp()``.

    A missing or empty epoch is 0. With equal versions, releases compare with
    rpmvercmp when both sides have one; otherwise the side that has a release
    (even an empty one, ``1.0-``) is the newer, as the rpm oracle answers.
    An empty string is not a version (rpm rejects it too).
    """
    for s in (a, b):
        if not s:
            raise InvalidValue("rpm version", s, "a non-empty [epoch:]version[-release]")
    ea, va, ra = _split_evr(a)
    eb, vb, rb = _split_evr(b)
    na = int(ea) if ea else 0
    nb = int(eb) if eb else 0
    if na != nb:
        return 1 if na > nb else -1
    rc = rpmvercmp(va, vb)
    if rc:
        return rc
    if ra is not None and rb is not None:
        return rpmvercmp(ra, rb)
    if ra is None and rb is None:
        return 0
    return 1 if ra is not None else -1


# --------------------------------------------------------------------------
# dpkg


def _dpkg_order(c: str) -> int:
    if not c:
        return 0
    if "0" <= c <= "9":
        return 0
    if ("a" <= c <= "z") or ("A" <= c <= "Z"):
        return ord(c)
    if c == "~":
        return -1
    return ord(c) + 256


def _verrevcmp(a: str, b: str) -> int:
    i, j = 0, 0
    la, lb = len(a), len(b)

    def isdig(s: str, k: int) -> bool:
        return k < len(s) and "0" <= s[k] <= "9"

    while i < la or j < lb:
        first_diff = 0
        while (i < la and not isdig(a, i)) or (j < lb and not isdig(b, j)):
            ac = _dpkg_order(a[i] if i < la else "")
            bc = _dpkg_order(b[j] if j < lb else "")
            if ac != bc:
                return ac - bc
            i += 1
            j += 1
        while i < la and a[i] == "0":
            i += 1
        while j < lb and b[j] == "0":
            j += 1
        while isdig(a, i) and isdig(b, j):
            if not first_diff:
                first_diff = ord(a[i]) - ord(b[j])
            i += 1
            j += 1
        if isdig(a, i):
            return 1
        if isdig(b, j):
            return -1
        if first_diff:
            return first_diff
    return 0


_DEB_UPSTREAM = re.compile(r"^[0-9][A-Za-z0-9.+~:-]*$")
_DEB_REVISION = re.compile(r"^[A-Za-z0-9.+~]+$")


def _dpkg_parse(v: str) -> Tuple[int, str, str]:
    v = v.strip()
    epoch = 0
    rest = v
    if ":" in rest:
        e, rest = rest.split(":", 1)
        if not e.isdigit():
            raise InvalidValue("debian version", v, "an epoch of digits before ':'")
        epoch = int(e)
    revision = ""
    if "-" in rest:
        rest, revision = rest.rsplit("-", 1)
        if not revision:
            raise InvalidValue("debian version", v, "a non-empty revision after the last '-'")
    if not rest or not rest[0].isdigit():
        raise InvalidValue("debian version", v, "an upstream version starting with a digit")
    if not _DEB_UPSTREAM.match(rest) or (revision and not _DEB_REVISION.match(revision)):
        raise InvalidValue("debian version", v, "only letters, digits and . + ~ (- and : where dpkg allows them)")
    return epoch, rest, revision


def dpkg_compare(a: str, b: str) -> int:
    """Compare two Debian versions like ``dpkg --compare-versions``: -1, 0 or 1."""
    ea, va, ra = _dpkg_parse(a)
    eb, vb, rb = _dpkg_parse(b)
    if ea != eb:
        return 1 if ea > eb else -1
    rc = _verrevcmp(va, vb)
    if rc:
        return _sign(rc)
    return _sign(_verrevcmp(ra, rb))


# --------------------------------------------------------------------------
# architectures

_ARCH_ALIASES = {
    "amd64": "x86_64",
    "x86_64": "x86_64",
    "arm64": "aarch64",
    "aarch64": "aarch64",
    "ppc64le": "ppc64le",
    "s390x": "s390x",
}


def normalize_arch(arch: str) -> str:
    """amd64 -> x86_64, arm64 -> aarch64 (the reference's DRIVER_ARCH rule)."""
    try:
        return _ARCH_ALIASES[arch.strip().lower()]
    except KeyError:
        raise InvalidValue("architecture", arch, "one of amd64, arm64, x86_64, aarch64") from None


# --------------------------------------------------------------------------
# kernel releases

FLAVOURS = ("none", "rt", "64k", "debug")

_RHEL_RE = re.compile(
    r"^(?P<version>\d+\.\d+\.\d+)-(?P<release>\d[0-9A-Za-z._]*?\.el\d+[0-9A-Za-z._]*?)"
    r"\.(?P<arch>x86_64|aarch64|ppc64le|s390x)"
    r"(?:\+(?P<flavour>rt|64k|debug|64k-debug|rt-debug))?$"
)
# Debian: 6.1.0-56-amd64, 6.1.0-56-rt-amd64, 6.1.0-56-cloud-amd64,
# 6.12.95+deb12-amd64, 6.12.95+deb12-rt-amd64 (backports: no ABI number).
_DEBIAN_RE = re.compile(
    r"^(?P<version>\d+\.\d+(?:\.\d+)?)(?:-(?P<abi>\d+)|(?P<local>\+deb\d+(?:u\d+)?))"
    r"-(?:(?P<variant>rt|cloud)-)?(?P<arch>amd64|arm64|armmp|armmp-lpae|686-pae|686|s390x|ppc64el|riscv64)$"
)
# Ubuntu: 6.8.0-45-generic, 5.15.0-1050-aws, 6.8.0-1012-nvidia-64k, -lowlatency
_UBUNTU_RE = re.compile(r"^(?P<version>\d+\.\d+\.\d+)-(?P<abi>\d+)-(?P<variant>[a-z][a-z0-9]*(?:-[a-z0-9]+)*)$")


@dataclass(frozen=True)
class KernelRelease:
    """A parsed ``uname -r`` string.

    ``version`` is the upstream part (``5.14.0``); ``release`` the distribution
    part (``427.13.1.el9_4`` on RHEL, the ABI number on Debian/Ubuntu);
    ``flavour`` is one of :data:`FLAVOURS`; ``variant`` keeps the distribution's
    own flavour word (``amd64``, ``cloud-amd64``, ``generic``).
    """

    raw: str
    distro: str  # rhel | debian | ubuntu
    version: str
    release: str
    arch: Optional[str]
    flavour: str
    variant: str = ""
    rhel_major: Optional[int] = None
    rhel_minor: Optional[int] = None

    @property
    def version_release(self) -> str:
        """``version-release`` (the rpm V-R), e.g. ``5.14.0-427.13.1.el9_4``."""
        return "%s-%s" % (self.version, self.release)

    @property
    def base(self) -> str:
        """The release without the ``+flavour`` suffix (RHEL) — the rpm V-R.A."""
        if self.distro == "rhel":
            return "%s.%s" % (self.version_release, self.arch)
        return self.raw

    @property
    def rhel_version(self) -> Optional[str]:
        if self.rhel_major is None:
            return None
        if self.rhel_minor is None:
            return str(self.rhel_major)
        return "%d.%d" % (self.rhel_major, self.rhel_minor)

    def __str__(self) -> str:
        return self.raw


def parse_kernel_release(raw: str) -> KernelRelease:
    """Parse every ``uname -r`` form that occurs on the supported nodes.

    Raises :class:`InvalidValue` naming the string for anything else.
    """
    s = raw.strip()
    m = _RHEL_RE.match(s)
    if m:
        major, minor = rhel_version_from_kernel(m.group("release"))
        fl = m.group("flavour") or "none"
        if fl.endswith("-debug"):
            fl = fl.split("-")[0]  # 64k-debug: the page-size flavour decides the package
        return KernelRelease(
            raw=s,
            distro="rhel",
            version=m.group("version"),
            release=m.group("release"),
            arch=m.group("arch"),
            flavour=fl,
            variant=m.group("flavour") or "",
            rhel_major=major,
            rhel_minor=minor,
        )
    m = _DEBIAN_RE.match(s)
    if m:
        arch_word = m.group("arch")
        variant = (m.group("variant") + "-" if m.group("variant") else "") + arch_word
        arch = {"amd64": "x86_64", "arm64": "aarch64"}.get(arch_word, arch_word)
        if m.group("abi"):
            release = m.group("abi")
            version = m.group("version")
        else:
            release = m.group("local").lstrip("+")
            version = m.group("version")
        return KernelRelease(
            raw=s,
            distro="debian",
            version=version,
            release=release,
            arch=arch,
            flavour="rt" if m.group("variant") == "rt" else "none",
            variant=variant,
        )
    m = _UBUNTU_RE.match(s)
    if m:
        variant = m.group("variant")
        words = variant.split("-")
        if "64k" in words:
            fl = "64k"
        elif "realtime" in words or "rt" in words:
            fl = "rt"
        else:
            fl = "none"
        return KernelRelease(
            raw=s,
            distro="ubuntu",
            version=m.group("version"),
            release=m.group("abi"),
            arch=None,
            flavour=fl,
            variant=variant,
        )
    raise InvalidValue(
        "kernel release",
        raw,
        "a RHEL/RHCOS (5.14.0-427.13.1.el9_4.x86_64[+rt|+64k]), Debian "
        "(6.1.0-56-amd64, 6.12.95+deb12-amd64) or Ubuntu (6.8.0-45-generic) release",
    )


def compare_kernel_releases(a: KernelRelease, b: KernelRelease) -> int:
    """Order two kernels of the same distribution: -1, 0 or 1.

    RHEL kernels compare as rpm V-R (rpmvercmp); Debian and Ubuntu kernels as
    dpkg versions of ``version-release``. The flavour and arch are not part of
    the order: callers check them separately.
    """
    if a.distro != b.distro:
        raise InvalidValue("kernel release pair", "%s / %s" % (a.raw, b.raw), "two kernels of the same distribution")
    if a.distro == "rhel":
        return rpm_evr_compare(a.version_release, b.version_release)
    if a.release.isdigit() != b.release.isdigit():
        return dpkg_compare(a.version, b.version) or (1 if a.release.isdigit() else -1)
    return dpkg_compare(a.version_release, b.version_release)


_EL_MINOR = re.compile(r"el(\d+)_(\d+)")
_EL_MAJOR = re.compile(r"\.el(\d+)(?![0-9])")


def rhel_version_from_kernel(release: str, fallback_major: Optional[int] = None) -> Tuple[int, Optional[int]]:
    """RHEL (major, minor) from a kernel release, the reference's ``elX_Y`` rule.

    ``5.14.0-427.13.1.el9_4.x86_64`` -> (9, 4). Without ``elX_Y`` (CentOS
    Stream, RHEL 10 ``6.12.0-233.el10``) the minor is unknown and the major
    comes from ``.elN``, else from ``fallback_major``; with neither, raises
    :class:`InvalidValue` naming the release.
    """
    m = _EL_MINOR.search(release)
    if m:
        return int(m.group(1)), int(m.group(2))
    m = _EL_MAJOR.search(release)
    if m:
        return int(m.group(1)), None
    if fallback_major is not None:
        return fallback_major, None
    raise InvalidValue("kernel release", release, "a RHEL kernel release containing elX_Y or .elX")


# --------------------------------------------------------------------------
# driver versions

_DRIVER_RE = re.compile(r"^((\d+)\.(\d+)(?:\.(\d+))?)(?:-([A-Za-z][A-Za-z0-9]*(?:-[A-Za-z0-9]+)*))?$")


@dataclass(frozen=True)
class DriverVersion:
    """A driver version as the operator and NVIDIA's images write it: ``535.261.03``, or with the image
    flavour NVIDIA's vGPU guest images add (``535.261.03-grid``, ``550.163.01-grid-aws``). ``raw`` names
    files (``NVIDIA-Linux-x86_64-535.261.03-grid.run``); ``number`` is what the modules carry
    (``modinfo -F version``)."""

    raw: str
    branch: int
    minor: int
    patch: Optional[int]
    number: str = ""
    suffix: str = ""  # grid, grid-aws, ...

    def __str__(self) -> str:
        return self.raw


def parse_driver_version(raw: str) -> DriverVersion:
    """``535.261.03`` -> branch 535; ``535.261.03-grid`` too. Raises :class:`InvalidValue` otherwise."""
    m = _DRIVER_RE.match(raw.strip())
    if not m:
        raise InvalidValue(
            "driver version", raw, "a version like 535.261.03 (branch.minor[.patch]), optionally -grid or -grid-<cloud>"
        )
    return DriverVersion(
        raw=raw.strip(),
        branch=int(m.group(2)),
        minor=int(m.group(3)),
        patch=int(m.group(4)) if m.group(4) is not None else None,
        number=m.group(1),
        suffix=m.group(5) or "",
    )
