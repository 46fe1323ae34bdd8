"""The gpu-operator's own rendered driver DaemonSets (tests/data, Apache-2.0), all 16 configurations, against
our CLI: for every container that runs our image (the driver container, the peermem sidecar, the DTK
container's command from the shared dir), the command and arguments parse and the environment validates,
as our image sets it (``IMAGE_ENV``) plus what the operator renders. The containers of other images (GDS's
nvidia-fs, GDRCopy, NVIDIA's vGPU manager) are named, and a vGPU host-manager start is refused by name."""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path
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


# -- the driver container of each non-OpenShift rendering, run to its end state ----------------------------------

INIT_GOLDENS = [
    g
    for g in GOLDENS
    for c in _containers(g)
    if c["name"] == "nvidia-driver-ctr" and c["command"] == ["nvidia-driver"] and _ours(g, c)
]


def _golden_settings(golden: str, root: Path, sources: Path) -> Settings:
    """The driver container's environment in ``golden`` (references stubbed, the placeholder args' FOO and
    BAR kept), as our image sets it, on ``root`` with ``sources`` as the driver's sources."""
    from harness import env_for

    env = {k: v for k, v in _env(next(c for c in _containers(golden) if c["name"] == "nvidia-driver-ctr")).items()}
    env.pop("DRIVER_VERSION")  # the image's: ours is the fixture's 535.261.03 (env_for)
    if golden.startswith("vgpu-licensing"):
        env["DRIVER_TYPE"] = "vgpu"  # NVIDIA's vGPU guest images set it in their ENV
    return Settings.from_env(env_for(root, DRIVER_CTR_SOURCE_DIR=str(sources), **env))


@pytest.mark.parametrize("golden", INIT_GOLDENS)
def test_golden_driver_container_reaches_its_end_state(golden, root, tmp_path, capfd):
    """``nvidia-driver init`` with the rendering's environment, in-process (fixture builder, fake kernel), to
    Ready and through a SIGTERM: the GPU driver loaded and the state file the digest, plus what the
    configuration needs: NVIDIA's sources in the driver root (GDS, GDRCopy), nvidia-peermem in the published
    tree for the sidecar's chroot modprobe (RDMA), the licence installed and nvidia-gridd started (vGPU),
    the image's bundle taken with no build (precompiled)."""
    from fixture_builder import FixtureBuilder
    from harness import RHEL_KERNEL, copy_fixture_sources, make_fixture_module, make_fixture_modules
    from inprocess import Node, in_process, node_runner, run_until_ready_then_term

    from driver_ctr.commands import build, init
    from driver_ctr.commands.options import BuildOptions, InitOptions
    from driver_ctr.tools import Tools

    sources = make_fixture_modules(copy_fixture_sources(tmp_path / "nvidia-src"), RHEL_KERNEL)
    settings = _golden_settings(golden, root, sources)
    if settings.gpu_direct_rdma_enabled:
        make_fixture_module(sources, "nvidia-peermem", RHEL_KERNEL, depends="nvidia")
    if settings.driver_type == "vgpu":
        (root / "drivers/ClientConfigToken").mkdir(parents=True)
        (root / "drivers/gridd.conf").write_text("FeatureType=1\n")
        (root / "drivers/ClientConfigToken/client_configuration_token.tok").write_text("token")
    settings.paths.validations_dir.mkdir(parents=True)
    node = Node(root)
    runner = node_runner(node)
    runner.expect(("nvidia-gridd",))
    builds: List[str] = []

    def builder(_runner):
        builds.append(golden)
        return FixtureBuilder()

    if golden == "precompiled":  # the image carries its bundle for this kernel: built before, stored
        assert in_process(build.build, settings, BuildOptions(False, None, None), Tools(runner, builder)) == 0
        builds.clear()
    capfd.readouterr()
    status, seen = run_until_ready_then_term(
        init.run, settings, node, settings, InitOptions(accept_license=False, max_threads=None), Tools(runner, builder)
    )
    assert status == 0 and seen, capfd.readouterr().err[-3000:]
    assert seen[0]["loaded"][:3] == ["nvidia", "nvidia_modeset", "nvidia_uvm"]
    assert seen[0]["state"] == settings.driver_config_digest
    sources_link = root / "usr/src/nvidia-535.261.03"
    if settings.gds_enabled or settings.gdrcopy_enabled:
        assert (sources_link / "kernel/Makefile").is_file() and not os.path.isabs(os.readlink(str(sources_link)))
    else:
        assert not sources_link.is_symlink()  # (the precompiled image's store is a real directory there)
    assert ("nvidia-peermem.ko" in seen[0]["published"]) == settings.gpu_direct_rdma_enabled
    gridd = [c for c in runner.calls if c[0] == "nvidia-gridd"]
    assert bool(gridd) == (settings.driver_type == "vgpu")
    if gridd:
        assert (root / "etc/nvidia/gridd.conf").read_text() == "FeatureType=1\n"
        assert (root / "etc/nvidia/ClientConfigToken/client_configuration_token.tok").read_text() == "token"
    found = [json.loads(line)["source"] for line in capfd.readouterr().err.splitlines() if '"modules found"' in line]
    assert (found, builds) == ((["precompiled"], []) if golden == "precompiled" else ([], [golden]))


@pytest.mark.parametrize("golden", ["rdma", "rdma-hostmofed"])
def test_golden_peermem_sidecar_loads_the_module_in_the_driver_root(golden, root):
    """The nvidia-peermem sidecar (``reload_nvidia_peermem``) with the rendering's environment, in-process:
    it waits for MOFED (the MOFED container's readiness, or with USE_HOST_MOFED the host's mlx5_core) and
    the driver container's readiness, loads nvidia-peermem in the driver root (``chroot /run/nvidia/driver
    modprobe``), then holds until a SIGTERM, which ends it at once."""
    from harness import env_for
    from inprocess import Node, node_runner, run_until_then_term

    from driver_ctr.commands import peermem
    from driver_ctr.commands.options import NoOptions
    from driver_ctr.tools import Tools

    sidecar = next(c for c in _containers(golden) if c["name"] == "nvidia-peermem-ctr")
    env = {k: v for k, v in _env(sidecar).items() if k != "DRIVER_VERSION"}
    settings = Settings.from_env(env_for(root, **env))
    node = Node(root)
    runner = node_runner(node, "chroot")
    (root / "sys/module").mkdir(parents=True, exist_ok=True)
    settings.paths.validations_dir.mkdir(parents=True)
    (settings.paths.validations_dir / ".driver-ctr-ready").write_text("")  # the driver's startup probe
    if settings.use_host_mofed:
        (root / "sys/module/mlx5_core").mkdir()  # the host's MOFED is loaded
    else:
        (root / "run/mellanox/drivers").mkdir(parents=True)
        (root / "run/mellanox/drivers/.driver-ready").write_text("")  # the MOFED container's readiness
    loaded = root / "sys/module/nvidia_peermem"
    status, held = run_until_then_term(
        peermem.reload, loaded.is_dir, root / "sys/module", settings, NoOptions(), Tools(runner=runner)
    )
    assert status == 0 and held
    assert runner.calls == [("chroot", str(settings.paths.driver_root), "modprobe", "nvidia-peermem")]
