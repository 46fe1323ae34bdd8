"""The typed options of each command, as ``cli`` fills them from the arguments."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class InitOptions:
    accept_license: bool = False
    max_threads: Optional[int] = None  # -m: wins over DRIVER_CTR_MAX_THREADS


@dataclass(frozen=True)
class BuildOptions:
    accept_license: bool = False
    tag: Optional[str] = None
    max_threads: Optional[int] = None


@dataclass(frozen=True)
class UpdateOptions:
    kernel: Optional[str] = None  # -k: the target kernel (default: the running one)
    sign: Optional[str] = None  # -s KEYID
    tag: Optional[str] = None
    max_threads: Optional[int] = None
    check: bool = False  # --check: build in scratch, report, store nothing


@dataclass(frozen=True)
class StatusOptions:
    json: bool = False


@dataclass(frozen=True)
class RunWithDtkOptions:
    dry_run: bool = False


@dataclass(frozen=True)
class NoOptions:
    """For the commands that take none (load, unload, the peermem pair)."""
