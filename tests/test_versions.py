"""Version arithmetic against the real tools: rpm's rpm.vercmp (Lua) and
``dpkg --compare-versions`` are the oracles, on thousands of generated pairs."""

from __future__ import annotations

import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import need_tool
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from driver_ctr.toolkit.errors import InvalidValue
from driver_ctr.toolkit.versions import (
    compare_kernel_releases,
    dpkg_compare,
    normalize_arch,
    parse_driver_version,
    parse_kernel_release,
    rhel_version_from_kernel,
    rpm_evr_compare,
    rpmvercmp,
)

PAIRS = 2500  # per oracle
DIGITS = "0123456789"
LETTERS = "abcxyzABXYZ"

# -- generators ----------------------------------------------------------------

_rpm_segment = st.one_of(
    st.text(DIGITS, min_size=1, max_size=4),
    st.builds(lambda z, d: z + d, st.text("0", min_size=1, max_size=3), st.text(DIGITS, max_size=2)),
    st.text(LETTERS, min_size=1, max_size=4),
    st.sampled_from(["el9_4", "rc1", "alpha", "beta2", "git1234", "fc38", "x86_64"]),
)
_rpm_sep = st.sampled_from([".", ".", ".", "_", "+", "~", "^", "", "~~", "^~", "-.", "%"])


@st.composite
def rpm_version(draw: st.DrawFn) -> str:
    n = draw(st.integers(min_value=0, max_value=6))
    parts = []
    for i in range(n):
        if i or draw(st.booleans()):
            parts.append(draw(_rpm_sep))
        parts.append(draw(_rpm_segment))
    if draw(st.integers(0, 5)) == 0:
        parts.append(draw(st.sampled_from(["~", "^", "."])))
    return "".join(parts).replace("-", "")


@st.composite
def rpm_evr(draw: st.DrawFn) -> str:
    s = ""
    if draw(st.integers(0, 3)) == 0:
        s += draw(st.text(DIGITS, max_size=2)) + ":"
    s += draw(rpm_version().filter(bool))
    if draw(st.booleans()):
        s += "-" + draw(rpm_version())
    return s


RPM_SUFFIXES = ["~", "^", ".0", "a", "1", "~rc1", "^1", ".", "0"]
DEB_SUFFIXES = ["~", "+", ".0", "a", "1", "~rc1", "+b1", ".", "0"]


def _near(strategy: st.SearchStrategy, suffixes=RPM_SUFFIXES) -> st.SearchStrategy:
    """Pairs that are often equal or close, so the comparisons are not all trivial."""

    @st.composite
    def pair(draw: st.DrawFn):
        a = draw(strategy)
        mode = draw(st.integers(0, 3))
        if mode == 0:
            return a, a
        if mode == 1:
            return a, a + draw(st.sampled_from(suffixes))
        return a, draw(strategy)

    return pair()


_DEB_CHARS = DIGITS + "abzAZ.+~"
_deb_up = st.builds(lambda a, b: a + b, st.sampled_from(DIGITS), st.text(_DEB_CHARS, max_size=10))
_deb_rev = st.text(_DEB_CHARS, min_size=1, max_size=8)


@st.composite
def deb_version(draw: st.DrawFn) -> str:
    s = ""
    if draw(st.integers(0, 3)) == 0:
        s += str(draw(st.integers(0, 3))) + ":"
    s += draw(_deb_up)
    if draw(st.booleans()):
        s += "-" + draw(_deb_rev)
    return s


# -- oracles -------------------------------------------------------------------


def rpm_oracle(pairs, tmp: Path, func: str = "rpm.vercmp") -> list:
    rpm = need_tool("rpm")
    data = tmp / "pairs.txt"
    data.write_text("".join("%s\t%s\n" % p for p in pairs))
    lua = (
        '%%{lua: for line in io.lines("%s") do local a, b = line:match("^(.-)\\t(.*)$"); '
        'io.write(%s(a, b), "\\n") end}' % (data, func)
    )
    out = subprocess.run([rpm, "--eval", lua], capture_output=True, text=True, check=True).stdout
    return [int(x) for x in out.split()]


def dpkg_oracle(a: str, b: str) -> int:
    if subprocess.run(["dpkg", "--compare-versions", a, "lt", b]).returncode == 0:
        return -1
    if subprocess.run(["dpkg", "--compare-versions", a, "eq", b]).returncode == 0:
        return 0
    return 1


