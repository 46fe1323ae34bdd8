"""The entitlement-based fallback (issue 12, first part: the apt backend and the node-local repository).

The node kernel's trees are installed into the container's root by the node OS's package manager, then
the same kbuild builder runs. Fast tests use real .debs built at test time (dpkg-deb) in a node-local
repository (no network); the slow one fetches a real Debian kernel's packages from the archive and runs
``nvidia-driver init`` end to end up to this machine's kernel refusing modules.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import List, Optional

import pytest
from conftest import need_tool
from fakes import FakeRunner
from harness import (
    copy_fixture_sources,
    env_for,
    events,
    installed_kernel,
    make_real_kernel_root,
    make_shared_dir,
    nvd,
    path_with,
    run_both,
)

from driver_ctr.fallback import backend_for, family_of, install_kernel_tree, node_family
from driver_ctr.fallback.apt import AptBackend
from driver_ctr.fallback.base import FallbackFailed, Job
from driver_ctr.fallback.dnf import DnfBackend, kernel_package_names, preflight, rhel_releasevers
from driver_ctr.fallback.node_os import NodeOS, parse_os_release
from driver_ctr.toolkit.log import get_logger
from driver_ctr.toolkit.runner import Result, Runner
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

    def stream(self, argv, **kw):  # type: ignore[override]
        self.argvs.append([str(a) for a in argv])
        return super().stream(argv, **kw)


@pytest.mark.parametrize("text, family", [(DEBIAN, "debian"), (UBUNTU, "debian"), (RHCOS, "rhel"), ('ID="sles"\n', "")])
def test_the_node_os_decides_the_backend_family(text, family):
    f = parse_os_release(text)
    assert family_of(NodeOS(f.get("ID", ""), f.get("VERSION_ID", ""), tuple(f.get("ID_LIKE", "").split()))) == family


def test_without_os_release_the_kernel_release_decides(root):
    s = _settings(root)
    assert node_family(s, "6.1.0-57-amd64") == "debian"
    assert node_family(s, "5.14.0-427.13.1.el9_4.x86_64") == "rhel"
    assert isinstance(backend_for(s, "5.14.0-427.13.1.el9_4.x86_64", Runner(), get_logger()), DnfBackend)
    (root / "host-etc").mkdir()
    (root / "host-etc/os-release").write_text(UBUNTU)
    assert isinstance(backend_for(s, "5.14.0-427.13.1.el9_4.x86_64", Runner(), get_logger()), AptBackend)


def test_apt_picks_the_headers_their_own_kind_and_the_module_package(tmp_path):
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
    apt = AptBackend(Job(_settings(tmp_path), k, fake, get_logger()))
    assert apt.kernel_packages() == [
        "linux-headers-" + k,
        "linux-headers-6.1.0-57-common",
        "linux-kbuild-6.1",
        "linux-image-" + k,
    ]


def test_a_kernel_the_sources_do_not_carry_is_named_with_the_likely_cause(tmp_path):
    fake = FakeRunner()
    fake.expect(("apt-cache", "show"), returncode=100)
    with pytest.raises(FallbackFailed) as exc:
        AptBackend(Job(_settings(tmp_path), "6.1.0-12-amd64", fake, get_logger())).kernel_packages()
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


@pytest.mark.slow
@pytest.mark.kbuild
@pytest.mark.vm
def test_a_broken_dtk_on_a_debian_node_falls_back_to_apt_and_the_real_535_build_loads_in_the_vm(root, tmp_path):
    """The DTK stand-in carries bookworm-backports' 6.12 trees, the node runs 6.1: the DTK says it is broken,
    with both versions; the driver side installs the node kernel's headers and modules from Debian's
    archive, builds NVIDIA's real 535 proprietary modules against them, stores them in the host cache;
    ``nvidia-driver load`` in a VM booted with that kernel takes them from there and ends, as a machine
    without an NVIDIA GPU must, in the "no NVIDIA GPU" diagnosis."""
    need_tool("apt-get")
    from test_build_real import _sources

    node = installed_kernel(r"6\.1\.0-\d+-amd64")  # the archive's current 6.1: its packages are there
    dtk_kernel = installed_kernel(r"6\.12\.\d+\+deb12-amd64")
    make_real_kernel_root(root, dtk_kernel)  # what the DTK image holds
    (root / "var/lib/driver-ctr/cache").mkdir(parents=True)  # the node's hostPath
    (root / "host-etc").mkdir()
    (root / "host-etc/os-release").write_text(DEBIAN)
    env = env_for(
        root, node, DRIVER_CTR_SOURCE_DIR=str(_sources()), KERNEL_MODULE_TYPE="proprietary", TMPDIR=str(tmp_path)
    )
    env["PATH"] = env["PATH"] + ":/sbin:/usr/sbin"
    d, _ = run_both(root, env, timeout=2400)
    err = d.stderr
    assert d.returncode == 0, err[-3000:]
    broken = json.loads((make_shared_dir(root) / "driver_toolkit_broken").read_text())
    assert dtk_kernel in json.dumps(broken) and broken["node_kernel"] == node
    fell = next(e for e in events(err) if e["event"] == "falling back to the entitlement-based build")
    assert dtk_kernel in json.dumps(fell) and "NVIDIA does not support entitled builds" in fell["note"]
    unpacked = next(e for e in events(err) if e["event"] == "kernel packages unpacked")
    assert "linux-headers-" + node in unpacked["packages"] and "linux-image-" + node in unpacked["packages"]
    assert '"phase": "local build", "outcome": "ok"' in err
    guest_err, modules = _loads_in_the_vm(node, root, tmp_path, KERNEL_MODULE_TYPE="proprietary")
    assert "could not load nvidia: No such device (ENODEV)" in guest_err, guest_err[-3000:]
    assert "no NVIDIA GPU is visible to the kernel" in guest_err


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


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """The CDN stand-in's certificates: CA, server, entitlement, expired entitlement, a refused one."""
    need_tool("openssl")
    import entitled_repo

    return entitled_repo.certificates(tmp_path_factory.mktemp("pki"))


