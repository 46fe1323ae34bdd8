"""Read a kernel module's ``.modinfo`` with pyelftools (no modinfo binary needed).

Handles plain ``.ko`` and the compressed ``.ko.xz`` / ``.ko.zst`` / ``.ko.gz``
forms (zst needs the ``zstd`` tool).
"""

from __future__ import annotations

import gzip
import io
import lzma
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Set, Tuple

from .errors import CommandFailed, ProtocolError
from .nvidia_modules import module_name

SIGNATURE_TRAILER = b"~Module signature appended~\n"


@dataclass(frozen=True)
class ModInfo:
    path: str
    fields: Dict[str, Tuple[str, ...]] = field(default_factory=dict)
    signed: bool = False

    def get(self, key: str, default: str = "") -> str:
        v = self.fields.get(key)
        return v[0] if v else default

    @property
    def name(self) -> str:
        return self.get("name") or module_name(self.path)

    @property
    def version(self) -> str:
        return self.get("version")

    @property
    def vermagic(self) -> str:
        return self.get("vermagic")

    @property
    def depends(self) -> List[str]:
        return [d for d in self.get("depends").split(",") if d]

    @property
    def srcversion(self) -> str:
        return self.get("srcversion")

    @property
    def parameters(self) -> Dict[str, str]:
        """Parameter name -> type (``int``, ``charp``, ``uint``, …)."""
        out: Dict[str, str] = {}
        for entry in self.fields.get("parmtype", ()):
            name, _, typ = entry.partition(":")
            out[name] = typ
        for entry in self.fields.get("parm", ()):
            name = entry.partition(":")[0]
            out.setdefault(name, "")
        return out


def has_signature(path: Path) -> bool:
    """Whether an (uncompressed) module ends with the signature trailer: reads only its tail."""
    with open(str(path), "rb") as f:
        f.seek(0, 2)
        size = f.tell()
        f.seek(max(0, size - len(SIGNATURE_TRAILER)))
        return f.read() == SIGNATURE_TRAILER


def preload() -> None:
    """Import pyelftools now (the driver side calls this before waiting, so the
    first verification after driver_built does not pay the import)."""
    import elftools.elf.elffile  # noqa: F401


def _decompress(path: Path, raw: bytes) -> bytes:
    name = path.name
    if name.endswith(".xz"):
        return lzma.decompress(raw)
    if name.endswith(".gz"):
        return gzip.decompress(raw)
    if name.endswith(".zst"):
        from .runner import default_runner

        return default_runner().run(["zstd", "-dc"], input_bytes=raw, timeout=120).stdout_bytes
    return raw


def read_modinfo(path: Path, raw: Optional[bytes] = None) -> ModInfo:
    """Parse ``.modinfo``; a file that is not a module is a ProtocolError naming it.

    An uncompressed module is parsed from the file: only its ELF headers and
    ``.modinfo`` are read, never the whole (80 MB) file into memory. A
    compressed one is decompressed in memory (the kernel's own modules: small).
    ``raw`` is the content when the caller already holds it.
    """
    path = Path(path)
    # Imported here: pyelftools costs ~0.3 s to import from the zipapp, and the
    # DTK side must reach driver_build_started without paying it.
    from elftools.common.exceptions import ELFError
    from elftools.elf.elffile import ELFFile

    compressed = path.name.endswith((".xz", ".gz", ".zst"))
    try:
        if raw is None and not compressed:
            with open(str(path), "rb") as f:
                size = os.fstat(f.fileno()).st_size
                try:
                    sec = ELFFile(f).get_section_by_name(".modinfo")
                    data = sec.data() if sec is not None else None
                except ELFError as exc:
                    raise ProtocolError(path, "not an ELF kernel module: %s" % exc) from None
                f.seek(max(0, size - len(SIGNATURE_TRAILER)))
                signed = f.read() == SIGNATURE_TRAILER
        else:
            content = _decompress(path, raw if raw is not None else path.read_bytes())
            signed = content.endswith(SIGNATURE_TRAILER)
            try:
                sec = ELFFile(io.BytesIO(content)).get_section_by_name(".modinfo")
                data = sec.data() if sec is not None else None
            except ELFError as exc:
                raise ProtocolError(path, "not an ELF kernel module: %s" % exc) from None
    except (OSError, lzma.LZMAError, EOFError, CommandFailed) as exc:
        raise ProtocolError(path, "cannot read kernel module: %s" % exc) from None
    if data is None:
        raise ProtocolError(path, "no .modinfo section: not a kernel module")
    fields: Dict[str, List[str]] = {}
    for item in data.split(b"\0"):
        if not item or b"=" not in item:
            continue
        k, _, v = item.decode("utf-8", "replace").partition("=")
        fields.setdefault(k, []).append(v)
    return ModInfo(path=str(path), fields={k: tuple(v) for k, v in fields.items()}, signed=signed)


def undefined_symbols(path: Path) -> Set[str]:
    """The symbols an (uncompressed) module imports: undefined in its ELF symbol table."""
    from elftools.common.exceptions import ELFError
    from elftools.elf.elffile import ELFFile
    from elftools.elf.sections import SymbolTableSection

    try:
        with open(str(path), "rb") as f:
            symtab = ELFFile(f).get_section_by_name(".symtab")
            if not isinstance(symtab, SymbolTableSection):
                return set()
            return {s.name for s in symtab.iter_symbols() if s["st_shndx"] == "SHN_UNDEF" and s.name}
    except (OSError, ELFError) as exc:
        raise ProtocolError(path, "cannot read kernel module symbols: %s" % exc) from None


def vermagic_problem(
    path: object, vermagic: str, kernel_release: str, reference_vermagic: Optional[str] = None
) -> Optional[str]:
    """Why the module at ``path`` with ``vermagic`` cannot load on
    ``kernel_release`` (None when it can).

    The release word must be the kernel's; with ``reference_vermagic`` (a module
    of the same kernel tree) the feature flags (SMP, preempt mode, mod_unload,
    modversions) must be identical too.
    """
    vm = vermagic or ""
    if not vm.split():
        return "%s has no vermagic" % path
    release = vm.split()[0]
    if release != kernel_release:
        return "%s was built for kernel %s, not %s (vermagic %r)" % (path, release, kernel_release, vm)
    if reference_vermagic is not None:
        flags = vm.split()[1:]
        want = reference_vermagic.split()[1:]
        if flags != want:
            return "%s vermagic flags %r differ from the kernel's %r" % (path, " ".join(flags), " ".join(want))
    return None
