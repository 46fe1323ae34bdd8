"""``nvidia-driver update -k KVER [-s KEYID] [-t TAG] [-m N] [--check]`` and ``build [-a] [-t TAG] [-m N]``:
precompiled bundles (``precompiled``), built ahead of time, never loaded here.

1. The target kernel: ``-k`` (its build tree installed where the command runs: an image build stage, a
   DTK, a CI job; when it is not, the fallback's package managers install it, a node-local repository
   first), or the running kernel for ``build``. Nothing is loaded.
2. The same kbuild builder as everywhere: vermagic against that kernel, staging with ``depmod``; signed
   when ``-s KEYID`` is given (the key and certificate where ``DRIVER_CTR_SIGNING_KEY`` and
   ``DRIVER_CTR_SIGNING_CERT`` say they are mounted; the key is never stored in the image).
3. ``--check``: the build in a scratch directory, pass or fail with the compiler's first error, nothing
   stored (a preflight for the next kernel, before an upgrade); missing kernel trees are installed into a
   scratch root, never into the running system.
4. Otherwise the bundle is stored in the image's precompiled store, described file by file (sha256,
   vermagic) like a host-cache entry.
"""

from __future__ import annotations

import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Optional

from .. import precompiled
from ..fallback import install_kernel_tree
from ..toolkit import protocol as proto
from ..toolkit.builders import BuildOptions as BuildRequestOptions
from ..toolkit.builders import BuildRequest, default_scratch, find_source
from ..toolkit.errors import BuildFailed, InvalidValue, NoKernelTree
from ..toolkit.fsio import remove_tree
from ..toolkit.kbuild import KbuildBuilder
from ..toolkit.log import get_logger
from ..toolkit.paths import HostPaths
from ..toolkit.runner import Runner
from ..toolkit.settings import Settings
from ..toolkit.signing import Signing
from ..toolkit.waiting import Cancellation
from .options import BuildOptions, UpdateOptions


def build(settings: Settings, options: BuildOptions) -> int:
    """``build``: a bundle for the kernel this container runs on (the reference's meaning)."""
    return _bundle(settings, settings.running_kernel(), None, options.tag, options.max_threads, check=False)


def update(settings: Settings, options: UpdateOptions) -> int:
    """``update -k KVER``: a bundle (or with ``--check`` a preflight) for kernel ``KVER``."""
    kernel = options.kernel or settings.running_kernel()
    return _bundle(settings, kernel, options.sign, options.tag, options.max_threads, check=options.check)


def _bundle(
    settings: Settings, kernel: str, sign: Optional[str], tag: Optional[str], max_threads: Optional[int], check: bool
) -> int:
    log = get_logger(side="driver", target_kernel=kernel)
    cancel = Cancellation().install()
    signing = Signing.from_settings(settings)
    if sign and signing is None:
        raise InvalidValue(
            "-s", sign, "DRIVER_CTR_SIGNING_KEY and DRIVER_CTR_SIGNING_CERT set to the mounted key and certificate"
        )
    options = BuildRequestOptions.from_settings(settings, max_threads)
    if not sign:
        options = replace(options, signing=None)
    work = Path(tempfile.mkdtemp(prefix="driver-ctr-bundle-"))
    staging = work / "modules"
    staging.mkdir()
    started = time.monotonic()
    try:
        source = find_source(
            settings.source_dir, [settings.paths.drivers_dir], settings.target_arch, settings.driver_version.raw
        )
        request = BuildRequest(
            target_kernel=kernel,
            source=source,
            paths=settings.paths,
            staging_dir=staging,
            log_path=work / "build.log",
            scratch=default_scratch(),
            options=options,
            cancel=cancel,
        )
        try:
            try:
                result = KbuildBuilder().build(request)
            except NoKernelTree as exc:
                # an image build stage without the kernel's trees: the fallback's package managers
                # (a node-local repository first: DRIVER_CTR_LOCAL_REPO) install them here; a preflight
                # installs them into its own scratch root (apt's state too) and changes nothing outside it
                root = work / "root" if check else None
                log.info("the kernel's trees are not here: installing them", reason=exc.message, root=str(root or "/"))
                install_kernel_tree(settings, kernel, Runner(cancel), log, root=root)
                if root is not None:
                    request = replace(request, paths=HostPaths(root=str(root)))
                result = KbuildBuilder().build(request)
        except BuildFailed as exc:
            if not check:
                raise
            sys.stdout.write("%s: fail: %s\n" % (kernel, exc.message))
            log.error("preflight: the driver does not build for this kernel", phase=exc.phase, reason=exc.message)
            return 1
        files = proto.describe_tree(staging, settings.module_size_limit)
        seconds = time.monotonic() - started
        if check:
            sys.stdout.write("%s: pass (%d files, %.0f s): nothing stored\n" % (kernel, len(files), seconds))
            log.info("preflight: the driver builds for this kernel", files=len(files), seconds=round(seconds, 1))
            return 0
        details = dict(result.details, tag=tag or "", signing_key_id=sign or "")
        record = proto.BuildRecord(
            builder=result.builder, files=files, components=result.components, finished_at=proto.now(), details=details
        )
        store = precompiled.open_store(settings, create=True)
        assert store is not None
        entry = store.store(precompiled.bundle_inputs(settings, kernel), record, staging)
        log.info(
            "precompiled bundle stored",
            bundle=str(entry.path),
            files=len(files),
            signed=record.signing_fingerprint != "",
            seconds=round(seconds, 1),
        )
        sys.stdout.write("%s: bundle %s\n" % (kernel, entry.path))
        return 0
    finally:
        remove_tree(work)
