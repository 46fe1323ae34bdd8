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
from typing import Mapping, Optional

from .. import precompiled
from ..fallback import LATEST, install_kernel_tree, newest_kernel
from ..toolkit.builders import BuildOptions as BuildRequestOptions
from ..toolkit.builders import BuildRequest, DescribedBuild, build_and_describe, request_for
from ..toolkit.errors import BuildFailed, InvalidValue, NoKernelTree
from ..toolkit.fsio import remove_tree
from ..toolkit.log import Logger, get_logger
from ..toolkit.paths import HostPaths
from ..toolkit.settings import Settings
from ..toolkit.signing import Signing
from ..toolkit.waiting import Cancellation
from ..tools import Tools
from .options import BuildOptions, UpdateOptions


def build(settings: Settings, options: BuildOptions, tools: Optional[Tools] = None) -> int:
    """``build``: a bundle for the kernel this container runs on (the reference's meaning)."""
    kernel = settings.running_kernel()
    return _bundle(settings, kernel, None, options.tag, options.max_threads, False, tools or Tools())


def update(settings: Settings, options: UpdateOptions, tools: Optional[Tools] = None) -> int:
    """``update -k KVER``: a bundle (or with ``--check`` a preflight) for kernel ``KVER``; ``latest``: the newest
    kernel of the running kernel's flavour the package sources carry."""
    kernel = options.kernel or settings.running_kernel()
    return _bundle(settings, kernel, options.sign, options.tag, options.max_threads, options.check, tools or Tools())


def _bundle(
    settings: Settings,
    kernel: str,
    sign: Optional[str],
    tag: Optional[str],
    max_threads: Optional[int],
    check: bool,
    tools: Tools,
) -> int:
    log = get_logger(target_kernel=kernel)
    cancel = Cancellation().install()
    options = _options(settings, sign, max_threads)
    work = Path(tempfile.mkdtemp(prefix="driver-ctr-bundle-"))
    staging = work / "modules"
    staging.mkdir()
    started = time.monotonic()
    try:
        if kernel == LATEST:
            runner = tools.runner.with_cancel(cancel)
            kernel = newest_kernel(settings, runner, log, root=work / "root" if check else None)
            log = log.bind(target_kernel=kernel)
        request = request_for(settings, kernel, staging, work / "build.log", cancel, options)
        details = {"tag": tag or "", "signing_key_id": sign or ""}
        try:
            built = _build(settings, request, tools, log, details, scratch_root=work / "root" if check else None)
        except BuildFailed as exc:
            if not check:
                raise
            sys.stdout.write("%s: fail: %s\n" % (kernel, exc.message))
            log.error("preflight: the driver does not build for this kernel", phase=exc.phase, reason=exc.message)
            return 1
        seconds = time.monotonic() - started
        if check:
            files = len(built.record.files)
            sys.stdout.write("%s: pass (%d files, %.0f s): nothing stored\n" % (kernel, files, seconds))
            log.info("preflight: the driver builds for this kernel", files=files, seconds=round(seconds, 1))
            return 0
        _store(settings, kernel, built, staging, log, seconds)
        return 0
    finally:
        remove_tree(work)


def _options(settings: Settings, sign: Optional[str], max_threads: Optional[int]) -> BuildRequestOptions:
    """The build options; signed only with ``-s``, which needs the mounted key and certificate."""
    if sign and Signing.from_settings(settings) is None:
        raise InvalidValue(
            "-s", sign, "DRIVER_CTR_SIGNING_KEY and DRIVER_CTR_SIGNING_CERT set to the mounted key and certificate"
        )
    options = BuildRequestOptions.from_settings(settings, max_threads)
    return options if sign else replace(options, signing=None)


def _build(
    settings: Settings,
    request: BuildRequest,
    tools: Tools,
    log: Logger,
    details: Mapping[str, str],
    scratch_root: Optional[Path],
) -> DescribedBuild:
    """The one build path; when the kernel's trees are not here (an image build stage), the fallback's
    package managers (a node-local repository first: ``DRIVER_CTR_LOCAL_REPO``) install them first. A
    preflight (``scratch_root``) installs them into its own scratch root (apt's state too) and changes
    nothing outside it."""
    limit = settings.module_size_limit
    try:
        return build_and_describe(tools.builder(), request, limit, details=details)
    except NoKernelTree as exc:
        where = str(scratch_root or "/")
        log.info("the kernel's trees are not here: installing them", reason=exc.message, root=where)
        runner = tools.runner.with_cancel(request.cancel)
        install_kernel_tree(settings, request.target_kernel, runner, log, root=scratch_root)
        if scratch_root is not None:
            request = replace(request, paths=HostPaths(root=str(scratch_root)))
        return build_and_describe(tools.builder(), request, limit, details=details)


def _store(settings: Settings, kernel: str, built: DescribedBuild, staging: Path, log: Logger, seconds: float) -> None:
    """The bundle into the image's precompiled store."""
    store = precompiled.open_store(settings, create=True)
    assert store is not None
    entry = store.store(precompiled.bundle_inputs(settings, kernel), built.record, staging)
    log.info(
        "precompiled bundle stored",
        bundle=str(entry.path),
        files=len(built.record.files),
        signed=built.record.signing_fingerprint != "",
        seconds=round(seconds, 1),
    )
    sys.stdout.write("%s: bundle %s\n" % (kernel, entry.path))
