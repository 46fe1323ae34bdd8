"""Settings: every variable validated at once, errors name the variable."""

from __future__ import annotations

import pytest

from driver_ctr.toolkit.errors import SettingsError
from driver_ctr.toolkit.settings import SHARED_VARIABLES, Settings

# Every variable with a value it must refuse.
MALFORMED = {
    "DRIVER_VERSION": "latest",
    "TARGETARCH": "mips",
    "DRIVER_BRANCH": "5x5",
    "DRIVER_TYPE": "gaming",
    "KERNEL_MODULE_TYPE": "closed",
    "GPU_DIRECT_RDMA_ENABLED": "yes please",
    "USE_HOST_MOFED": "maybe",
    "GDS_ENABLED": "on",
    "GDRCOPY_ENABLED": "enabled",
    "OPEN_KERNEL_MODULES_ENABLED": "t",
    "DRIVER_CONFIG_DIGEST": "two words",
    "RHCOS_IMAGE_MISSING": "missing",
    "RHCOS_VERSION": "4.16 rhcos",
    "OPENSHIFT_VERSION": "four.sixteen",
    "RHEL_VERSION": "nine",
    "DNF_RELEASEVER": "9.4.x",
    "VGPU_LICENSE_SERVER_TYPE": "ldap",
    "DISABLE_VGPU_VERSION_CHECK": "nope",
    "IGNORE_PREEMPT_RT_PRESENCE": "2",
    "DRIVER_CTR_ROOT": "relative/root",
    "DRIVER_CTR_KERNEL_RELEASE": "6.18.44-fc-v669",
    "DRIVER_CTR_LOG_FORMAT": "xml",
    "DRIVER_CTR_SHARED_DIR": "shared",
    "DRIVER_CTR_BUILD_TIMEOUT": "-5",
    "DRIVER_CTR_START_TIMEOUT": "soon",
    "DRIVER_CTR_MAX_THREADS": "0",
    "DRIVER_CTR_SOURCE_DIR": "src",
    "DRIVER_CTR_CACHE_DIR": "cache",
    "DRIVER_CTR_CACHE_KEEP": "-1",
    "DRIVER_CTR_SIGNING_KEY": "key.pem",
    "DRIVER_CTR_SIGNING_CERT": "cert.pem",
    "DRIVER_CTR_SIGNING_HASH": "md5",
    "NVFM_CONFIG_fabric_mode": "1",
    "NVFM_CONFIG_LOG_LEVEL": "4\nINJECT=1",
    "HTTP_PROXY": "not a url",
    "HTTPS_PROXY": "ftp://user:hunter2@proxy:21",
    "http_proxy": "proxy:port",
    "https_proxy": "://",
}


def test_every_malformed_variable_is_named_in_one_error():
    """All problems come in one SettingsError, one entry per variable, each naming it."""
    with pytest.raises(SettingsError) as exc:
        Settings.from_env(MALFORMED)
    named = {p.name for p in exc.value.problems}
    assert named == set(MALFORMED)
    for p in exc.value.problems:
        assert p.name in str(p) and p.expected


@pytest.mark.parametrize("var,value", sorted(MALFORMED.items()))
def test_each_malformed_variable_alone(base_env, var, value):
    """Alone among valid settings, each malformed value is reported by name with what was expected."""
    env = dict(base_env)
    if var.startswith("DRIVER_CTR_SIGNING_") and var != "DRIVER_CTR_SIGNING_HASH":
        env.update(DRIVER_CTR_SIGNING_KEY="/k.pem", DRIVER_CTR_SIGNING_CERT="/c.pem")
    env[var] = value
    with pytest.raises(SettingsError) as exc:
        Settings.from_env(env)
    assert [p.name for p in exc.value.problems] == [var]
    assert var in str(exc.value)


def test_required_variables(base_env):
    with pytest.raises(SettingsError) as exc:
        Settings.from_env({})
    assert {p.name for p in exc.value.problems} == {"DRIVER_VERSION", "TARGETARCH"}
    assert "required" in str(exc.value)


def test_proxy_credentials_never_in_the_error():
    with pytest.raises(SettingsError) as exc:
        Settings.from_env(
            {"DRIVER_VERSION": "535.261.03", "TARGETARCH": "amd64", "HTTPS_PROXY": "ftp://user:hunter2@proxy:21"}
        )
    assert "hunter2" not in str(exc.value)
    assert "HTTPS_PROXY" in str(exc.value)


