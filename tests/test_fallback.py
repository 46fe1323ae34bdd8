"""The entitlement-based fallback (issue 12, first part: the apt backend and the node-local repository).

The node kernel's trees are installed into the container's root by the node OS's package manager, then
the same kbuild builder runs. Fast tests use real .debs built at test time (dpkg-deb) in a node-local
repository (no network); the slow one fetches a real Debian kernel's packages from the archive and runs
``nvidia-driver init`` end to end up to this machine's kernel refusing modules.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import List

import pytest
from conftest import need_tool
from fakes import FakeRunner
from harness import copy_fixture_sources, env_for, installed_kernel, nvd

from driver_ctr.fallback import backend_for, install_kernel_tree, node_family
from driver_ctr.fallback.apt import AptBackend
from driver_ctr.fallback.base import FallbackFailed
from driver_ctr.fallback.dnf import DnfBackend, kernel_package_names, preflight, rhel_releasevers
from driver_ctr.fallback.node_os import NodeOS, parse_os_release
from driver_ctr.toolkit.log import get_logger
from driver_ctr.toolkit.runner import Runner
from driver_ctr.toolkit.settings import Settings

DEBIAN = 'PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nID=debian\nVERSION_ID="12"\n'
UBUNTU = 'NAME="Ubuntu"\nID=ubuntu\nID_LIKE=debian\nVERSION_ID="22.04"\n'
RHCOS = 'NAME="Red Hat Enterprise Linux CoreOS"\nID="rhcos"\nID_LIKE="rhel fedora"\nVERSION_ID="4.16"\n'


def _settings(root: Path, **env: str) -> Settings:
    return Settings.from_env(
        dict({"DRIVER_VERSION": "535.261.03", "TARGETARCH": "amd64", "DRIVER_CTR_ROOT": str(root)}, **env)
    )


class Recording(Runner):
    """The real runner, remembering every argv (to show what did not run)."""

    def __init__(self) -> None:
        super().__init__()
        self.argvs: List[List[str]] = []

    def run(self, argv, **kw):  # type: ignore[override]
        self.argvs.append([str(a) for a in argv])
        return super().run(argv, **kw)


@pytest.mark.parametrize("text, family", [(DEBIAN, "debian"), (UBUNTU, "debian"), (RHCOS, "rhel"), ('ID="sles"\n', "")])
def test_the_node_os_decides_the_backend_family(text, family):
    f = parse_os_release(text)
    assert NodeOS(f.get("ID", ""), f.get("VERSION_ID", ""), tuple(f.get("ID_LIKE", "").split())).family() == family


def test_without_os_release_the_kernel_release_decides(root):
    s = _settings(root)
    assert node_family(s, "6.1.0-57-amd64") == "debian"
    assert node_family(s, "5.14.0-427.13.1.el9_4.x86_64") == "rhel"
    assert isinstance(backend_for(s, "5.14.0-427.13.1.el9_4.x86_64", Runner(), get_logger()), DnfBackend)
    (root / "host-etc").mkdir()
    (root / "host-etc/os-release").write_text(UBUNTU)
    assert isinstance(backend_for(s, "5.14.0-427.13.1.el9_4.x86_64", Runner(), get_logger()), AptBackend)


def test_apt_picks_the_headers_their_own_kind_and_the_module_package():
    k = "6.1.0-57-amd64"
    fake = FakeRunner()
    fake.expect(("apt-cache", "show", "--no-all-versions", "linux-headers-" + k), stdout="Package: linux-headers\n")
    fake.expect(
        ("apt-cache", "depends"),
        stdout="linux-headers-%s\n  Depends: linux-headers-6.1.0-57-common\n"
        "  Depends: linux-kbuild-6.1\n  Depends: linux-compiler-gcc-12-x86\n" % k,
    )
    fake.expect(("apt-cache", "show", "--no-all-versions", "linux-modules-" + k), returncode=100)
    fake.expect(("apt-cache", "show", "--no-all-versions", "linux-image-" + k), stdout="Package: linux-image\n")
    apt = AptBackend(Path("/nonexistent"), fake, {}, get_logger())
    assert apt.kernel_packages(k) == [
        "linux-headers-" + k,
        "linux-headers-6.1.0-57-common",
        "linux-kbuild-6.1",
        "linux-image-" + k,
    ]


def test_a_kernel_the_sources_do_not_carry_is_named_with_the_likely_cause():
    fake = FakeRunner()
    fake.expect(("apt-cache", "show"), returncode=100)
    with pytest.raises(FallbackFailed) as exc:
        AptBackend(Path("/nonexistent"), fake, {}, get_logger()).kernel_packages("6.1.0-12-amd64")
    msg = str(exc.value)
    assert "no package linux-headers-6.1.0-12-amd64 in apt's configured sources" in msg
    assert "snapshot.debian.org" in msg and "DRIVER_CTR_LOCAL_REPO" in msg


def _deb(repo: Path, name: str, files: dict, links: dict = None) -> None:
    """A real .deb holding ``files`` (path -> text) and ``links`` (path -> target)."""
    tree = repo / ("build-" + name)
    for rel, text in files.items():
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        (tree / rel).write_text(text)
    for rel, target in (links or {}).items():
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        (tree / rel).symlink_to(target)
    (tree / "DEBIAN").mkdir(parents=True)
    (tree / "DEBIAN/control").write_text(
        "Package: %s\nVersion: 1.0\nArchitecture: amd64\nMaintainer: test <t@t>\n"
        "Description: driver-ctr test package\n" % name
    )
    subprocess.run(
        ["dpkg-deb", "--build", "--root-owner-group", str(tree), str(repo / (name + ".deb"))],
        check=True,
        capture_output=True,
    )
    shutil.rmtree(tree)


def test_the_node_local_repository_is_used_first_with_no_network(root, tmp_path):
    need_tool("dpkg-deb")
    k = "6.1.0-99-amd64"
    repo = tmp_path / "repo"
    repo.mkdir()
    _deb(
        repo,
        "linux-headers-" + k,
        {"usr/src/linux-headers-%s/Makefile" % k: "# kbuild\n"},
        {"lib/modules/%s/build" % k: "/usr/src/linux-headers-" + k},
    )
    _deb(repo, "linux-headers-6.1.0-99-common", {"usr/src/linux-headers-6.1.0-99-common/Makefile": "# common\n"})
    _deb(repo, "linux-image-" + k, {"lib/modules/%s/modules.builtin" % k: "", "lib/modules/%s/modules.order" % k: ""})
    (root / "host-etc").mkdir()
    (root / "host-etc/os-release").write_text(DEBIAN)
    runner = Recording()
    s = _settings(root, DRIVER_CTR_LOCAL_REPO="/repo")
    shutil.move(str(repo), str(root / "repo"))  # a hostPath: re-rooted like every host path
    installed = install_kernel_tree(s, k, runner, get_logger())
    assert installed == ["linux-headers-" + k, "linux-headers-6.1.0-99-common", "linux-image-" + k]
    assert (root / "lib/modules" / k / "modules.dep").is_file()  # depmod ran on the unpacked tree
    assert (root / "usr/src/linux-headers-6.1.0-99-common/Makefile").is_file()
    assert not [a for a in runner.argvs if a[0].startswith("apt")], runner.argvs  # no index, no download


def test_a_tree_still_unusable_after_install_is_said_with_the_dtk_decisions_words(root, tmp_path):
    need_tool("dpkg-deb")
    k = "6.1.0-98-amd64"
    repo = root / "repo"
    repo.mkdir()
    _deb(
        repo,
        "linux-headers-" + k,
        {"usr/src/linux-headers-%s/README" % k: "no Makefile\n"},
        {"lib/modules/%s/build" % k: "/usr/src/linux-headers-" + k},
    )
    _deb(repo, "linux-image-" + k, {"lib/modules/%s/modules.builtin" % k: ""})
    (root / "host-etc").mkdir()
    (root / "host-etc/os-release").write_text(DEBIAN)
    with pytest.raises(FallbackFailed) as exc:
        install_kernel_tree(_settings(root, DRIVER_CTR_LOCAL_REPO="/repo"), k, Runner(), get_logger())
    assert "the kernel build tree is still unusable" in str(exc.value) and "has no Makefile" in str(exc.value)


@pytest.mark.slow
@pytest.mark.kbuild
def test_init_falls_back_to_apt_for_a_real_debian_kernel_and_builds(root, tmp_path):
    """No kernel tree in the container: init installs the node kernel's headers and modules from
    Debian's archive (apt-get download, unpacked), builds against them and reaches the load, which
    this machine's kernel refuses."""
    need_tool("apt-get")
    kernel = installed_kernel(r"6\.1\.0-\d+-amd64")  # the archive's current 6.1: its packages are there
    (root / "host-etc").mkdir()
    (root / "host-etc/os-release").write_text(DEBIAN)
    src = copy_fixture_sources(tmp_path / "src")
    env = env_for(root, kernel, DRIVER_CTR_SOURCE_DIR=str(src), TMPDIR=str(tmp_path))
    env["PATH"] = env["PATH"] + ":/sbin:/usr/sbin"
    r = nvd(env, "init", "-m", "1", timeout=1800)
    assert r.returncode == 1, r.stderr[-3000:]
    err = r.stderr
    assert "falling back to the entitlement-based build" in err and "NVIDIA does not support entitled builds" in err
    unpacked = re.search(r'"packages": \[([^\]]*)\].*"event": "kernel packages unpacked"', err)
    assert unpacked and "linux-headers-%s" % kernel in unpacked.group(1) and "linux-image-%s" % kernel in err
    assert (root / "lib/modules" / kernel / "modules.dep").is_file()
    assert '"phase": "local build", "outcome": "ok"' in err  # built against what apt unpacked
    assert "could not load nvidia: the kernel refused module loading" in err  # the VM tier loads for real


