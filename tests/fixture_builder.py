"""A builder for protocol tests, given to the DTK side by ``fixture_dtk.py`` or to a command in-process
(never shipped in the package).

It stages the ``*.ko`` of the request's source directory (prepared fixture
modules) instead of compiling. The directory may hold ``FAIL`` (its text
becomes the build log and the failure), ``DELAY`` (seconds to sleep
mid-build, to test restarts during a build) and ``RAISE`` (``ENOSPC`` or
another errno name: that OSError ends the build, as a full disk would;
``bug``: a RuntimeError, as a bug would).
"""

from __future__ import annotations

import errno
import os
import shutil
import time

from driver_ctr.toolkit.builders import Builder, BuildRequest, BuildResult
from driver_ctr.toolkit.errors import BuildFailed, tail_lines
from driver_ctr.toolkit.nvidia_modules import SUBDIR


class FixtureBuilder(Builder):
    name = "fixture"

    def build(self, request: BuildRequest) -> BuildResult:
        source = request.source
        with open(str(request.log_path), "a", encoding="utf-8") as log:
            log.write("fixture build from %s for %s\n" % (source, request.target_kernel))
            delay = source / "DELAY"
            if delay.is_file():
                time.sleep(float(delay.read_text().strip() or "0"))
            raised = source / "RAISE"
            if raised.is_file():
                what = raised.read_text().strip()
                if what == "bug":
                    raise RuntimeError("a bug in the builder")
                code = getattr(errno, what)
                raise OSError(code, os.strerror(code), str(request.staging_dir / "nvidia.ko"))
            fail = source / "FAIL"
            if fail.is_file():
                text = fail.read_text()
                log.write(text)
                log.flush()
                lines = [line for line in text.splitlines() if line.strip()]
                raise BuildFailed("compile", lines[-1] if lines else "fixture failure", tail_lines(text, 20))
            kos = sorted(source.glob("*.ko"))
            if not kos:
                raise BuildFailed("stage", "no .ko files in fixture directory %s" % source)
            dest = request.staging_dir / SUBDIR
            dest.mkdir(parents=True, exist_ok=True)
            for ko in kos:
                shutil.copy2(str(ko), str(dest / ko.name))
                log.write("staged %s\n" % ko.name)
        return BuildResult(builder=self.name)
