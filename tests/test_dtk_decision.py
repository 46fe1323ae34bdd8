"""The broken-DTK decision as a pure function of what was read."""

from __future__ import annotations

from harness import RHEL_KERNEL, make_dtk_image

from driver_ctr.toolkit.dtk_decision import BROKEN, USABLE, DtkFacts, decide, inspect_dtk
from driver_ctr.toolkit.paths import HostPaths

TREE = "/usr/src/kernels/x"


def facts(rj, tree=TREE, vmlinuz=True):
    return DtkFacts(release_json=rj, build_tree=tree, build_tree_problem="" if tree else "missing", vmlinuz=vmlinuz)


def test_matching_dtk_is_usable():
    d = decide(RHEL_KERNEL, facts({"KERNEL_VERSION": RHEL_KERNEL, "RHEL_VERSION": "9.4"}))
    assert d.verdict == USABLE and d.newer == "same" and not d.reasons and d.rhel_version == "9.4"


def test_docs_example_broken_dtk():
    """NVIDIA docs' broken-DTK example: node 305.25.1, package 305.28.1 (4.8.19)."""
    d = decide(
        "4.18.0-305.25.1.el8_4.x86_64",
        facts({"KERNEL_VERSION": "4.18.0-305.28.1.el8_4.x86_64"}),
        rhcos_version="48.84.202110270303-0",
    )
    assert d.verdict == BROKEN and d.newer == "dtk"
    assert "4.18.0-305.25.1.el8_4.x86_64" in d.reasons[0] and "4.18.0-305.28.1.el8_4.x86_64" in d.reasons[0]
    assert d.rhcos_version == "48.84.202110270303-0"


def test_okd_stale_dtk_is_older():
    """okd#2350: DTK 6.12.0-212.el10 on nodes with -233: stale label cause."""
    d = decide("6.12.0-233.el10.x86_64", facts({"KERNEL_VERSION": "6.12.0-212.el10.x86_64"}))
    assert d.verdict == BROKEN and d.newer == "node" and "OSTREE_VERSION" in d.likely_cause


def test_rt_uses_rt_package_and_64k_uses_kernel_package():
    rt = "5.14.0-427.18.1.el9_4.x86_64+rt"
    ok = decide(rt, facts({"KERNEL_VERSION": "5.14.0-427.18.1.el9_4.x86_64", "RT_KERNEL_VERSION": rt}))
    assert ok.verdict == USABLE
    stale_rt = decide(
        rt,
        facts(
            {"KERNEL_VERSION": "5.14.0-427.18.1.el9_4.x86_64", "RT_KERNEL_VERSION": "5.14.0-427.13.1.el9_4.x86_64+rt"}
        ),
    )
    assert stale_rt.verdict == BROKEN and "RT_KERNEL_VERSION" in stale_rt.reasons[0]
    k64 = decide("5.14.0-284.11.1.el9_2.aarch64+64k", facts({"KERNEL_VERSION": "5.14.0-284.11.1.el9_2.aarch64"}))
    assert k64.verdict == USABLE
    wrong_arch = decide("5.14.0-284.11.1.el9_2.aarch64+64k", facts({"KERNEL_VERSION": "5.14.0-284.11.1.el9_2.x86_64"}))
    assert wrong_arch.verdict == BROKEN


def test_missing_build_tree_is_broken_even_when_versions_match():
    d = decide(RHEL_KERNEL, facts({"KERNEL_VERSION": RHEL_KERNEL}, tree=None))
    assert d.verdict == BROKEN and "no kernel build tree" in d.reasons[0]


def test_missing_vmlinuz_alone_is_only_a_note():
    """The reference's only check; the build does not need vmlinuz."""
    d = decide(RHEL_KERNEL, facts({"KERNEL_VERSION": RHEL_KERNEL}, vmlinuz=False))
    assert d.verdict == USABLE and any("vmlinuz" in n for n in d.notes)


def test_inspect_reads_trees_under_root(tmp_path):
    make_dtk_image(tmp_path)
    f = inspect_dtk(HostPaths(root=str(tmp_path)), RHEL_KERNEL)
    assert f.build_tree == str(tmp_path / "usr/src/kernels" / RHEL_KERNEL)
    assert f.vmlinuz and f.release_json["KERNEL_VERSION"] == RHEL_KERNEL
    assert decide(RHEL_KERNEL, f).verdict == USABLE
    # build -> a directory without a Makefile is not a kernel-devel tree
    (tmp_path / "usr/src/kernels" / RHEL_KERNEL / "Makefile").unlink()
    f2 = inspect_dtk(HostPaths(root=str(tmp_path)), RHEL_KERNEL)
    assert f2.build_tree is None and "no Makefile" in f2.build_tree_problem
    assert f2.usr_src_kernel
    assert any("kernel-devel is installed" in n for n in decide(RHEL_KERNEL, f2).notes)


def test_debian_releases_keep_their_deb_suffix():
    """``+deb12`` is part of a Debian release, not a RHEL flavour to strip."""
    k = "6.12.95+deb12-amd64"
    facts = DtkFacts(release_json={"KERNEL_VERSION": k}, build_tree="/usr/src/linux-headers-" + k, vmlinuz=True)
    d = decide(k, facts)
    assert not d.broken, d.reasons
    other = decide(k, DtkFacts(release_json={"KERNEL_VERSION": "6.12.117+deb12-amd64"}, build_tree="/x", vmlinuz=True))
    assert other.broken and other.newer == "dtk"
    assert any("6.12.95" in r and "6.12.117" in r for r in other.reasons)
