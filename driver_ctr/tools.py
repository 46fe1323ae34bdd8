"""The seams every command passes down: what runs child processes and what builds.

A command takes a :class:`Tools` (the real ones by default) and hands it to where module trees come from
(``module_trees``) and to the lifecycle (``service``); nothing below constructs its own runner or builder.
Tests give a fake runner and the fixture builder, and run a whole command in-process.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from .toolkit.builders import Builder
from .toolkit.kbuild import KbuildBuilder
from .toolkit.runner import Runner


@dataclass(frozen=True)
class Tools:
    runner: Runner = field(default_factory=Runner)
    new_builder: Callable[[Runner], Builder] = KbuildBuilder

    def builder(self) -> Builder:
        """A builder whose children run through this runner."""
        return self.new_builder(self.runner)
