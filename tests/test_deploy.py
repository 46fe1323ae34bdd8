"""deploy/: the DaemonSets users apply.

- valid, strictly (unknown fields are errors), for the Kubernetes versions
  OpenShift 4.14-4.20 ship (1.27-1.33);
- the DTK one has the pod shape the gpu-operator renders (tests/data): the same
  containers, commands, args, probe, preStop, securityContext and mounts;
- every command and argument parses with our CLI, every variable validates, every
  mount names a volume, and the paths our code uses are mounted.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import yaml
from conftest import REPO

from driver_ctr.cli import build_nvidia_driver_parser, build_ocp_parser
from driver_ctr.toolkit.settings import Settings

DEPLOY = REPO / "deploy"
GOLDEN = REPO / "tests/data/gpu-operator-golden-driver-openshift-drivertoolkit.yaml"
OPENSHIFT_KUBERNETES = {
    "4.14": "1.27",
    "4.15": "1.28",
    "4.16": "1.29",
    "4.17": "1.30",
    "4.18": "1.31",
    "4.19": "1.32",
    "4.20": "1.33",
}
IMAGE_ENV = {"DRIVER_VERSION": "535.261.03", "TARGETARCH": "amd64"}  # ENV of the driver image
MANIFESTS = sorted(DEPLOY.glob("*.yaml"))


def _docs(path: Path):
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _daemonset(path: Path):
    return next(d for d in _docs(path) if d["kind"] == "DaemonSet")


def _containers(path: Path):
    return {c["name"]: c for c in _daemonset(path)["spec"]["template"]["spec"]["containers"]}


def test_there_are_two_manifests():
    assert [p.name for p in MANIFESTS] == ["driver-daemonset-dtk.yaml", "driver-daemonset.yaml"]


@pytest.mark.parametrize("openshift", sorted(OPENSHIFT_KUBERNETES))
@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_valid_for_the_kubernetes_of_each_openshift(path, openshift):
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    for doc in _docs(path):
        kubernetes_validate.validate(doc, OPENSHIFT_KUBERNETES[openshift] + ".0", strict=True)


def test_the_dtk_pod_has_the_operators_shape():
    ours, golden = _containers(DEPLOY / "driver-daemonset-dtk.yaml"), _containers(GOLDEN)
    assert set(ours) == set(golden) == {"nvidia-driver-ctr", "openshift-driver-toolkit-ctr"}
    for name, g in golden.items():
        o = ours[name]
        for key in ("command", "args", "securityContext", "lifecycle", "startupProbe", "resources"):
            assert o.get(key) == g.get(key), (name, key)
        g_mounts = {m["mountPath"]: m for m in g["volumeMounts"]}
        o_mounts = {m["mountPath"]: m for m in o["volumeMounts"]}
        assert all(o_mounts.get(p) == m for p, m in g_mounts.items()), name
        assert {e["name"] for e in g["env"] if "PROXY" not in e["name"].upper()} <= {e["name"] for e in o["env"]}
    spec, gspec = _daemonset(DEPLOY / "driver-daemonset-dtk.yaml")["spec"], _daemonset(GOLDEN)["spec"]
    assert spec["updateStrategy"] == gspec["updateStrategy"]
    assert spec["template"]["spec"]["hostPID"] is True


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_every_command_parses_and_every_variable_validates(path):
    for c in _containers(path).values():
        env = dict(IMAGE_ENV, **{e["name"]: e["value"] for e in c.get("env", []) if "value" in e})
        Settings.from_env(env)
        words = list(c["command"]) + list(c.get("args", []))
        if words[0] == "bash":  # the DTK container's script: it ends by exec-ing our entrypoint from the shared dir
            words = shlex.split(words[-1].rsplit("exec ", 1)[1])
            assert words[0] == "/mnt/shared-nvidia-driver-toolkit/ocp_dtk_entrypoint"
        program = Path(words[0]).name
        parser = {"nvidia-driver": build_nvidia_driver_parser, "ocp_dtk_entrypoint": build_ocp_parser}[program]()
        parser.parse_args(words[1:])


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_every_mount_has_a_volume_and_our_paths_are_mounted(path):
    spec = _daemonset(path)["spec"]["template"]["spec"]
    volumes = {v["name"] for v in spec["volumes"]}
    for c in spec["containers"]:
        for m in c["volumeMounts"]:
            assert m["name"] in volumes, (c["name"], m["name"])
    drv = _containers(path)["nvidia-driver-ctr"]
    paths = {m["mountPath"] for m in drv["volumeMounts"]}
    assert {"/run/nvidia", "/var/lib/driver-ctr/cache", "/host-etc/os-release", "/var/log"} <= paths
    cache = next(v for v in spec["volumes"] if v["name"] == "driver-ctr-cache")
    assert cache["hostPath"] == {"path": "/var/lib/driver-ctr/cache", "type": "DirectoryOrCreate"}
    signing = next(v for v in spec["volumes"] if v["name"] == "driver-ctr-signing")
    assert signing["secret"]["optional"] is True
    if "dtk" in path.name:
        assert "/mnt/shared-nvidia-driver-toolkit" in paths
        dtk_paths = {m["mountPath"] for m in _containers(path)["openshift-driver-toolkit-ctr"]["volumeMounts"]}
        assert {"/mnt/shared-nvidia-driver-toolkit", "/var/lib/driver-ctr/cache"} <= dtk_paths  # the cache on both
