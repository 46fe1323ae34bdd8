"""The builder interface the DTK side calls, and the builders available so far.

A builder fills an empty staging directory with a module tree laid out as
``/lib/modules/<kver>`` (``kernel/drivers/video/nvidia.ko`` …) and writes its
output to the build log. It raises :class:`BuildFailed` on failure.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from .errors import BuildFailed, tail_lines

MODULE_SUBDIR = "kernel/drivers/video"


@dataclass(frozen=True)
class BuildRequest:
    settings: Any
    kernel_release: str
    shared_dir: Path
    staging_dir: Path
    log_path: Path
    build_tree: Optional[str] = None
    cancel: Any = None  # a waiting.Cancellation: long builds stop on SIGTERM


@dataclass(frozen=True)
class BuildResult:
    builder: str
    components: Tuple[str, ...] = ("nvidia",)  # plus "nvidia-fs", "gdrcopy" when built
    details: Optional[Dict[str, Any]] = None  # recorded in the manifest (flavour, jobs, compiler...)


class Builder:
    name = "abstract"

    def build(self, request: BuildRequest) -> BuildResult:  # pragma: no cover - interface
        raise NotImplementedError


class FixtureBuilder(Builder):
    """Stages the ``*.ko`` of a prepared directory (``DRIVER_CTR_FIXTURE_MODULES``).

    For protocol tests: the directory may hold ``FAIL`` (its text becomes the
    build log and the failure) and ``DELAY`` (seconds to sleep mid-build, to
    test restarts during a build).
    """

    name = "fixture"

    def __init__(self, source: Path) -> None:
        self.source = source

    def build(self, request: BuildRequest) -> BuildResult:
        with open(str(request.log_path), "a", encoding="utf-8") as log:
            log.write("fixture build from %s for %s\n" % (self.source, request.kernel_release))
            delay = self.source / "DELAY"
            if delay.is_file():
                time.sleep(float(delay.read_text().strip() or "0"))
            fail = self.source / "FAIL"
            if fail.is_file():
                text = fail.read_text()
                log.write(text)
                log.flush()
                lines = [l for l in text.splitlines() if l.strip()]
                raise BuildFailed("compile", lines[-1] if lines else "fixture failure", tail_lines(text, 20))
            kos = sorted(self.source.glob("*.ko"))
            if not kos:
                raise BuildFailed("stage", "no .ko files in fixture directory %s" % self.source)
            dest = request.staging_dir / MODULE_SUBDIR
            dest.mkdir(parents=True, exist_ok=True)
            for ko in kos:
                shutil.copy2(str(ko), str(dest / ko.name))
                log.write("staged %s\n" % ko.name)
        return BuildResult(builder=self.name)
