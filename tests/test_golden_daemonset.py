"""The gpu-operator's own rendered DaemonSet (tests/data, Apache-2.0) works with our CLI:
every command and argument parses, every environment variable validates."""

from __future__ import annotations

import shlex

import yaml
from conftest import REPO

from driver_ctr.cli import build_nvidia_driver_parser, build_ocp_parser
from driver_ctr.toolkit.settings import Settings

GOLDEN = REPO / "tests/data/gpu-operator-golden-driver-openshift-drivertoolkit.yaml"
# What the driver image itself sets (ENV in the Containerfile).
IMAGE_ENV = {"DRIVER_VERSION": "525.85.03", "TARGETARCH": "amd64", "DRIVER_TYPE": "passthrough"}


def _containers():
    docs = [d for d in yaml.safe_load_all(GOLDEN.read_text()) if d]
    ds = next(d for d in docs if d["kind"] == "DaemonSet")
    return {c["name"]: c for c in ds["spec"]["template"]["spec"]["containers"]}


def _env(container):
    env = dict(IMAGE_ENV)
    for e in container.get("env", []):
        env[e["name"]] = e.get("value", "from-field-ref")
    return env


def test_driver_container_command_parses_and_env_validates():
    c = _containers()["nvidia-driver-ctr"]
    assert c["command"] == ["ocp_dtk_entrypoint"]
    args = build_ocp_parser().parse_args(c["args"])
    assert args.command == "nv-ctr-run-with-dtk"
    s = Settings.from_env(_env(c))
    assert s.driver_config_digest == "3522141578"
    assert s.openshift_version == "4.13"
    assert dict(s.proxies)["HTTP_PROXY"] == "http://user:pass@example:8080"
    assert "pass@" not in str(s.describe())


def test_dtk_container_script_runs_our_entrypoint_from_the_shared_dir():
    c = _containers()["openshift-driver-toolkit-ctr"]
    assert c["command"] == ["bash", "-xc"]
    script = c["args"][0]
    assert "/mnt/shared-nvidia-driver-toolkit/dir_prepared" in script
    words = shlex.split(script.split("exec", 1)[1])
    assert words[0] == "/mnt/shared-nvidia-driver-toolkit/ocp_dtk_entrypoint"
    assert build_ocp_parser().parse_args(words[1:]).command == "dtk-build-driver"
    # The DTK container gets only these from the operator; the rest comes from settings.json.
    assert {e["name"] for e in c["env"]} <= {
        "RHCOS_VERSION",
        "NVIDIA_VISIBLE_DEVICES",
        "DRIVER_CONFIG_DIGEST",
        "RHCOS_IMAGE_MISSING",
        "GDS_ENABLED",
        "GDRCOPY_ENABLED",
    }
    s = Settings.from_env(_env(c))
    assert s.rhcos_version == "413.92.202304252344-0"


def test_non_dtk_command_parses():
    """Without DTK the operator runs `nvidia-driver init`."""
    assert build_nvidia_driver_parser().parse_args(["init"]).command == "init"
