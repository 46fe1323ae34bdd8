"""vGPU guests (``DRIVER_TYPE=vgpu``): the licence configuration, the grid daemons, the version check.

As the reference does:

- **licence**: ``/drivers/gridd.conf`` (the operator's licensing ConfigMap) is installed as
  ``/etc/nvidia/gridd.conf``; with ``VGPU_LICENSE_SERVER_TYPE=NLS`` the client configuration token(s) of
  ``/drivers/ClientConfigToken/`` go to ``/etc/nvidia/ClientConfigToken/``. Either missing is a named
  error before any daemon starts (the reference copied nothing and ``nvidia-gridd`` ran unlicensed).
- **daemons**: ``nvidia-gridd`` (``LD_LIBRARY_PATH``: its libraries where the image's distribution puts
  them, ``/usr/lib64/nvidia/gridd`` on RHEL, ``/usr/lib/<arch>-linux-gnu/nvidia/gridd`` on Debian and
  Ubuntu) and, when installed,
  ``nvidia-topologyd``; stopped like the others (``daemons.DAEMONS``: pid file, pid checked).
- **version check** (unless ``DISABLE_VGPU_VERSION_CHECK=true``): ``vgpu-util count``; with vGPU devices,
  ``vgpu-util match`` against the driver catalog (``vgpuDriverCatalog.yaml`` in the shared dir's
  ``drivers/`` when there is one, else ``/drivers``) picks the guest driver version the host supports,
  for every command that loads or builds (``init``, ``load``, ``nv-ctr-run-with-dtk``: the DTK side
  builds the selected version, which ``settings.json`` carries).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path
from typing import List, Optional

from ..toolkit.errors import CommandFailed, DriverCtrError
from ..toolkit.fsio import atomic_write_bytes, atomic_write_text
from ..toolkit.inputs import read_input, read_input_text
from ..toolkit.log import Logger
from ..toolkit.runner import Runner
from ..toolkit.settings import Settings
from ..toolkit.versions import parse_driver_version

GRIDD_CONF = "/etc/nvidia/gridd.conf"
TOKENS_DIR = "/etc/nvidia/ClientConfigToken"
GRIDD_LIBS = ("/usr/lib64/nvidia/gridd", "/usr/lib/%s-linux-gnu/nvidia/gridd")  # RHEL; Debian, Ubuntu
CATALOG = "vgpuDriverCatalog.yaml"


class VgpuError(DriverCtrError):
    """A vGPU guest cannot be configured: the message names the file or tool and what is expected."""


def install_licence(settings: Settings, log: Logger) -> None:
    """``gridd.conf`` and, for NLS, the client configuration tokens, from ``/drivers``."""
    paths = settings.paths
    src = paths.drivers_dir / "gridd.conf"
    if not os.path.lexists(str(src)):  # anything else there is read, and named when it is not a regular file
        raise VgpuError(
            "DRIVER_TYPE=vgpu needs the licence configuration %s (the operator mounts the licensing-config "
            "ConfigMap there: driver.licensingConfig.configMapName / secretName)" % src
        )
    atomic_write_text(paths.host(GRIDD_CONF), read_input_text(src, "vGPU file"))
    if settings.vgpu_license_server_type == "NLS":
        tokens_src = paths.drivers_dir / "ClientConfigToken"
        tokens = sorted(p for p in tokens_src.glob("*") if p.is_file()) if tokens_src.is_dir() else []
        if not tokens:
            raise VgpuError(
                "VGPU_LICENSE_SERVER_TYPE=NLS needs a client configuration token in %s (the licensing "
                "config's client_configuration_token.tok)" % tokens_src
            )
        dest = paths.host(TOKENS_DIR)
        dest.mkdir(parents=True, exist_ok=True)
        for t in tokens:
            atomic_write_bytes(dest / t.name, read_input(t, "vGPU file"))
        log.info("NLS client configuration token installed", tokens=[t.name for t in tokens], to=str(dest))
    log.info("vGPU licence configuration installed", gridd_conf=str(paths.host(GRIDD_CONF)))


def start_grid_daemons(settings: Settings, runner: Runner, log: Logger) -> List[str]:
    """``nvidia-gridd`` with its libraries, then ``nvidia-topologyd`` when installed; the names started."""
    install_licence(settings, log)
    env = dict(os.environ, LD_LIBRARY_PATH=gridd_libs(settings))
    try:
        runner.run(["nvidia-gridd"], env=env, timeout=120)
    except CommandFailed as exc:
        raise VgpuError("nvidia-gridd did not start: %s" % exc.summary) from None
    started = ["nvidia-gridd"]
    if shutil.which("nvidia-topologyd"):
        runner.run(["nvidia-topologyd"], timeout=120)
        started.append("nvidia-topologyd")
    return started


def gridd_libs(settings: Settings) -> str:
    """Where this image's distribution keeps nvidia-gridd's libraries: the one that exists, else the
    Debian/Ubuntu path on a Debian-based image (``/etc/debian_version``), else RHEL's."""
    rhel, debian = GRIDD_LIBS[0], GRIDD_LIBS[1] % settings.target_arch
    for candidate in (rhel, debian):
        if settings.paths.host(candidate).is_dir():
            return candidate
    return debian if settings.paths.host("/etc/debian_version").exists() else rhel