# -- dnf (RHEL, RHCOS nodes) ----------------------------------------------------------------

RHEL_K = "5.14.0-427.13.1.el9_4.x86_64"


def _entitle(root: Path, cert=True, repo=True, ca=True) -> None:
    if cert:
        (root / "etc/pki/entitlement").mkdir(parents=True)
        (root / "etc/pki/entitlement/123.pem").write_text("cert")
        (root / "etc/pki/entitlement/123-key.pem").write_text("key")
    if repo:
        (root / "etc/yum.repos.d").mkdir(parents=True)
        (root / "etc/yum.repos.d/redhat.repo").write_text("[rhel]\n")
    if ca:
        (root / "etc/pki/ca-trust/extracted/pem").mkdir(parents=True)
        (root / "etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem").write_text("ca")


def test_dnf_preflight_names_everything_missing_and_runs_nothing(root):
    s = _settings(root, DRIVER_CTR_KERNEL_RELEASE=RHEL_K)
    assert len(preflight(s.paths)) == 3
    with pytest.raises(FallbackFailed) as exc:
        install_kernel_tree(s, RHEL_K, FakeRunner(), get_logger())  # any command would fail the test
    msg = str(exc.value)
    assert "the entitled build cannot start (dnf)" in msg and "no entitlement certificate" in msg
    assert "redhat.repo" in msg and "tls-ca-bundle.pem" in msg
    _entitle(root)
    assert preflight(s.paths) == []


