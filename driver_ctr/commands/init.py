"""``nvidia-driver init [-a] [-m N]``: the driver container without a DTK.

Lifecycle (``service``): lock, NotReady, then the body below, then load,
serve and wait for a signal.

0. A vGPU guest (``DRIVER_TYPE=vgpu``): the guest driver version the host supports (``vgpu``).
1. The fast path, decided once: the loaded driver is ours and its digest matches.
2. The userspace install from the ``.run`` (with ``-a``: ``--accept-license``).
3. Fast path: nothing to load. Otherwise the module tree: the shared dir's
   build, the host cache, a build here, or the fallback (``module_trees.for_init``).
"""

from __future__ import annotations

from typing import Optional

from .. import module_trees
from ..module_trees import ModuleTree
from ..node.fast_path import decide_fast_path
from ..node.userspace import userspace_install
from ..node.vgpu import with_selected_version
from ..service import Service
from ..toolkit.log import get_logger
from ..toolkit.settings import Settings
from ..toolkit.waiting import Cancellation
from ..tools import Tools
from .options import InitOptions


def run(settings: Settings, options: InitOptions, tools: Optional[Tools] = None) -> int:
    tools = tools or Tools()
    cancel = Cancellation().install()
    settings = with_selected_version(settings, tools.runner.with_cancel(cancel), get_logger())  # vGPU guests only

    def body(service: Service) -> Optional[ModuleTree]:
        fp = decide_fast_path(settings)
        userspace_install(settings, service.runner, service.log, accept_license=options.accept_license, cancel=cancel)
        if fp.applies:
            service.log.info("fast path: the driver is loaded with this configuration", **fp.facts)
            return None
        service.log.info("fast path not taken", reason=fp.reason)
        return module_trees.for_init(settings, cancel, tools, options.max_threads)

    return Service(settings, cancel, tools).run(body)