def _pair(root: Path, pki: dict, name: str) -> None:
    ent = root / "etc/pki/entitlement"
    shutil.copy2(str(pki[name + ".pem"]), str(ent / "123.pem"))
    shutil.copy2(str(pki[name + "-key.pem"]), str(ent / "123-key.pem"))


def test_dnf_preflight_names_everything_missing_and_runs_nothing(root, pki):
    s = _settings(root, DRIVER_CTR_KERNEL_RELEASE=RHEL_K)
    assert len(preflight(s.paths, FakeRunner())) == 3
    with pytest.raises(FallbackFailed) as exc:
        install_kernel_tree(s, RHEL_K, FakeRunner(), get_logger())  # any command would fail the test
    msg = str(exc.value)
    assert "the entitled build cannot start (dnf)" in msg and "no entitlement certificate" in msg
    assert "redhat.repo" in msg and "tls-ca-bundle.pem" in msg
    _entitle(root)  # files with the right names, not certificates
    problems = preflight(s.paths, Runner())
    assert problems == [
        "the entitlement key %s is not a PEM private key" % (root / "etc/pki/entitlement/123-key.pem"),
        "the entitlement certificate %s is not a readable PEM certificate" % (root / "etc/pki/entitlement/123.pem"),
    ]
    _pair(root, pki, "entitlement")
    assert preflight(s.paths, Runner()) == []


def test_an_expired_entitlement_is_named_with_its_end_date_before_any_dnf_call(root, pki):
    _entitle(root)
    _pair(root, pki, "expired")
    rec = Recording()
    with pytest.raises(FallbackFailed) as exc:
        install_kernel_tree(_settings(root, DRIVER_CTR_KERNEL_RELEASE=RHEL_K), RHEL_K, rec, get_logger())
    assert "the entitlement certificate %s expired on Jan  2 00:00:00 2020 GMT" % (
        root / "etc/pki/entitlement/123.pem"
    ) in str(exc.value)
    assert "renew the entitlement" in str(exc.value)
    assert [a[0] for a in rec.argvs] == ["openssl"]  # the check itself: no dnf, no network