@pytest.mark.parametrize(
    "kernel, names",
    [
        (RHEL_K, ["kernel-headers-" + RHEL_K, "kernel-devel-" + RHEL_K, "kernel-core-" + RHEL_K]),
        (RHEL_K + "+rt", ["kernel-headers-" + RHEL_K, "kernel-rt-devel-" + RHEL_K, "kernel-rt-core-" + RHEL_K]),
        (
            "5.14.0-427.13.1.el9_4.aarch64+64k",
            [
                "kernel-headers-5.14.0-427.13.1.el9_4.aarch64",
                "kernel-64k-devel-5.14.0-427.13.1.el9_4.aarch64",
                "kernel-64k-core-5.14.0-427.13.1.el9_4.aarch64",
            ],
        ),
    ],
)
def test_dnf_installs_exactly_the_node_kernels_packages(kernel, names):
    assert kernel_package_names(kernel) == names + ["elfutils-libelf-devel"]


def test_releasevers_from_the_setting_else_the_kernels_minor_then_the_major():
    assert rhel_releasevers(RHEL_K, "") == ["9.4", "9"]
    assert rhel_releasevers(RHEL_K, "9.2") == ["9.2", "9"]
    assert rhel_releasevers("5.14.0-570.12.1.el9_6.x86_64", "9") == ["9"]