def test_valid_settings_and_defaults(base_env):
    s = Settings.from_env(
        dict(
            base_env,
            GDS_ENABLED="TRUE",
            KERNEL_MODULE_TYPE="Open",
            NVFM_CONFIG_FABRIC_MODE="1",
            DRIVER_CONFIG_DIGEST="3522141578",
            HTTP_PROXY="http://user:pass@example:8080",
        )
    )
    assert s.driver_version.raw == "535.261.03"
    assert s.driver_branch == 535
    assert s.target_arch == "x86_64" and s.targetarch_raw == "amd64"
    assert s.gds_enabled is True and s.gdrcopy_enabled is False
    assert s.kernel_module_type == "open"
    assert s.nvfm_config == (("FABRIC_MODE", "1"),)
    assert s.build_timeout_s == 2400
    assert s.paths.shared_dir.as_posix() == "/mnt/shared-nvidia-driver-toolkit"
    assert s.describe()["HTTP_PROXY"] == "http://***@example:8080"


def test_root_reroots_every_host_path(base_env):
    s = Settings.from_env(dict(base_env, DRIVER_CTR_ROOT="/tmp/r"))
    p = s.paths
    for path in (
        p.shared_dir,
        p.run_nvidia,
        p.state_file,
        p.pid_file,
        p.drivers_dir,
        p.lib_modules,
        p.usr_src,
        p.sys,
        p.proc,
        p.modprobe_d,
        p.dtk_release_json,
        p.os_release,
    ):
        assert path.as_posix().startswith("/tmp/r/"), path


def test_running_kernel_override(base_env):
    s = Settings.from_env(dict(base_env, DRIVER_CTR_KERNEL_RELEASE="5.14.0-427.13.1.el9_4.x86_64"))
    assert s.running_kernel() == "5.14.0-427.13.1.el9_4.x86_64"


def test_shared_subset_is_allow_listed(base_env):
    """settings.json carries only allow-listed variables: no proxies, no secrets, no service env."""
    env = dict(
        base_env,
        HTTP_PROXY="http://u:p@x:1",
        GDS_ENABLED="true",
        KUBERNETES_SERVICE_HOST="10.0.0.1",
        AWS_SECRET_ACCESS_KEY="s3cr3t",
        DRIVER_CONFIG_DIGEST="42",
    )
    shared = Settings.from_env(env).shared()
    assert set(shared) <= set(SHARED_VARIABLES)
    assert shared == {
        "DRIVER_VERSION": "535.261.03",
        "TARGETARCH": "amd64",
        "GDS_ENABLED": "true",
        "DRIVER_CONFIG_DIGEST": "42",
    }
    # and it round-trips into a valid Settings on the DTK side
    assert Settings.from_env(shared).gds_enabled is True


def test_signing_needs_key_and_cert(base_env):
    with pytest.raises(SettingsError) as exc:
        Settings.from_env(dict(base_env, DRIVER_CTR_SIGNING_KEY="/secret/key.pem"))
    assert [p.name for p in exc.value.problems] == ["DRIVER_CTR_SIGNING_CERT"]


@pytest.mark.parametrize("proxy", ["proxy.corp:3128", "http://proxy.corp:3128", "socks5h://p:1080", "10.0.0.1:8080"])
def test_a_proxy_with_or_without_a_scheme_is_accepted(proxy):
    """curl and dnf take proxy.corp:3128 (http); so does driver-ctr."""
    s = Settings.from_env({"DRIVER_VERSION": "535.261.03", "TARGETARCH": "amd64", "HTTPS_PROXY": proxy})
    assert dict(s.proxies)["HTTPS_PROXY"] == proxy


@pytest.mark.parametrize("proxy", ["ftp://proxy:21", "http://", "proxy corp:3128"])
def test_a_proxy_that_no_client_takes_is_named(proxy):
    with pytest.raises(SettingsError) as exc:
        Settings.from_env({"DRIVER_VERSION": "535.261.03", "TARGETARCH": "amd64", "HTTPS_PROXY": proxy})
    assert "HTTPS_PROXY" in str(exc.value)


