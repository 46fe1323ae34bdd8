"""``nvidia-driver load``: load a build made earlier (shared dir, the bundle ``build`` stored, host cache), serve, wait.

The lifecycle (``service``) says NotReady first, so a stale Ready of a killed pod never outlives this start.
"""

from __future__ import annotations

from typing import Optional

from .. import module_trees
from ..module_trees import ModuleTree
from ..node.userspace import userspace_install
from ..node.vgpu import with_selected_version
from ..service import Service
from ..toolkit.log import get_logger
from ..toolkit.settings import Settings
from ..toolkit.waiting import Cancellation
from ..tools import Tools
from .options import NoOptions


def run(settings: Settings, options: NoOptions, tools: Optional[Tools] = None) -> int:
    tools = tools or Tools()
    cancel = Cancellation().install()
    settings = with_selected_version(settings, tools.runner.with_cancel(cancel), get_logger())  # vGPU guests

    def body(service: Service) -> ModuleTree:
        tree = module_trees.for_load(settings, cancel, tools)
        userspace_install(settings, service.runner, service.log, cancel=cancel)  # as the reference's load
        return tree

    return Service(settings, cancel, tools).run(body)
