"""Loading a verified module tree on the running kernel.

``load_tree`` (the order of reference §2.5, from the staged tree with
``modprobe -d``, as KMM does):

1. vermagic of every NVIDIA module against the running kernel, before any
   insmod (a module for another kernel is refused with both strings);
2. parameters: ``/drivers/<module>.conf`` checked against the modules'
   declared parameters, written as ``options`` drop-ins;
3. the firmware search path rule;
4. ``i2c_core ipmi_msghandler ipmi_devintf`` (best effort), then nvidia,
   nvidia-uvm, nvidia-modeset (``video`` comes in as its dependency when the
   kernel has it as a module), nvidia-peermem with RDMA and a Mellanox
   device. The first failure stops the sequence with its diagnosis: the
   "Unknown symbol" errors nvidia-uvm would hit after nvidia failed are
   never reported as a cause.

What comes before and after (the lock, readiness, daemons, driver root,
waiting for a signal, shutdown) is the lifecycle in ``service``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Dict, List, Optional

from ..toolkit import nvidia_modules as nv
from ..toolkit.errors import ProtocolError
from ..toolkit.fsio import replace_symlink
from ..toolkit.kernel_tree import first_module
from ..toolkit.log import get_logger
from ..toolkit.modinfo import ModInfo, read_modinfo, vermagic_problem
from ..toolkit.runner import Runner
from ..toolkit.settings import Settings
from . import module_params
from .load_diagnosis import Facts, KernelLog, LoadFailed, diagnose
from .state import configure_firmware_path, mellanox_present, pci_devices

if TYPE_CHECKING:
    from ..module_trees import ModuleTree


@dataclass
class LoadReport:
    loaded: List[str] = field(default_factory=list)
    failed: Dict[str, str] = field(default_factory=dict)  # optional modules that did not load, and why
    params: Dict[str, List[str]] = field(default_factory=dict)
    firmware: str = ""


def running_kernel_vermagic(settings: Settings, kernel: str) -> str:
    """The vermagic of a module of the running kernel, when one is installed here."""
    ref = first_module(settings.paths.module_dir(kernel))
    if ref is None:
        return ""
    try:
        return read_modinfo(ref).vermagic
    except ProtocolError:
        return ""


def symbol_providers(tree: "ModuleTree") -> Dict[str, str]:
    out = {}
    f = tree.root / "modules.symbols"
    if f.is_file():
        for line in f.read_text(errors="replace").splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[1].startswith("symbol:"):
                out[parts[1][len("symbol:") :]] = parts[2]
    return out


class Loader:
    def __init__(self, settings: Settings, runner: Optional[Runner] = None) -> None:
        self.settings = settings
        self.paths = settings.paths
        self.runner = runner or Runner()
        self.log = get_logger()

    def wanted(self) -> List[str]:
        mods = list(nv.BASE)
        if self.settings.gpu_direct_rdma_enabled:
            if mellanox_present(self.paths):
                mods.append(nv.PEERMEM)
            else:
                self.log.info(
                    "RDMA is on but no Mellanox device (PCI vendor 0x15b3) is present: nvidia-peermem not loaded"
                )
        return mods

    def modinfos(self, tree: "ModuleTree", mods: List[str]) -> Dict[str, ModInfo]:
        out = {}
        for m in list(mods):
            p = tree.root / nv.staged_path(m)
            if not p.is_file() and m in nv.OPTIONAL:
                mods.remove(m)
                self.log.warning(
                    "%s is not in the verified build: not loaded (the GPU driver loads without it)" % m,
                    tree=str(tree.root),
                    hint="nvidia-peermem is built only against MOFED's kernel tree: see the build's manifest "
                    "(details.not_built) or its log",
                )
                continue
            if not p.is_file():
                raise LoadFailed(
                    m,
                    "%s is not in the staged tree %s" % (p.name, tree.root),
                    "rebuild: the hand-off tree is incomplete",
                )
            out[m] = read_modinfo(p)
        return out

    def check_vermagic(self, infos: Dict[str, ModInfo], kernel: str, kernel_vermagic: str) -> None:
        ref = kernel_vermagic or None
        for m, info in infos.items():
            problem = vermagic_problem(nv.ko_file(m), info.vermagic, kernel, ref)
            if problem:
                raise LoadFailed(
                    m,
                    "refused before insmod: %s.ko was built for another kernel: module vermagic %r, "
                    "running kernel %r" % (m, info.vermagic, ref or kernel),
                    "rebuild for the running kernel; a stale build or cache entry is never loaded",
                )

    def modprobe_base(self, tree: "ModuleTree", kernel: str) -> List[str]:
        """``modprobe -d <root>`` where ``<root>/lib/modules/<kernel>`` is the tree."""
        base = self.paths.run_nvidia / "driver-ctr" / "modroot"
        replace_symlink(base / "lib" / "modules" / kernel, tree.root)
        return ["modprobe", "-d", str(base), "-C", str(self.paths.modprobe_d), "-S", kernel]

    def load_tree(self, tree: "ModuleTree") -> LoadReport:
        """Load ``tree`` on the running kernel (a tree built for another kernel is refused)."""
        kernel = self.settings.running_kernel()
        if tree.kernel != kernel:
            raise LoadFailed(
                "nvidia",
                "the staged tree is for kernel %s, the node runs %s" % (tree.kernel, kernel),
                "rebuild for the running kernel",
            )
        mods = self.wanted()
        infos = self.modinfos(tree, mods)
        kernel_vermagic = running_kernel_vermagic(self.settings, kernel)
        self.check_vermagic(infos, kernel, kernel_vermagic)
        params = module_params.read_param_files(self.paths.drivers_dir)
        params = module_params.with_defaults(module_params.usable(params, infos, self.log), infos)
        module_params.write_dropins(self.paths.modprobe_d, params)
        report = LoadReport(params={m: [p.word for p in ps] for m, ps in params.items() if ps})
        report.firmware = configure_firmware_path(
            self.paths,
            {p.name: p.kernel_value for p in params.get("nvidia", []) if p.kernel_value is not None},
            self.log,
        )
        base = self.modprobe_base(tree, kernel)
        companions = self.runner.run(base + ["-a", *nv.COMPANIONS], timeout=120, check=False)
        if companions.returncode != 0:
            self.log.warning(
                "could not load i2c/ipmi companions (nvidia loads without them)",
                error=(companions.stderr or companions.stdout).strip().splitlines()[-1:],
            )
        nouveau_loaded = (self.paths.sys / "module/nouveau").is_dir()
        nvidia_pci_devices = pci_devices(self.paths, "0x10de")
        for m in mods:
            klog = KernelLog(self.paths.kmsg).mark()
            try:
                res = self.runner.run(base + ["--first-time", m], timeout=600, check=False)
                if res.returncode != 0:
                    facts = Facts(
                        module=m,
                        module_vermagic=infos[m].vermagic,
                        signed=infos[m].signed,
                        symbol_providers=symbol_providers(tree),
                        kernel_release=kernel,
                        kernel_vermagic=kernel_vermagic,
                        nouveau_loaded=nouveau_loaded,
                        nvidia_pci_devices=nvidia_pci_devices,
                    )
                    failure = diagnose(facts, (res.stderr + "\n" + res.stdout).strip(), klog.lines())
                    if m not in nv.OPTIONAL:
                        raise failure
                    self.log.error(
                        "could not load %s: the GPU driver stays loaded without it" % m,
                        cause=failure.cause,
                        next_step=failure.next_step,
                        kernel_log=failure.kernel_log[-15:],
                    )
                    report.failed[m] = failure.cause
                    continue
            finally:
                klog.close()
            report.loaded.append(m)
            self.log.info("loaded", module=m, version=infos[m].version)
        return report
