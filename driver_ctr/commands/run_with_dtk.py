"""``ocp_dtk_entrypoint nv-ctr-run-with-dtk [--dry-run]``: the driver container beside the DTK.

Lifecycle (``service``): lock, NotReady, then the body below, then load,
serve and wait for a signal.

1. The fast path, decided once: the loaded driver is ours and its digest matches.
2. ``RHCOS_IMAGE_MISSING=true``: no DTK for this RHCOS; fall back.
3. The module tree through the two-container protocol (``module_trees.for_dtk``):
   the host cache handed over to the DTK side, or the DTK's build, verified;
   a broken DTK falls back.
4. The userspace install, then the tree is loaded.

``--dry-run`` stops after the verification (step 3), without the lock, the
readiness file or any load: for tests and diagnostics.
"""

from __future__ import annotations

from typing import Optional

from .. import module_trees
from ..module_trees import ModuleTree
from ..node.fast_path import decide_fast_path
from ..node.userspace import userspace_install
from ..node.vgpu import with_selected_version
from ..service import Service
from ..toolkit.errors import Cancelled
from ..toolkit.log import get_logger
from ..toolkit.settings import Settings
from ..toolkit.waiting import Cancellation
from ..tools import Tools
from .options import RunWithDtkOptions


def _tree(settings: Settings, cancel: Cancellation, tools: Tools) -> Optional[ModuleTree]:
    """The tree to load, or None on the fast path."""
    log = get_logger()
    fp = decide_fast_path(settings)
    if fp.applies:  # before RHCOS_IMAGE_MISSING, as the reference's fallback (init) takes its fast path too
        log.info("fast path: the driver is loaded with this configuration; userspace-only install", **fp.facts)
        return None
    log.info("fast path not taken: building driver and modules", reason=fp.reason)
    return module_trees.for_dtk(settings, cancel, tools)


def run(settings: Settings, options: RunWithDtkOptions, tools: Optional[Tools] = None) -> int:
    tools = tools or Tools()
    cancel = Cancellation().install()
    settings = with_selected_version(settings, tools.runner.with_cancel(cancel), get_logger())  # vGPU guests
    if options.dry_run:
        try:
            tree = _tree(settings, cancel, tools)
        except Cancelled as exc:
            get_logger().info("stopping", reason=str(exc))
            return 0
        get_logger().info(
            "dry run: stopping before loading", fast_path=tree is None, tree=str(tree.root) if tree else None
        )
        return 0

    def body(service: Service) -> Optional[ModuleTree]:
        tree = _tree(settings, cancel, tools)
        userspace_install(settings, service.runner, service.log, cancel=cancel)
        return tree

    return Service(settings, cancel, tools).run(body)
