"""``nvidia-driver load``: load a build made earlier (shared dir, host cache), serve, wait.

The reference's ``load`` never said NotReady, so a stale Ready of a killed pod
stayed; here the lifecycle (``service``) says it first.
"""

from __future__ import annotations

from .. import module_trees
from ..module_trees import ModuleTree
from ..service import Service
from ..toolkit.settings import Settings
from ..toolkit.waiting import Cancellation
from ..userspace import userspace_install
from .options import NoOptions


def run(settings: Settings, options: NoOptions) -> int:
    cancel = Cancellation().install()

    def body(service: Service) -> ModuleTree:
        tree = module_trees.for_load(settings, cancel)
        userspace_install(settings, service.runner, service.log, cancel=cancel)  # as the reference's load
        return tree

    return Service(settings, cancel).run(body)