def _value(text: str, key: str) -> str:
    for line in text.splitlines():
        k, sep, v = line.strip().partition("=")
        if sep and k.strip() == key:
            return v.strip()
    return ""


def select_version(settings: Settings, runner: Runner, log: Logger) -> Optional[str]:
    """The guest driver version the host's vGPU manager supports (``vgpu-util``), or None to keep
    ``DRIVER_VERSION`` (check disabled, no vgpu-util devices, passthrough)."""
    if settings.disable_vgpu_version_check:
        log.info("vgpu version compatibility check is disabled")
        return None
    count = runner.run(["vgpu-util", "count"], timeout=120, check=False)
    if count.returncode != 0:
        log.warning("cannot find vgpu devices on host: see /var/log/vgpu-util.log", output=count.stderr.strip())
        return None
    devices = _value(count.stdout, "count")
    if not devices.isdigit() or int(devices) == 0:
        log.info("no vgpu devices found: passthrough", vgpu_util=count.stdout.strip())
        return None
    drivers: Path = settings.paths.shared_dir / "drivers"
    if not drivers.is_dir():
        drivers = settings.paths.drivers_dir
    match = runner.run(
        ["vgpu-util", "match", "-i", str(drivers), "-c", str(drivers / CATALOG)], timeout=120, check=False
    )
    version = _value(match.stdout, "version")
    if match.returncode != 0 or not version:
        raise VgpuError(
            "no guest driver in %s matches this host's vGPU manager (%d vGPU devices; catalog %s): %s"
            % (
                drivers,
                int(devices),
                drivers / CATALOG,
                (match.stderr or match.stdout).strip() or "vgpu-util match failed",
            )
        )
    log.info("vgpu driver version selected", version=version, devices=int(devices))
    return version


def with_selected_version(settings: Settings, runner: Runner, log: Logger) -> Settings:
    """``settings`` with the driver version ``select_version`` picks, for a vGPU guest (else unchanged)."""
    if settings.driver_type != "vgpu":
        return settings
    chosen = select_version(settings, runner, log)
    if not chosen or chosen == settings.driver_version.raw:
        return settings
    version = parse_driver_version(chosen)
    raw = dict(settings.raw, DRIVER_VERSION=chosen, DRIVER_BRANCH=str(version.branch))  # settings.json carries it
    return dataclasses.replace(
        settings, driver_version=version, driver_branch=version.branch, raw=tuple(sorted(raw.items()))
    )