def test_a_repository_file_dnf_would_skip_is_named_with_its_line(root, pki):
    """dnf skips a file it cannot parse and carries on with no repository at all (exit 0): the preflight says so."""
    _entitle(root)
    _pair(root, pki, "entitlement")
    (root / "etc/yum.repos.d/mirror.repo").write_text("[mirror]\nbaseurl=https://m/\nthis line has no value\n")
    problems = preflight(_settings(root).paths, Runner())
    assert len(problems) == 1
    assert "the repository file %s does not parse" % (root / "etc/yum.repos.d/mirror.repo") in problems[0]
    assert "[line  3]" in problems[0] and "this line has no value" in problems[0]


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
    dnf = DnfBackend(Job(_settings(root, OPENSHIFT_VERSION="4.16"), RHEL_K, cdn, get_logger()))
    dnf.refresh()
    assert dnf.releasever == releasever
    assert [r.split("-for-")[1].replace("x86_64-", "").replace("-rpms", "") for r in dnf.repos] == repos
    assert any("rhocp-4.16-for-rhel-9-x86_64-rpms" in a for argv in cdn.argvs for a in argv)  # tried first
    rhocp = next(t for t in dnf.tried if t.startswith("rhocp-4.16-for-rhel-9-x86_64-rpms with releasever 9.4: "))
    assert "refused this client (403/401)" in rhocp and "Status code: 403" in rhocp
    assert all("--installroot=%s" % root in argv for argv in cdn.argvs)


def test_a_package_the_repositories_lack_is_named_with_what_was_searched(root):
    _entitle(root)
    missing = "kernel-devel-" + RHEL_K
    dnf = DnfBackend(Job(_settings(root), RHEL_K, CDN(True, missing), get_logger()))
    dnf.refresh()
    with pytest.raises(FallbackFailed) as exc:
        dnf.install(kernel_package_names(RHEL_K))
    msg = str(exc.value)
    assert "no package %s for kernel %s" % (missing, RHEL_K) in msg
    assert "rhel-9-for-x86_64-baseos-eus-rpms" in msg and "releasevers tried: 9.4, 9" in msg
    assert "EUS repositories are not enabled" in msg


def _rhel_node(root: Path, certs: dict, url: Optional[str], entitlement: str = "entitlement") -> None:
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
    if url is None:
        return
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
    (root / "var/lib/driver-ctr/cache").mkdir(parents=True)  # the node's hostPath
    with entitled_repo.serve(repo, certs) as url:
        _rhel_node(root, certs, url)
        r = nvd(env, "init", "-m", "1", timeout=1200)
    err = r.stderr
    assert r.returncode == 1, err[-3000:]
    assert "falling back to the entitlement-based build" in err and '"event": "dnf metadata ready"' in err
    assert "could not load nvidia: the kernel refused module loading" in err, err[-3000:]  # built, then refused
    assert '"phase": "local build", "outcome": "ok"' in err
    assert "the image's gcc is the kernel's" in err  # the kernel's .config named this machine's gcc
    assert (root / "lib/modules" / kernel / "modules.dep").is_file()
    assert (root / "lib/modules" / kernel / "build").is_symlink()
    guest_err, modules = _loads_in_the_vm(kernel, root, tmp_path)
    assert re.search(r"^nvidia ", modules, re.M) and re.search(r"^nvidia_uvm ", modules, re.M), guest_err[-3000:]


def _loads_in_the_vm(kernel: str, root: Path, tmp_path: Path, **extra: str) -> tuple:
    """The fallback's build, from the host cache it was stored in, loaded on the real kernel in a VM
    (this machine's refuses modules); returns the guest's load log and /proc/modules."""
    import vm

    why = vm.unavailable_reason(kernel)
    if why:
        pytest.skip("built; the VM load step cannot run: %s" % why)
    r = vm.load_from_host_cache(kernel, root / "var/lib/driver-ctr/cache", tmp_path / "vm-out", **extra)
    assert r.rc == 0, r.console[-3000:]
    err = (r.out / "load.err").read_text(errors="replace")
    assert '"source": "host cache"' in err, err[-3000:]
    assert "falling back" not in err  # the second start needs no package manager
    return err, (r.out / "modules").read_text(errors="replace")


