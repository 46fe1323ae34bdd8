"""How many compile jobs a build may run: bounded by CPUs, memory and the user.

The reference runs ``make -j`` with no limit, which on a 2-CPU container of a
large node starts hundreds of compilers. Here the limit is the smallest of:

- the CPUs this process may run on (affinity);
- the container's CPU quota (cgroup v2 ``cpu.max``, v1 ``cpu.cfs_quota_us``);
- memory: the cgroup limit and ``MemAvailable``, at ``MEMORY_PER_JOB`` each;
- ``-m/--max-threads`` / ``DRIVER_CTR_MAX_THREADS``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional, Tuple

MEMORY_PER_JOB = 1 << 30  # NVIDIA's largest objects peak at a few hundred MB in cc1


@dataclass(frozen=True)
class JobPlan:
    jobs: int
    limits: Dict[str, int] = field(default_factory=dict)  # what each bound allowed

    @property
    def bound_by(self) -> str:
        return ",".join(k for k, v in sorted(self.limits.items()) if v == self.jobs)


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def _cgroup_dirs(proc: Path, sys: Path) -> Tuple[Optional[Path], Dict[str, Path]]:
    """The cgroup v2 directory and the v1 controller directories of this process."""
    v2: Optional[Path] = None
    v1: Dict[str, Path] = {}
    for line in _read(proc / "self" / "cgroup").splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, rel = parts
        rel = rel.lstrip("/")
        if controllers == "":
            for cand in (sys / "fs/cgroup" / rel, sys / "fs/cgroup"):
                if (cand / "cgroup.controllers").exists():
                    v2 = cand
                    break
        else:
            for c in controllers.split(","):
                for cand in (sys / "fs/cgroup" / c / rel, sys / "fs/cgroup" / c):
                    if cand.is_dir():
                        v1[c] = cand
                        break
    return v2, v1


def cpu_quota(proc: Path, sys: Path) -> Optional[int]:
    """CPUs the cgroup quota allows (rounded up), or None when unlimited."""
    v2, v1 = _cgroup_dirs(proc, sys)
    if v2 is not None:
        fields = _read(v2 / "cpu.max").split()
        if len(fields) == 2 and fields[0] != "max":
            try:
                return max(1, math.ceil(int(fields[0]) / int(fields[1])))
            except (ValueError, ZeroDivisionError):
                return None
        return None
    cpu = v1.get("cpu")
    if cpu is not None:
        try:
            quota = int(_read(cpu / "cpu.cfs_quota_us") or "-1")
            period = int(_read(cpu / "cpu.cfs_period_us") or "0")
        except ValueError:
            return None
        if quota > 0 and period > 0:
            return max(1, math.ceil(quota / period))
    return None


def memory_bytes(proc: Path, sys: Path) -> Optional[int]:
    """Memory a build may use: the smaller of the cgroup limit and MemAvailable."""
    values = []
    v2, v1 = _cgroup_dirs(proc, sys)
    raw = (
        _read(v2 / "memory.max")
        if v2 is not None
        else (_read(v1["memory"] / "memory.limit_in_bytes") if "memory" in v1 else "")
    )
    if raw.isdigit() and int(raw) < (1 << 60):
        values.append(int(raw))
    for line in _read(proc / "meminfo").splitlines():
        if line.startswith("MemAvailable:"):
            parts = line.split()
            if len(parts) >= 2 and parts[1].isdigit():
                values.append(int(parts[1]) * 1024)
    return min(values) if values else None


def plan_jobs(proc: Path, sys: Path, max_threads: Optional[int] = None) -> JobPlan:
    limits: Dict[str, int] = {}
    try:
        limits["affinity"] = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        limits["affinity"] = os.cpu_count() or 1
    quota = cpu_quota(proc, sys)
    if quota is not None:
        limits["cpu_quota"] = quota
    mem = memory_bytes(proc, sys)
    if mem is not None:
        limits["memory"] = max(1, mem // MEMORY_PER_JOB)
    if max_threads:
        limits["max_threads"] = max_threads
    return JobPlan(jobs=max(1, min(limits.values())), limits=limits)
