"""``nvidia-driver build [-a] [-t TAG] [-m N]`` and ``update [-k VER] [-s KEYID] [-t TAG] [-m N]``:
precompiled bundles (the ``build``/``update -k`` issue). Parsed exactly as the
reference; each says it is not implemented yet."""

from __future__ import annotations

from ..toolkit.errors import NotImplementedYet
from ..toolkit.settings import Settings
from .options import BuildOptions, UpdateOptions


def build(settings: Settings, options: BuildOptions) -> int:
    raise NotImplementedYet("build (precompiled modules for the running kernel: the build/update issue)")


def update(settings: Settings, options: UpdateOptions) -> int:
    raise NotImplementedYet("update (precompiled modules for a kernel: the build/update issue)")