@pytest.mark.slow
def test_real_dnf_walks_the_ladder_and_names_the_eus_repositories_that_lack_the_kernel(root, tmp_path, capfd):
    """Real dnf, a CDN stand-in whose baseos and EUS repositories exist but lack the kernel: the rhocp
    repository (not defined for this node) is tried and left with dnf's reason, EUS is kept, and the missing
    package is named with the repositories searched, the releasevers tried and the likely cause."""
    _dnf_tools()
    import entitled_repo

    kernel = installed_kernel(r"6\.1\.0-\d+-amd64")
    certs = entitled_repo.certificates(tmp_path / "pki")
    web = tmp_path / "web"
    (web / "empty").mkdir(parents=True)
    subprocess.run(["createrepo_c", "-q", str(web / "empty")], check=True)
    with entitled_repo.serve(web, certs) as url:
        _rhel_node(root, certs, url + "empty/")
        repo_file = root / "etc/yum.repos.d/redhat.repo"
        base = repo_file.read_text()
        for eus in ("rhel-9-for-x86_64-baseos-eus-rpms", "rhel-9-for-x86_64-appstream-eus-rpms"):
            repo_file.write_text(
                repo_file.read_text()
                + "\n"
                + base.replace("[rhel-9-for-x86_64-baseos-rpms]", "[%s]" % eus).replace("enabled=1", "enabled=0")
            )
        s = _settings(root, DRIVER_CTR_KERNEL_RELEASE=kernel, OPENSHIFT_VERSION="4.16")
        with pytest.raises(FallbackFailed) as exc:
            install_kernel_tree(s, kernel, Runner(), get_logger())
    msg = str(exc.value)
    assert "no package kernel-headers-%s for kernel %s" % (kernel, kernel) in msg, msg
    assert "repositories searched (rhel-9-for-x86_64-baseos-eus-rpms, rhel-9-for-x86_64-appstream-eus-rpms" in msg
    assert "releasevers tried: 9" in msg and "EUS repositories are not enabled" in msg
    assert not (root / "lib/modules" / kernel).exists()
    left = [e for e in events(capfd.readouterr().err) if e["event"] == "repository not usable here: moving on"]
    assert [e["repositories"] for e in left] == [["rhocp-4.16-for-rhel-9-x86_64-rpms"]]
    assert (
        left[0]["reason"]
        == "rhocp-4.16-for-rhel-9-x86_64-rpms is not in the repository files (not entitled, or not for this RHEL)"
    )


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


def _closed_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("case", ["refusing proxy", "mirror without the repository"])
def test_a_refusing_proxy_or_a_404_mirror_is_named_and_the_next_attempt_installs(root, tmp_path, case):
    """Each failure is one named error, nothing is half-installed, and once the configuration is
    mended the next attempt installs (no leftover breaks it)."""
    _dnf_tools()
    import entitled_repo

    kernel = installed_kernel(r"6\.1\.0-\d+-amd64")
    repo = entitled_repo.kernel_rpms(kernel)
    certs = entitled_repo.certificates(tmp_path / "pki")
    proxy = "http://user:s3cret@127.0.0.1:%d" % _closed_port()
    with entitled_repo.serve(repo, certs) as url:
        if case == "refusing proxy":
            _rhel_node(root, certs, url)
            s = _settings(root, DRIVER_CTR_KERNEL_RELEASE=kernel, HTTPS_PROXY=proxy)
            want = "the proxy http://***@127.0.0.1:%s refused the connection" % proxy.rsplit(":", 1)[1]
        else:
            _rhel_node(root, certs, url + "no-such-mirror/")
            s = _settings(root, DRIVER_CTR_KERNEL_RELEASE=kernel)
            want = "no such file (404): a wrong baseurl or a mirror"
        with pytest.raises(FallbackFailed) as exc:
            install_kernel_tree(s, kernel, Runner(), get_logger())
        msg = str(exc.value)
        assert "dnf could not update its metadata with releasevers" in msg and want in msg, msg
        assert "s3cret" not in msg
        assert not (root / "lib/modules" / kernel).exists()  # nothing half-installed
        _rhel_node(root, certs, url)  # mended
        install_kernel_tree(_settings(root, DRIVER_CTR_KERNEL_RELEASE=kernel), kernel, Runner(), get_logger())
    assert (root / "lib/modules" / kernel / "modules.dep").is_file()


