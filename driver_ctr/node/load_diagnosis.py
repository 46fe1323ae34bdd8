"""One clear cause and next step for each known module-load failure.

Inputs: the module, modprobe's error text, the kernel log lines of the
attempt (``/dev/kmsg`` from just before it), and facts about the module and
node. Known failures: ENODEV (no GPU, or nouveau bound), ENOEXEC (vermagic),
"Unknown symbol", EKEYREJECTED (Secure Boot / signature enforcement), EEXIST
(already loaded), EPERM/ENOSYS (no privilege / loading disabled).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from ..toolkit.errors import DriverCtrError

_UNKNOWN_SYMBOL = re.compile(r"(\S+): Unknown symbol (\S+)")


class LoadFailed(DriverCtrError):
    """A module did not load; ``cause`` is the one-line diagnosis."""

    def __init__(
        self, module: str, cause: str, next_step: str, kernel_log: Sequence[str] = (), detail: str = ""
    ) -> None:
        self.module = module
        self.cause = cause
        self.next_step = next_step
        self.kernel_log = list(kernel_log)
        self.detail = detail
        lines = ["could not load %s: %s" % (module, cause), "  next step: %s" % next_step]
        if detail:
            lines.append("  modprobe: %s" % detail)
        if self.kernel_log:
            lines.append("  kernel log of the attempt:")
            lines += ["    %s" % l for l in self.kernel_log[-15:]]
        super().__init__("\n".join(lines))


class KernelLog:
    """Kernel log records written after :meth:`mark` (``/dev/kmsg``)."""

    def __init__(self, dev: Path) -> None:
        self.dev = dev
        self.fd: Optional[int] = None

    def mark(self) -> "KernelLog":
        self.close()
        try:
            self.fd = os.open(str(self.dev), os.O_RDONLY | os.O_NONBLOCK)
            os.lseek(self.fd, 0, os.SEEK_END)
        except OSError:
            self.fd = None
        return self

    def lines(self) -> List[str]:
        out: List[str] = []
        if self.fd is None:
            return out
        while True:
            try:
                rec = os.read(self.fd, 8192)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == 32:  # EPIPE: records were overwritten; keep reading
                    continue
                break
            if not rec:
                break
            text = rec.decode("utf-8", "replace")
            head, _, msg = text.partition(";")
            out.append(msg.split("\n", 1)[0])
        return out

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


@dataclass
class Facts:
    module: str
    module_vermagic: str = ""
    kernel_release: str = ""
    kernel_vermagic: str = ""
    signed: bool = False
    nouveau_loaded: bool = False
    nvidia_pci_devices: List[str] = field(default_factory=list)
    symbol_providers: Dict[str, str] = field(default_factory=dict)  # symbol -> module name


# A rule reads the failure (modprobe's error and the kernel log, as one text) and the facts; it answers
# (cause, next step) when it knows this failure, else None. A new diagnosis is a new rule in RULES.
Diagnosis = Optional[Tuple[str, str]]


def _no_device(facts: Facts, text: str, kernel_log: Sequence[str], detail: str) -> Diagnosis:
    if "No such device" not in text and "errno 19" not in text:
        return None
    if facts.nouveau_loaded:
        return (
            "No such device (ENODEV): the nouveau driver is loaded and holds the GPU",
            "blacklist nouveau on the node (modprobe.blacklist=nouveau on the kernel command line, "
            "or the operator's nouveau blacklist) and reboot it",
        )
    seen = (
        (
            "the kernel sees NVIDIA PCI device(s) %s but the driver does not support or cannot use them"
            % ", ".join(facts.nvidia_pci_devices)
        )
        if facts.nvidia_pci_devices
        else "no NVIDIA GPU is visible to the kernel (no PCI device with vendor 0x10de)"
    )
    return (
        "No such device (ENODEV): %s" % seen,
        "check the node has an NVIDIA GPU (lspci -nn -d 10de:), that it is not passed through to a "
        "VM (vfio-pci), and that the driver branch supports it",
    )


def _other_kernel(facts: Facts, text: str, kernel_log: Sequence[str], detail: str) -> Diagnosis:
    if not any(s in text for s in ("Exec format error", "disagrees about version", "version magic")):
        return None
    return (
        "Exec format error (ENOEXEC): the module was built for another kernel: module vermagic %r, "
        "running kernel %r" % (facts.module_vermagic, facts.kernel_vermagic or facts.kernel_release),
        "rebuild for the running kernel (delete the stale build or host cache entry; check the DTK "
        "image matches the node's RHCOS)",
    )


def _key_rejected(facts: Facts, text: str, kernel_log: Sequence[str], detail: str) -> Diagnosis:
    if not any(s in text for s in ("Key was rejected", "Required key not available", "EKEYREJECTED")):
        return None
    state = "is not signed" if not facts.signed else "is signed with a key the kernel does not trust"
    return (
        "Key was rejected by service (EKEYREJECTED): the kernel enforces module signatures "
        "(Secure Boot or module.sig_enforce=1) and %s.ko %s" % (facts.module, state),
        "sign the modules: mount a key and certificate and set DRIVER_CTR_SIGNING_KEY and "
        "DRIVER_CTR_SIGNING_CERT, and enroll the certificate on the node (mokutil --import), "
        "or disable Secure Boot",
    )


def _unknown_symbol(facts: Facts, text: str, kernel_log: Sequence[str], detail: str) -> Diagnosis:
    syms = _UNKNOWN_SYMBOL.findall("\n".join(kernel_log))
    if not syms and "Unknown symbol" not in text:
        return None
    names = sorted({s for _, s in syms})
    providers = sorted({facts.symbol_providers[s] for s in names if s in facts.symbol_providers})
    missing = (
        ("provided by %s, which is not loaded" % ", ".join(providers))
        if providers
        else "not exported by any loaded module or the kernel"
    )
    return (
        "Unknown symbol%s %s: %s" % ("s" if len(names) != 1 else "", ", ".join(names[:8]) or "?", missing),
        "load the providing module first, or rebuild: the module and the kernel (or its dependencies) do not match",
    )


def _already_loaded(facts: Facts, text: str, kernel_log: Sequence[str], detail: str) -> Diagnosis:
    if "File exists" not in text:
        return None
    return (
        "File exists (EEXIST): %s is already loaded" % facts.module,
        "nothing to do if it is the wanted version (the fast path); otherwise unload it first (nvidia-driver unload)",
    )


def _not_permitted(facts: Facts, text: str, kernel_log: Sequence[str], detail: str) -> Diagnosis:
    if "Operation not permitted" not in text and "Function not implemented" not in text:
        return None
    return (
        "the kernel refused module loading (%s)" % detail,
        "run the driver container privileged on a node that allows module loading",
    )


RULES: Tuple[Callable[[Facts, str, Sequence[str], str], Diagnosis], ...] = (
    _no_device,
    _other_kernel,
    _key_rejected,
    _unknown_symbol,
    _already_loaded,
    _not_permitted,
)


def diagnose(facts: Facts, error_text: str, kernel_log: Sequence[str]) -> LoadFailed:
    """The first rule that knows this failure, else modprobe's last line."""
    text = error_text + "\n" + "\n".join(kernel_log)
    detail = error_text.strip().splitlines()[-1] if error_text.strip() else ""
    for rule in RULES:
        found = rule(facts, text, kernel_log, detail)
        if found is not None:
            return LoadFailed(facts.module, found[0], found[1], kernel_log, detail)
    return LoadFailed(facts.module, detail or "modprobe failed", "see the kernel log lines below", kernel_log, detail)