class CDN(Runner):
    """Answers dnf as a CDN would: rhocp is not entitled here; EUS serves only when ``eus``;
    releasever 9.4 metadata exists only with EUS; ``missing`` is a package it does not have."""

    def __init__(self, eus: bool, missing: str = "") -> None:
        super().__init__()
        self.eus, self.missing, self.argvs = eus, missing, []

    def run(self, argv, **kw):  # type: ignore[override]
        from driver_ctr.toolkit.errors import CommandFailed
        from driver_ctr.toolkit.runner import Result

        argv = [str(a) for a in argv]
        self.argvs.append(argv)
        repos = " ".join(a for a in argv if a.startswith("--enablerepo="))
        if "makecache" in argv:
            bad = (
                "rhocp" in repos
                or ("eus" in repos and not self.eus)
                or ("--releasever=9.4" in argv and "eus" not in repos)
            )
            r = Result(
                tuple(argv), 1 if bad else 0, "", "Status code: 403 for https://cdn.redhat.com/..." if bad else ""
            )
        elif "install" in argv:
            if self.missing and self.missing in argv:
                raise CommandFailed(
                    argv, 1, "", "No match for argument: %s\nError: Unable to find a match" % self.missing
                )
            r = Result(tuple(argv), 0, "", "")
        else:
            raise AssertionError("unexpected command %r" % argv)
        return r


@pytest.mark.parametrize("eus, releasever, repos", [(True, "9.4", ["baseos-eus", "appstream-eus"]), (False, "9", [])])
def test_the_repository_ladder_keeps_what_works_and_says_why_it_moved_on(root, eus, releasever, repos):
    _entitle(root)
    cdn = CDN(eus)
    dnf = DnfBackend(_settings(root).paths, cdn, {}, get_logger(), RHEL_K, "x86_64", openshift_version="4.16")
    dnf.refresh()
    assert dnf.releasever == releasever
    assert [r.split("-for-")[1].replace("x86_64-", "").replace("-rpms", "") for r in dnf.repos] == repos
    assert any("rhocp-4.16-for-rhel-9-x86_64-rpms" in a for argv in cdn.argvs for a in argv)  # tried first
    assert any("rhocp-4.16-for-rhel-9-x86_64-rpms with releasever 9.4: Status code: 403" in t for t in dnf.tried)
    assert all("--installroot=%s" % root in argv for argv in cdn.argvs)


def test_a_package_the_repositories_lack_is_named_with_what_was_searched(root):
    _entitle(root)
    missing = "kernel-devel-" + RHEL_K
    dnf = DnfBackend(_settings(root).paths, CDN(True, missing), {}, get_logger(), RHEL_K, "x86_64")
    dnf.refresh()
    with pytest.raises(FallbackFailed) as exc:
        dnf.install(kernel_package_names(RHEL_K))
    msg = str(exc.value)
    assert "no package %s for kernel %s" % (missing, RHEL_K) in msg
    assert "rhel-9-for-x86_64-baseos-eus-rpms" in msg and "releasevers tried: 9.4, 9" in msg
    assert "EUS repositories are not enabled" in msg


def _rhel_node(root: Path, certs: dict, url: str, entitlement: str = "entitlement") -> None:
    """The driver container of a RHEL node: os-release, the entitlement pair, redhat.repo, the CA bundle."""
    (root / "host-etc").mkdir(parents=True, exist_ok=True)
    (root / "host-etc/os-release").write_text('ID="rhel"\nVERSION_ID="9.4"\n')
    ent = root / "etc/pki/entitlement"
    ent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(str(certs[entitlement + ".pem"]), str(ent / "123.pem"))
    shutil.copy2(str(certs[entitlement + "-key.pem"]), str(ent / "123-key.pem"))
    ca = root / "etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem"
    ca.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(str(certs["ca.pem"]), str(ca))
    repos = root / "etc/yum.repos.d"
    repos.mkdir(parents=True, exist_ok=True)
    (repos / "redhat.repo").write_text(
        "[rhel-9-for-x86_64-baseos-rpms]\nname=CDN stand-in\nbaseurl=%s\nenabled=1\ngpgcheck=0\nsslverify=1\n"
        "sslcacert=%s\nsslclientcert=%s\nsslclientkey=%s\n" % (url, ca, ent / "123.pem", ent / "123-key.pem")
    )


