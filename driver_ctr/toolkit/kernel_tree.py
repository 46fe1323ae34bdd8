"""The target kernel's trees: where kbuild runs and what the kernel was built with.

- ``SYSSRC``/``SYSOUT``: RHEL's kernel-devel is one tree
  (``/lib/modules/<k>/build`` -> ``/usr/src/kernels/<k>``); Debian and Ubuntu
  split it into ``source`` (the common headers) and ``build`` (the generated,
  arch part), and NVIDIA's conftest needs both.
- The kernel configuration (``.config`` of the build tree): PREEMPT_RT, the
  compiler the kernel was built with, the vermagic feature flags.
- A module of the same kernel (``/lib/modules/<k>/kernel/...``): its vermagic
  is the ground truth the built modules must match.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional

from .errors import BuildFailed, CommandFailed, NoKernelTree
from .inputs import read_input_text
from .modinfo import read_modinfo
from .nvidia_modules import is_module
from .paths import HostPaths
from .runner import Runner

_CONFIG_LINE = re.compile(r"^(CONFIG_[A-Za-z0-9_]+)=(.*)$")
_CC_VERSION = re.compile(r"\)\s+(\d+\.\d+(?:\.\d+)?)")
_ANY_VERSION = re.compile(r"(\d+\.\d+(?:\.\d+)?)")


def parse_config(text: str) -> Dict[str, str]:
    """``CONFIG_X=value`` lines of a kernel .config; quotes removed."""
    out: Dict[str, str] = {}
    for line in text.splitlines():
        m = _CONFIG_LINE.match(line.strip())
        if m:
            v = m.group(2)
            if len(v) >= 2 and v[0] == v[-1] == '"':
                v = v[1:-1]
            out[m.group(1)] = v
    return out


def compiler_version(text: str) -> str:
    """The version number in a compiler banner: ``gcc-12 (Debian 12.2.0-14) 12.2.0``
    and ``gcc (GCC) 11.4.1 20231218 (Red Hat 11.4.1-3)`` give 12.2.0 and 11.4.1."""
    m = _CC_VERSION.search(text) or _ANY_VERSION.search(text)
    return m.group(1) if m else ""


def first_module(module_dir: Path) -> Optional[Path]:
    """The first module (in sorted order) under ``<module_dir>/kernel``, or None."""
    kdir = module_dir / "kernel"
    if not kdir.is_dir():
        return None
    for dirpath, dirnames, filenames in os.walk(str(kdir)):
        dirnames.sort()
        for name in sorted(filenames):
            if is_module(name):
                return Path(dirpath) / name
    return None


@dataclass(frozen=True)
class KernelTree:
    release: str
    module_dir: Path  # /lib/modules/<k>
    syssrc: Path
    sysout: Path
    config: Dict[str, str] = field(default_factory=dict)

    @property
    def split(self) -> bool:
        return self.syssrc != self.sysout

    @property
    def preempt_rt(self) -> bool:
        return self.config.get("CONFIG_PREEMPT_RT") == "y" or self.config.get("CONFIG_PREEMPT_RT_FULL") == "y"

    @property
    def compiler_text(self) -> str:
        return self.config.get("CONFIG_CC_VERSION_TEXT", "")

    @property
    def compiler(self) -> str:
        """The C compiler the kernel names (NVIDIA's Makefile uses it when it exists)."""
        text = self.compiler_text
        return text.split()[0] if text.split() else "gcc"

    @property
    def signing_hash(self) -> str:
        return self.config.get("CONFIG_MODULE_SIG_HASH", "")

    def config_vermagic_flags(self) -> Optional[str]:
        """The vermagic feature flags the configuration implies (include/linux/vermagic.h),
        or None when they cannot be derived (RANDSTRUCT, 32-bit x86, no config)."""
        c = self.config
        if (
            not c
            or c.get("CONFIG_RANDSTRUCT") == "y"
            or c.get("CONFIG_GCC_PLUGIN_RANDSTRUCT") == "y"
            or c.get("CONFIG_X86_32") == "y"
        ):
            return None
        flags = []
        if c.get("CONFIG_SMP") == "y":
            flags.append("SMP")
        if c.get("CONFIG_PREEMPT_RT") == "y":
            flags.append("preempt_rt")
        elif c.get("CONFIG_PREEMPT_BUILD") == "y" or c.get("CONFIG_PREEMPT") == "y":
            flags.append("preempt")
        if c.get("CONFIG_MODULE_UNLOAD") == "y":
            flags.append("mod_unload")
        if c.get("CONFIG_MODVERSIONS") == "y":
            flags.append("modversions")
        if c.get("CONFIG_ARM64") == "y":
            flags.append("aarch64")
        return " ".join(flags)

    def reference_module(self) -> Optional[Path]:
        """One module of this kernel, if its modules are installed."""
        return first_module(self.module_dir)

    def reference_vermagic(self) -> Optional[str]:
        """The vermagic every module of this kernel carries: from a module of
        the kernel when one is installed, else derived from the configuration."""
        ref = self.reference_module()
        if ref is not None:
            return read_modinfo(ref).vermagic
        flags = self.config_vermagic_flags()
        return None if flags is None else "%s %s " % (self.release, flags)

    def sign_file(self) -> Optional[Path]:
        for tree in (self.sysout, self.syssrc):
            p = tree / "scripts" / "sign-file"
            if p.is_file() and os.access(str(p), os.X_OK):
                return p
        return None


# In a kernel's module directory while the fallback installs its packages: a half-install is never trusted.
INCOMPLETE = ".driver-ctr-install-incomplete"


def open_kernel_tree(paths: HostPaths, release: str, build_tree: Optional[Path] = None) -> KernelTree:
    """The trees of ``release``; a missing or incomplete tree is a BuildFailed
    that says what is missing. ``build_tree`` is the tree the DTK decision
    resolved, when there was one."""
    module_dir = paths.module_dir(release)
    if os.path.lexists(str(module_dir / INCOMPLETE)):
        raise NoKernelTree(
            "the kernel's packages for %s were being installed when a start ended (%s): installed again"
            % (release, module_dir / INCOMPLETE)
        )
    build = module_dir / "build"
    sysout = Path(build_tree) if build_tree else paths.follow(build)
    if not sysout.is_dir():
        raise NoKernelTree(
            "no kernel build tree for %s: %s does not resolve to a directory (install "
            "kernel-devel-%s, or linux-headers-%s on Debian/Ubuntu)" % (release, build, release, release)
        )
    source = module_dir / "source"
    syssrc = paths.follow(source) if (source.exists() or source.is_symlink()) else sysout
    for tree, what in ((sysout, "build"), (syssrc, "source")):
        if not (tree / "Makefile").is_file():
            raise BuildFailed(
                "prepare", "kernel %s tree %s for %s has no Makefile: not a kernel build tree" % (what, tree, release)
            )
    cfg = sysout / ".config"
    if not cfg.is_file():
        raise BuildFailed("prepare", "kernel build tree %s for %s has no .config" % (sysout, release))
    config = parse_config(read_input_text(cfg, "kernel tree file"))
    return KernelTree(release=release, module_dir=module_dir, syssrc=syssrc, sysout=sysout, config=config)


def present_compiler_version(runner: Runner, compiler: str) -> str:
    """``<compiler> -dumpfullversion`` (gcc), or '' when it cannot be run."""
    for argv in ([compiler, "-dumpfullversion"], [compiler, "-dumpversion"]):
        try:
            out = runner.run(argv, timeout=30, check=False)
        except CommandFailed:
            return ""
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    return ""
