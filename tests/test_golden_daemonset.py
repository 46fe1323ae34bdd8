"""The gpu-operator's own rendered driver DaemonSets (tests/data, Apache-2.0), all 16 configurations, against
our CLI: for every container that runs our image (the driver container, the peermem sidecar, the DTK
container's command from the shared dir), the command and arguments parse and the environment validates,
as our image sets it (``IMAGE_ENV``) plus what the operator renders. The containers of other images (GDS's
nvidia-fs, GDRCopy, NVIDIA's vGPU manager) are named, and a vGPU host-manager start is refused by name."""

from __future__ import annotations

import shlex
from typing import Dict, List, Tuple

import pytest
import yaml
from conftest import REPO

from driver_ctr.cli import build_nvidia_driver_parser, build_ocp_parser
from driver_ctr.toolkit.errors import SettingsError
from driver_ctr.toolkit.settings import Settings

DATA = REPO / "tests/data"
GOLDENS = sorted(
    p.name[len("gpu-operator-golden-driver-") : -len(".yaml")] for p in DATA.glob("gpu-operator-golden-driver-*.yaml")
)
# What the driver image itself sets (ENV in the Containerfile).
IMAGE_ENV = {"DRIVER_VERSION": "525.85.03", "TARGETARCH": "amd64", "DRIVER_TYPE": "passthrough"}
DTK_WRAPPER = ("bash", "-xc")
OTHER_IMAGES = ("vgpu-manager", "nvidia-fs", "gdrdrv", "gdrcopy")  # images that are not ours
# full-spec renders spec.args as these placeholders: the reference's getopt refuses them (usage, exit 1), ours too
PLACEHOLDER_ARGS = ("--foo", "--bar")


def _containers(name: str) -> List[dict]:
    docs = [d for d in yaml.safe_load_all((DATA / ("gpu-operator-golden-driver-%s.yaml" % name)).read_text()) if d]
    ds = next(d for d in docs if d["kind"] == "DaemonSet")
    return ds["spec"]["template"]["spec"]["containers"]


def _other(container: dict) -> bool:
    return any(other in container["image"] for other in OTHER_IMAGES)


def _ours(golden: str, container: dict) -> bool:
    """Our image's container, or the DTK container running the entrypoint our driver container writes."""
    if _other(container):
        return False
    if container["name"] == "openshift-driver-toolkit-ctr":
        driver = next(c for c in _containers(golden) if c["name"] == "nvidia-driver-ctr")
        return not _other(driver) and "ocp_dtk_entrypoint" in container["args"][0]
    return True


def _env(container: dict) -> Dict[str, str]:
    env = dict(IMAGE_ENV)
    for e in container.get("env", []):
        env[e["name"]] = e.get("value", "from-a-field-or-secret-ref")
    return env


CASES: List[Tuple[str, str]] = [(g, c["name"]) for g in GOLDENS for c in _containers(g) if _ours(g, c)]


def test_all_sixteen_configurations_are_here():
    assert len(GOLDENS) == 16 and {"minimal", "rdma-hostmofed", "precompiled", "vgpu-host-manager"} <= set(GOLDENS)


@pytest.mark.parametrize("golden, name", CASES)
def test_golden_container_command_parses_and_env_validates(golden, name):
    c = next(c for c in _containers(golden) if c["name"] == name)
    words = list(c["command"]) + list(c.get("args", []))
    if tuple(c["command"]) == DTK_WRAPPER:  # the DTK container: our entrypoint from the shared dir
        script = c["args"][0]
        assert "/mnt/shared-nvidia-driver-toolkit/dir_prepared" in script
        words = shlex.split(script.split("exec", 1)[1])
        assert words[0] == "/mnt/shared-nvidia-driver-toolkit/ocp_dtk_entrypoint"
        words = ["ocp_dtk_entrypoint"] + words[1:]
    program, argv = words[0], words[1:]
    parser = build_ocp_parser() if program == "ocp_dtk_entrypoint" else build_nvidia_driver_parser()
    assert program in ("nvidia-driver", "ocp_dtk_entrypoint")
    if any(a in PLACEHOLDER_ARGS for a in argv):
        with pytest.raises(SystemExit) as refused:
            parser.parse_args(argv)
        assert refused.value.code == 1
        argv = [a for a in argv if a not in PLACEHOLDER_ARGS]
    command = parser.parse_args(argv).command
    assert command in ("init", "reload_nvidia_peermem", "nv-ctr-run-with-dtk", "dtk-build-driver")
    s = Settings.from_env(_env(c))
    digest = next((e.get("value") for e in c.get("env", []) if e["name"] == "DRIVER_CONFIG_DIGEST"), None)
    assert s.driver_config_digest == (digest or "")
    for e in c.get("env", []):  # every proxy the operator renders is taken, credentials never shown
        if e["name"].upper().endswith("_PROXY") and "value" in e:
            assert dict(s.proxies)[e["name"]] == e["value"]
    assert "pass@" not in str(s.describe())


@pytest.mark.parametrize("golden", GOLDENS)
def test_the_other_images_containers_are_not_ours_and_named(golden):
    """Every container is ours, another image's we know of, or the DTK container beside another image's
    driver container (NVIDIA's vGPU manager writes its own entrypoint there): none is unaccounted for."""
    for c in _containers(golden):
        beside_other = c["name"] == "openshift-driver-toolkit-ctr" and golden.startswith("vgpu-host-manager")
        assert _ours(golden, c) or _other(c) or beside_other, (golden, c["name"], c["image"])


@pytest.mark.parametrize("golden", ["vgpu-host-manager", "vgpu-host-manager-openshift"])
def test_a_vgpu_host_manager_start_on_our_image_is_refused_by_name(golden):
    """The host-manager DaemonSets run NVIDIA's vGPU manager image (its ENV says DRIVER_TYPE=vgpu-host-manager):
    our image started there refuses with one named error."""
    driver = next(c for c in _containers(golden) if c["name"] == "nvidia-driver-ctr")
    assert "vgpu-manager" in driver["image"]
    with pytest.raises(SettingsError, match="served by NVIDIA's vGPU manager image, not by driver-ctr"):
        Settings.from_env(dict(_env(driver), DRIVER_TYPE="vgpu-host-manager"))


def test_the_openshift_drivertoolkit_containers_in_detail():
    containers = {c["name"]: c for c in _containers("openshift-drivertoolkit")}
    s = Settings.from_env(_env(containers["nvidia-driver-ctr"]))
    assert s.driver_config_digest == "3522141578" and s.openshift_version == "4.13"
    assert dict(s.proxies)["HTTP_PROXY"] == "http://user:pass@example:8080"
    dtk = containers["openshift-driver-toolkit-ctr"]
    # The DTK container gets only these from the operator; the rest comes from settings.json.
    assert {e["name"] for e in dtk["env"]} <= {
        "RHCOS_VERSION",
        "NVIDIA_VISIBLE_DEVICES",
        "DRIVER_CONFIG_DIGEST",
        "RHCOS_IMAGE_MISSING",
        "GDS_ENABLED",
        "GDRCOPY_ENABLED",
    }
    assert Settings.from_env(_env(dtk)).rhcos_version == "413.92.202304252344-0"