def _dnf_tools() -> None:
    for tool in ("dnf", "rpmbuild", "createrepo_c", "openssl", "depmod"):
        if not shutil.which(tool) and not Path("/sbin/" + tool).exists():
            pytest.skip("%s is not installed (scripts/test installs it)" % tool)


@pytest.mark.slow
@pytest.mark.kbuild
def test_init_falls_back_to_dnf_with_the_entitlement_certificate_and_builds(root, tmp_path):
    """A RHEL node without a kernel tree: dnf, with the entitlement certificate, installs the kernel's
    packages from a CDN stand-in that refuses clients without one; the build runs against them."""
    _dnf_tools()
    import entitled_repo

    kernel = installed_kernel(r"6\.1\.0-\d+-amd64")  # the trees come from this machine's kernel
    repo = entitled_repo.kernel_rpms(kernel)
    certs = entitled_repo.certificates(tmp_path / "pki")
    src = copy_fixture_sources(tmp_path / "src")
    env = env_for(root, kernel, DRIVER_CTR_SOURCE_DIR=str(src), TMPDIR=str(tmp_path))
    env["PATH"] = env["PATH"] + ":/sbin:/usr/sbin"
    with entitled_repo.serve(repo, certs) as url:
        _rhel_node(root, certs, url)
        r = nvd(env, "init", "-m", "1", timeout=1200)
    err = r.stderr
    assert r.returncode == 1, err[-3000:]
    assert "falling back to the entitlement-based build" in err and '"event": "dnf metadata ready"' in err
    assert "could not load nvidia: the kernel refused module loading" in err, err[-3000:]  # built, then refused
    assert '"phase": "local build", "outcome": "ok"' in err
    assert (root / "lib/modules" / kernel / "modules.dep").is_file()
    assert (root / "lib/modules" / kernel / "build").is_symlink()


@pytest.mark.slow
def test_a_certificate_the_cdn_refuses_is_reported_as_an_entitlement_problem(root, tmp_path):
    _dnf_tools()
    import entitled_repo

    kernel = installed_kernel(r"6\.1\.0-\d+-amd64")
    repo = entitled_repo.kernel_rpms(kernel)
    certs = entitled_repo.certificates(tmp_path / "pki")
    with entitled_repo.serve(repo, certs) as url:
        _rhel_node(root, certs, url, entitlement="wrong")
        s = _settings(root, DRIVER_CTR_KERNEL_RELEASE=kernel)
        with pytest.raises(FallbackFailed) as exc:
            install_kernel_tree(s, kernel, Runner(), get_logger())
    msg = str(exc.value)
    assert "dnf could not update its metadata with releasevers" in msg and "entitlement problem" in msg
    assert not (root / "lib/modules" / kernel).exists()  # nothing half-installed


def test_a_proxy_password_in_a_package_manager_failure_never_reaches_the_user(root, tmp_path):
    """apt-get fails and prints the proxy it used, credentials included: the error the CLI prints hides them."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for tool, script in (
        ("apt-get", "echo 'E: Failed to fetch http://mirror/x via http://u:s3cret@proxy:3128' >&2; exit 100"),
        ("apt-cache", "exit 0"),
        ("dpkg-deb", "exit 0"),
    ):
        (bindir / tool).write_text("#!/bin/sh\n%s\n" % script)
        (bindir / tool).chmod(0o755)
    (root / "host-etc").mkdir()
    (root / "host-etc/os-release").write_text(DEBIAN)
    src = copy_fixture_sources(tmp_path / "src")
    env = env_for(root, "6.1.0-57-amd64", HTTP_PROXY="http://u:s3cret@proxy:3128", DRIVER_CTR_SOURCE_DIR=str(src))
    env["PATH"] = "%s:%s" % (bindir, env["PATH"])
    r = nvd(env, "init")
    assert r.returncode == 1
    assert "apt-get update failed" in r.stderr and "http://***@proxy:3128" in r.stderr
    assert "s3cret" not in r.stderr + r.stdout