def test_a_bad_value_a_command_never_reads_does_not_fail_it(root):
    """The liveness probe (probe_nvidia_peermem), unload and status never build: a bad proxy, build timeout or
    signing hash, or a signing key without its certificate, does not fail them (a liveness probe must not
    restart a healthy pod); init still names each one."""
    import subprocess
    import sys

    from harness import env_for

    bad = dict(HTTPS_PROXY="ftp://u:pw@proxy:21", DRIVER_CTR_BUILD_TIMEOUT="soon", DRIVER_CTR_SIGNING_HASH="md5")
    # and a check across variables that only building needs: a signing key without its certificate
    env = env_for(root, DRIVER_CTR_SIGNING_KEY="/secret/key.pem", **bad)
    for command in (["probe_nvidia_peermem"], ["unload"], ["status"]):
        r = subprocess.run(
            [sys.executable, "-m", "driver_ctr", "nvidia-driver", *command], env=env, capture_output=True, text=True
        )
        assert r.returncode == 0, (command, r.stderr)
    r = subprocess.run(
        [sys.executable, "-m", "driver_ctr", "nvidia-driver", "init"], env=env, capture_output=True, text=True
    )
    assert r.returncode != 0
    for name in [*bad, "DRIVER_CTR_SIGNING_CERT"]:
        assert name in r.stderr, (name, r.stderr)
    assert "pw" not in r.stderr
    with pytest.raises(SettingsError):  # a variable the command does read still fails it
        Settings.from_env(dict(env, DRIVER_TYPE="bogus"), unused=("HTTPS_PROXY",))


def test_the_readme_settings_table_lists_every_row():
    """One row per variable in the code (settings.VARIABLES), one line per setting in the README's table:
    the same names, no more, no fewer."""
    import re

    from conftest import REPO

    from driver_ctr.toolkit.settings import VARIABLES

    text = (REPO / "README.md").read_text()
    section = text[text.index("\n## Settings\n") :]
    section = section[: section.index("\n## ", 1)]
    documented = set()
    for line in section.splitlines():
        if line.startswith("| `"):
            documented |= {n.rstrip("*") for n in re.findall(r"`([A-Za-z_]+\*?)`", line.split("|")[1])}
    assert documented == {v.name for v in VARIABLES}


def test_the_lists_of_names_are_derived_from_the_rows():
    """Who reads a variable is a flag of its row; the lists the commands use are made from the flags."""
    from dataclasses import fields

    from driver_ctr.toolkit import settings as st

    by_name = {v.name: v for v in st.VARIABLES}
    assert set(st.BUILD_ONLY_VARIABLES) == {n for n, v in by_name.items() if v.build_only}
    assert "HTTPS_PROXY" in st.BUILD_ONLY_VARIABLES and "DRIVER_CTR_SIGNING_CERT" in st.BUILD_ONLY_VARIABLES
    assert "DRIVER_VERSION" not in st.BUILD_ONLY_VARIABLES
    assert set(st.DTK_OWN_VARIABLES) == {
        "RHCOS_VERSION",
        "RHCOS_IMAGE_MISSING",
        "DRIVER_CONFIG_DIGEST",
        "GDS_ENABLED",
        "GDRCOPY_ENABLED",
    }
    assert all(by_name[n].shared for n in st.SHARED_VARIABLES)
    # every row fills a field of Settings, and the default is the field's
    names = {f.name for f in fields(st.Settings)}
    assert all(v.attr in names for v in st.VARIABLES)
    assert st.Settings.from_env({"DRIVER_VERSION": "535.261.03", "TARGETARCH": "amd64"}).build_timeout_s == 2400.0


@pytest.mark.parametrize(
    "version", ["416.94.202407030122-0", "9.6.20250523-0", "39.20240210.3.0", "9.0.20250510-0", "rhcos-4.16"]
)
def test_any_os_version_nfd_reports_is_an_rhcos_version(base_env, version):
    """RHCOS, FCOS/OKD and SCOS nodes: NFD's OSTREE_VERSION in every form starts the driver (it is only shown)."""
    assert Settings.from_env(dict(base_env, RHCOS_VERSION=version)).rhcos_version == version


def test_the_vgpu_host_manager_is_refused_at_start_with_its_reason(root):
    """The operator's vgpu-host-manager DaemonSets run NVIDIA's vGPU manager image on hypervisor hosts:
    driver-ctr fails at start with one named error instead of half-working."""
    import subprocess
    import sys

    from harness import env_for

    r = subprocess.run(
        [sys.executable, "-m", "driver_ctr", "nvidia-driver", "init"],
        env=env_for(root, DRIVER_TYPE="vgpu-host-manager"),
        capture_output=True,
        text=True,
    )
    assert r.returncode == 1
    assert "DRIVER_TYPE: invalid value 'vgpu-host-manager'" in r.stderr
    assert "served by NVIDIA's vGPU manager image, not by driver-ctr" in r.stderr
    assert not (root / "run/nvidia/nvidia-driver.pid").exists()  # nothing started