@pytest.mark.slow
def test_a_node_local_rpm_repository_serves_with_no_entitlement_and_no_network(root, tmp_path):
    """Air-gapped: the kernel's RPMs in DRIVER_CTR_LOCAL_REPO (a hostPath); no entitlement, no repository
    configured, and a proxy that refuses everything: the RPMs are unpacked under the package-contents rules
    (rpm2cpio, no dnf, no scriptlet), and only the kernel's build-tree paths reach the root."""
    _dnf_tools()
    import entitled_repo

    kernel = installed_kernel(r"6\.1\.0-\d+-amd64")
    local = root / "srv/driver-ctr-repo"
    shutil.copytree(str(entitled_repo.kernel_rpms(kernel)), str(local))
    (root / "host-etc").mkdir()
    (root / "host-etc/os-release").write_text('ID="rhel"\nVERSION_ID="9.4"\n')
    s = _settings(
        root,
        DRIVER_CTR_KERNEL_RELEASE=kernel,
        DRIVER_CTR_LOCAL_REPO="/srv/driver-ctr-repo",
        HTTPS_PROXY="http://127.0.0.1:%d" % _closed_port(),
    )
    rec = Recording()
    installed = install_kernel_tree(s, kernel, rec, get_logger())
    assert installed == kernel_package_names(kernel)
    assert [a for a in rec.argvs if a[0] == "dnf"] == []
    unpacked = [a for a in rec.argvs if a[0] == "rpm2cpio"]
    assert sorted(Path(a[1]).parent for a in unpacked) == [local] * len(kernel_package_names(kernel))
    assert (root / "lib/modules" / kernel / "modules.dep").is_file()
    assert not (root / "lib/modules" / kernel / ".driver-ctr-install-incomplete").exists()
    assert sorted(p.name for p in root.iterdir()) == ["host-etc", "lib", "srv", "usr", "var"]


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
    env["PATH"] = path_with(env, bindir)
    r = nvd(env, "init")
    assert r.returncode == 1
    assert "apt-get update failed" in r.stderr and "http://***@proxy:3128" in r.stderr
    assert "s3cret" not in r.stderr + r.stdout


# -- download failures, in the admin's terms (dnf's and apt's real words) ----------------

DNF_REFUSED = (
    "Errors during downloading metadata for repository 'rhel-9-for-x86_64-baseos-rpms':\n"
    "  - Curl error (7): Couldn't connect to server for https://cdn.example/repodata/repomd.xml "
    "[Failed to connect to 127.0.0.1 port 9 after 0 ms: Couldn't connect to server]\n"
    "Error: Failed to download metadata for repo 'rhel-9-for-x86_64-baseos-rpms': Cannot download repomd.xml: "
    "Cannot download repodata/repomd.xml: All mirrors were tried\n"
)
DNF_404 = "  - Status code: 404 for https://127.0.0.1:36467/nothing/repodata/repomd.xml (IP: 127.0.0.1)\n"
DNF_TLS = (
    "  - Curl error (56): Failure when receiving data from the peer for https://127.0.0.1:36467/repodata/repomd.xml "
    "[GnuTLS recv error (-12): A TLS fatal alert has been received.]\n"
)
APT_REFUSED = (
    "W: Failed to fetch http://deb.debian.org/debian/dists/bookworm/InRelease  "
    "Could not connect to 127.0.0.1:9 (127.0.0.1). - connect (111: Connection refused)\n"
)


