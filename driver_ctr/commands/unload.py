"""``nvidia-driver unload``: stop the daemons (they hold the devices open), then
unload the NVIDIA modules; refuse, naming the holders, when in use."""

from __future__ import annotations

from typing import Optional

from ..node.daemons import stop_daemons
from ..node.unload import unload
from ..toolkit.log import get_logger
from ..toolkit.settings import Settings
from ..tools import Tools
from .options import NoOptions


def run(settings: Settings, options: NoOptions, tools: Optional[Tools] = None) -> int:
    log = get_logger()
    stop_daemons(settings.paths, log)
    unload(settings.paths, (tools or Tools()).runner, log)
    return 0