def draw_pairs(strategy: st.SearchStrategy, n: int) -> list:
    """``n`` distinct pairs drawn by hypothesis (its generation, not its shrinking:
    the oracles are batched, and a failing pair is reported as it is)."""
    seen: dict = {}

    @settings(max_examples=n, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(strategy)
    def collect(pair):
        seen.setdefault(pair, None)

    collect()
    return list(seen)


@pytest.mark.slow
def test_rpm_evr_compare_matches_rpm(tmp_path):
    """rpm_evr_compare agrees with rpm.vercmp() (epoch, version, release) on every pair."""
    pairs = draw_pairs(_near(rpm_evr()), PAIRS)
    assert len(pairs) >= 2000
    expected = rpm_oracle(pairs, tmp_path)
    bad = [(p, rpm_evr_compare(*p), e) for p, e in zip(pairs, expected) if rpm_evr_compare(*p) != e]
    assert not bad, bad[:10]
    assert {-1, 0, 1} <= set(expected)


@pytest.mark.slow
def test_rpmvercmp_matches_rpm(tmp_path):
    """rpmvercmp agrees with rpm on bare version strings (no epoch, no release)."""
    pairs = draw_pairs(_near(rpm_version().filter(bool)), PAIRS)
    assert len(pairs) >= 2000
    expected = rpm_oracle(pairs, tmp_path)
    bad = [(p, rpmvercmp(*p), e) for p, e in zip(pairs, expected) if rpmvercmp(*p) != e]
    assert not bad, bad[:10]
    assert {-1, 0, 1} <= set(expected)


@pytest.mark.slow
def test_dpkg_compare_matches_dpkg():
    """dpkg_compare agrees with dpkg --compare-versions on every pair."""
    need_tool("dpkg")
    pairs = draw_pairs(_near(deb_version(), DEB_SUFFIXES), PAIRS)
    assert len(pairs) >= 2000
    with ThreadPoolExecutor(max_workers=4) as pool:
        expected = list(pool.map(lambda p: dpkg_oracle(*p), pairs))
    bad = [(p, dpkg_compare(*p), e) for p, e in zip(pairs, expected) if dpkg_compare(*p) != e]
    assert not bad, bad[:10]
    assert {-1, 0, 1} <= set(expected)


@pytest.mark.parametrize(
    "a,b,expected",
    [
        ("1.0~rc1", "1.0", -1),
        ("1.0^git1", "1.0", 1),
        ("1.0^git1", "1.0.1", -1),
        ("1.0~~", "1.0~", -1),
        ("1.010", "1.9", 1),
        ("1.a", "1.1", -1),
        ("2.0", "2_0", 0),
        ("5.14.0", "5.14.0", 0),
        ("427.13.1.el9_4", "427.18.1.el9_4", -1),
        ("305.25.1.el8_4", "305.28.1.el8_4", -1),
        ("233.el10", "224.el10", 1),
    ],
)
def test_rpmvercmp_table(a, b, expected, tmp_path):
    """Hand-picked cases, including the NVIDIA docs' broken-DTK example (305.25.1 < 305.28.1)."""
    assert rpmvercmp(a, b) == expected
    assert rpm_oracle([(a, b)], tmp_path) == [expected]


# -- kernel releases -------------------------------------------------------------

REAL_RELEASES = [
    # release, distro, version, release part, arch, flavour, rhel
    ("4.18.0-305.25.1.el8_4.x86_64", "rhel", "4.18.0", "305.25.1.el8_4", "x86_64", "none", "8.4"),
    ("4.18.0-372.9.1.el8.x86_64", "rhel", "4.18.0", "372.9.1.el8", "x86_64", "none", "8"),
    ("5.14.0-284.11.1.el9_2.x86_64", "rhel", "5.14.0", "284.11.1.el9_2", "x86_64", "none", "9.2"),
    ("5.14.0-284.11.1.el9_2.aarch64+64k", "rhel", "5.14.0", "284.11.1.el9_2", "aarch64", "64k", "9.2"),
    ("5.14.0-427.13.1.el9_4.x86_64", "rhel", "5.14.0", "427.13.1.el9_4", "x86_64", "none", "9.4"),
    ("5.14.0-427.18.1.el9_4.x86_64+rt", "rhel", "5.14.0", "427.18.1.el9_4", "x86_64", "rt", "9.4"),
    ("5.14.0-570.17.1.el9_6.x86_64", "rhel", "5.14.0", "570.17.1.el9_6", "x86_64", "none", "9.6"),
    ("5.14.0-427.el9.x86_64+debug", "rhel", "5.14.0", "427.el9", "x86_64", "debug", "9"),
    ("6.12.0-233.el10.x86_64", "rhel", "6.12.0", "233.el10", "x86_64", "none", "10"),
    ("6.12.0-55.9.1.el10_0.aarch64", "rhel", "6.12.0", "55.9.1.el10_0", "aarch64", "none", "10.0"),
    ("6.1.0-56-amd64", "debian", "6.1.0", "56", "x86_64", "none", None),
    ("6.1.0-56-rt-amd64", "debian", "6.1.0", "56", "x86_64", "rt", None),
    ("6.1.0-56-cloud-amd64", "debian", "6.1.0", "56", "x86_64", "none", None),
    ("6.12.95+deb12-amd64", "debian", "6.12.95", "deb12", "x86_64", "none", None),
    ("6.12.95+deb12-rt-amd64", "debian", "6.12.95", "deb12", "x86_64", "rt", None),
    ("6.8.0-45-generic", "ubuntu", "6.8.0", "45", None, "none", None),
    ("6.8.0-1012-nvidia-64k", "ubuntu", "6.8.0", "1012", None, "64k", None),
]


@pytest.mark.parametrize("raw,distro,version,release,arch,flavour,rhel", REAL_RELEASES)
def test_parse_kernel_release(raw, distro, version, release, arch, flavour, rhel):
    kr = parse_kernel_release(raw)
    assert (kr.distro, kr.version, kr.release, kr.arch, kr.flavour, kr.rhel_version) == (
        distro,
        version,
        release,
        arch,
        flavour,
        rhel,
    )
    assert str(kr) == raw


@pytest.mark.parametrize(
    "raw", ["", "5.14.0", "6.18.44-fc-v669", "5.14.0-427.13.1.el9_4", "linux", "5.14.0-427.el9.sparc"]
)
def test_parse_kernel_release_rejects_with_the_input_named(raw):
    with pytest.raises(InvalidValue) as exc:
        parse_kernel_release(raw)
    assert exc.value.name == "kernel release" and exc.value.value == raw
    assert "RHEL" in exc.value.expected


def test_rhel_kernel_base_strips_flavour():
    assert parse_kernel_release("5.14.0-427.18.1.el9_4.x86_64+rt").base == "5.14.0-427.18.1.el9_4.x86_64"


def test_compare_kernel_releases_rhel_and_debian():
    p = parse_kernel_release
    assert compare_kernel_releases(p("4.18.0-305.25.1.el8_4.x86_64"), p("4.18.0-305.28.1.el8_4.x86_64")) == -1
    assert compare_kernel_releases(p("6.12.0-233.el10.x86_64"), p("6.12.0-212.el10.x86_64")) == 1
    assert compare_kernel_releases(p("5.14.0-427.18.1.el9_4.x86_64+rt"), p("5.14.0-427.18.1.el9_4.x86_64")) == 0
    assert compare_kernel_releases(p("6.1.0-56-amd64"), p("6.1.0-9-amd64")) == 1
    assert compare_kernel_releases(p("6.12.95+deb12-amd64"), p("6.1.0-56-amd64")) == 1
    with pytest.raises(InvalidValue):
        compare_kernel_releases(p("6.1.0-56-amd64"), p("5.14.0-427.13.1.el9_4.x86_64"))


@pytest.mark.parametrize(
    "release,fallback,expected",
    [
        ("5.14.0-427.13.1.el9_4.x86_64", None, (9, 4)),
        ("4.18.0-305.25.1.el8_4.x86_64", None, (8, 4)),
        ("6.12.0-233.el10.x86_64", None, (10, None)),
        ("6.1.0-56-amd64", 9, (9, None)),
    ],
)
def test_rhel_version_from_kernel(release, fallback, expected):
    assert rhel_version_from_kernel(release, fallback) == expected


def test_rhel_version_from_kernel_without_fallback_names_the_release():
    with pytest.raises(InvalidValue) as exc:
        rhel_version_from_kernel("6.1.0-56-amd64")
    assert exc.value.value == "6.1.0-56-amd64"


def test_driver_version_and_branch():
    dv = parse_driver_version("535.261.03")
    assert (dv.branch, dv.minor, dv.patch, str(dv)) == (535, 261, 3, "535.261.03")
    assert parse_driver_version("580.82").patch is None
    for bad in ["", "535", "535.x.1", "v535.1.1", "535.261.03.1"]:
        with pytest.raises(InvalidValue):
            parse_driver_version(bad)


def test_normalize_arch():
    assert normalize_arch("amd64") == "x86_64"
    assert normalize_arch("arm64") == "aarch64"
    with pytest.raises(InvalidValue):
        normalize_arch("mips")