@pytest.mark.parametrize(
    "text, env, cause",
    [
        (DNF_REFUSED, {"HTTPS_PROXY": "http://u:pw@127.0.0.1:9"}, "the proxy http://***@127.0.0.1:9 refused"),
        (APT_REFUSED, {"http_proxy": "127.0.0.1:9"}, "the proxy 127.0.0.1:9 refused"),
        (DNF_REFUSED, {}, "a network error"),  # no proxy: the server itself refused
        (DNF_REFUSED, {"HTTPS_PROXY": "http://proxy:3128"}, "a network error"),  # not the proxy's address
        (DNF_404, {}, "no such file (404): a wrong baseurl or a mirror"),
        (DNF_TLS, {}, "the TLS handshake failed: the server refused the client certificate"),
        ("E: Could not resolve 'deb.debian.org'\n", {}, "does not resolve"),
    ],
)
def test_a_download_failure_names_its_cause_and_keeps_the_package_managers_words(text, env, cause):
    from driver_ctr.fallback.download_errors import explain

    said = explain(text, env)
    assert cause in said, said
    assert "All mirrors were tried" not in said  # the detail, not dnf's last line
    assert ("Curl error" in said or "Status code" in said) if text.startswith(("Errors", "  -")) else True
    assert "pw@" not in said


# -- the kernel's gcc ----------------------------------------------------------------------


class GccHere(Runner):
    """This image's gcc is ``version``; dnf installs are recorded."""

    def __init__(self, version: str) -> None:
        super().__init__()
        self.version, self.installs = version, []

    def run(self, argv, **kw):  # type: ignore[override]
        from driver_ctr.toolkit.runner import Result

        argv = [str(a) for a in argv]
        if argv[0] == "gcc":
            return Result(tuple(argv), 0, self.version + "\n", "")
        if argv[0] == "dnf" and "install" in argv:
            self.installs.append(argv[argv.index("install") + 1 :])
            return Result(tuple(argv), 0, "", "")
        raise AssertionError("unexpected command %r" % argv)


@pytest.mark.parametrize("here, installed", [("12.2.0", [["gcc-11.4.1"]]), ("11.4.1", [])])
def test_dnf_installs_the_kernels_gcc_only_when_the_images_is_another(root, here, installed):
    tree = root / "usr/src/kernels" / RHEL_K
    tree.mkdir(parents=True)
    (tree / ".config").write_text('CONFIG_CC_VERSION_TEXT="gcc (GCC) 11.4.1 20231218 (Red Hat 11.4.1-3)"\n')
    (root / "lib/modules" / RHEL_K).mkdir(parents=True)
    (root / "lib/modules" / RHEL_K / "build").symlink_to("/usr/src/kernels/" + RHEL_K)
    gcc = GccHere(here)
    dnf = DnfBackend(Job(_settings(root), RHEL_K, gcc, get_logger()))
    assert dnf.install_compiler() == [n for i in installed for n in i]
    assert gcc.installs == installed


def test_a_new_backend_is_its_class_and_one_registry_line(root, monkeypatch):
    """zypper (or any other) is a PackageManager subclass with its family and os-release IDs, and a line in
    BACKENDS: the node's os-release then picks it, with the one constructor every backend has."""
    import driver_ctr.fallback as fallback
    from driver_ctr.fallback.base import PackageManager

    class Zypper(PackageManager):
        name, family, os_ids = "zypper", "suse", ("sles", "opensuse-leap")

        def available(self):
            return ""

        def refresh(self):
            pass

        def kernel_packages(self):
            return ["kernel-default-devel"]

        def install(self, names):
            return list(names)

    (root / "host-etc").mkdir()
    (root / "host-etc/os-release").write_text('ID="sles"\nVERSION_ID="15.6"\n')
    s = _settings(root)
    with pytest.raises(FallbackFailed, match="no package-manager backend for this node"):
        backend_for(s, "6.4.0-150600.23.25-default", Runner(), get_logger())
    monkeypatch.setitem(fallback.BACKENDS, Zypper.family, Zypper)
    backend = backend_for(s, "6.4.0-150600.23.25-default", Runner(), get_logger())
    assert isinstance(backend, Zypper) and backend.kernel == "6.4.0-150600.23.25-default"
    assert backend.root == root


