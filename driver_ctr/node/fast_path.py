"""The fast path, decided once: the driver is already loaded with this configuration.

Reference rule (common.sh): ``/sys/module/nvidia/refcnt`` exists and
``/run/nvidia/nvidia-driver.state`` equals a non-empty ``DRIVER_CONFIG_DIGEST``;
driver-ctr also requires ``/sys/module/nvidia/version`` to be ``DRIVER_VERSION``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional

from ..toolkit.settings import Settings


@dataclass(frozen=True)
class FastPath:
    applies: bool
    reason: str
    facts: Dict[str, Any] = field(default_factory=dict)


def _read(path: Path) -> Optional[str]:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def decide_fast_path(settings: Settings) -> FastPath:
    paths = settings.paths
    mod = paths.sys / "module" / "nvidia"
    loaded = (mod / "refcnt").exists()
    version = _read(mod / "version")
    digest = _read(paths.state_file)
    facts = {
        "nvidia_loaded": loaded,
        "loaded_version": version,
        "state_digest": digest,
        "config_digest": settings.driver_config_digest,
    }
    if not loaded:
        return FastPath(False, "the nvidia module is not loaded", facts)
    if not settings.driver_config_digest:
        return FastPath(False, "DRIVER_CONFIG_DIGEST is empty", facts)
    if digest != settings.driver_config_digest:
        return FastPath(False, "the state digest %r differs from DRIVER_CONFIG_DIGEST" % digest, facts)
    if version != settings.driver_version.number:
        return FastPath(
            False, "the loaded nvidia module is version %r, not %s" % (version, settings.driver_version.number), facts
        )
    return FastPath(True, "loaded with this configuration", facts)