def test_apt_and_dnf_name_the_newest_kernel_their_sources_carry(tmp_path):
    """update -k latest: apt's newest linux-headers of the running kernel's flavour, compared as dpkg does
    (6.1.0-10 < 6.1.0-9 as text, not as versions; -common and other flavours left out); dnf's repoquery."""
    apt_cache = FakeRunner()
    apt_cache.expect(
        ("apt-cache", "search"),
        stdout="linux-headers-6.1.0-9-amd64 - Header files\n"
        "linux-headers-6.1.0-10-amd64 - Header files\n"
        "linux-headers-6.1.0-10-common - Common header files\n"
        "linux-headers-6.1.0-11-cloud-amd64 - Header files\n",
    )
    apt = AptBackend(Job(_settings(tmp_path), "6.1.0-9-amd64", apt_cache, get_logger()))
    assert apt.newest_kernel() == "6.1.0-10-amd64"
    assert apt_cache.calls == [("apt-cache", "search", "--names-only", "^linux-headers-[0-9].*-amd64$")]
    repoquery = FakeRunner()
    repoquery.expect(("dnf",), stdout="5.14.0-570.12.1.el9_6.x86_64\n")
    dnf = DnfBackend(Job(_settings(tmp_path), RHEL_K, repoquery, get_logger()))
    assert dnf.newest_kernel() == "5.14.0-570.12.1.el9_6.x86_64"
    assert "repoquery" in repoquery.calls[0] and "--latest-limit=1" in repoquery.calls[0]


def test_update_k_latest_resolves_the_kernel_then_checks_the_build_for_it(root, tmp_path, capsys):
    """``update -k latest --check`` in-process (the fake runner plays apt, the fixture builder builds): the
    newest kernel apt carries is the target, apt's state is the preflight's scratch root's, and the
    preflight says pass for that kernel."""
    from fixture_builder import FixtureBuilder
    from harness import make_fixture_modules
    from inprocess import in_process

    from driver_ctr.commands import build
    from driver_ctr.commands.options import UpdateOptions
    from driver_ctr.tools import Tools

    newest = "6.1.0-99-amd64"
    (root / "host-etc").mkdir()
    (root / "host-etc/os-release").write_text(DEBIAN)
    mods = make_fixture_modules(tmp_path / "fixture", newest)
    settings = _settings(root, DRIVER_CTR_KERNEL_RELEASE="6.1.0-57-amd64", DRIVER_CTR_SOURCE_DIR=str(mods))
    fake = FakeRunner()
    fake.expect(("apt-get",))
    search = Result(("apt-cache",), 0, "linux-headers-%s - Header files\n" % newest, "")
    fake.answers.append((("apt-cache",), lambda argv: search if "search" in argv else Result(tuple(argv), 100, "", "")))
    tools = Tools(runner=fake, new_builder=lambda _runner: FixtureBuilder())
    status = in_process(build.update, settings, UpdateOptions(kernel="latest", check=True), tools)
    assert status == 0
    assert capsys.readouterr().out.startswith("%s: pass (" % newest)
    assert [c[:2] for c in fake.calls] == [("apt-get", "-o"), ("apt-cache", "-o")]  # the scratch root's apt state


def test_the_mounted_custom_cas_are_installed_before_any_download(root):
    """The operator's certConfig certificates (a TLS-inspecting proxy's CA) reach apt before it downloads:
    update-ca-certificates runs first (chrooted into the temporary root here); a mount without a
    certificate changes nothing."""
    from driver_ctr.fallback import newest_kernel

    (root / "host-etc").mkdir()
    (root / "host-etc/os-release").write_text(DEBIAN)
    cas = root / "usr/local/share/ca-certificates"
    cas.mkdir(parents=True)
    settings = _settings(root, DRIVER_CTR_KERNEL_RELEASE="6.1.0-57-amd64")

    def fake():
        runner = FakeRunner()
        runner.expect(("chroot",))
        runner.expect(("apt-get",))
        runner.expect(("apt-cache",), stdout="linux-headers-6.1.0-58-amd64 - Header files\n")
        return runner

    empty = fake()
    assert newest_kernel(settings, empty, get_logger()) == "6.1.0-58-amd64"
    assert [c[0] for c in empty.calls] == ["apt-get", "apt-cache"]
    (cas / "corp-proxy.crt").write_text("-----BEGIN CERTIFICATE-----\n")
    with_ca = fake()
    newest_kernel(settings, with_ca, get_logger())
    assert with_ca.calls[0] == ("chroot", str(root), "update-ca-certificates")
    assert [c[0] for c in with_ca.calls[1:]] == ["apt-get", "apt-cache"]
