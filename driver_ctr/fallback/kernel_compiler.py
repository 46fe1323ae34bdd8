"""Which compiler built the node's kernel: the fallback installs that gcc (as the reference does).

The kernel's own ``.config`` says it (``CONFIG_CC_VERSION_TEXT``, in the build tree kernel-devel
installs). Without one, the ``Linux version`` banner of the kernel image does: ``vmlinuz`` is a
bzImage whose payload (its offset and length are in the boot header) is compressed; gzip, xz and bzip2
are decompressed in Python, zstd (Debian's and Fedora's newer kernels) with the ``zstd`` tool, the way
the reference uses ``extract-vmlinux``. Other images (arm64's ``Image.gz``) are tried from every
compression magic they contain.
"""

from __future__ import annotations

import bz2
import lzma
import re
import struct
import zlib
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

from ..toolkit.errors import CommandFailed
from ..toolkit.inputs import read_input, read_input_text
from ..toolkit.kernel_tree import parse_config
from ..toolkit.paths import HostPaths
from ..toolkit.runner import Runner

_MAGICS = (
    (b"\x1f\x8b\x08", "gzip"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"BZh", "bzip2"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
)
_BANNER = re.compile(rb"Linux version [\x20-\x7e]+")
# "Linux version 6.1.0-57-amd64 (debian-kernel@lists.debian.org) (gcc-12 (Debian 12.2.0-14) 12.2.0, GNU ld ...) #1 ..."
_COMPILER = re.compile(r"^Linux version \S+ \([^()]*\) \((.*?), (?:GNU ld|LLD)")
_LIMIT = 256 << 20  # a decompressed kernel is well below this


def _payload(image: bytes) -> Optional[bytes]:
    """The compressed payload of an x86 bzImage, from its boot header (None if not a bzImage)."""
    if len(image) < 0x250 or image[0x202:0x206] != b"HdrS":
        return None
    setup_sects = image[0x1F1] or 4
    offset, length = struct.unpack_from("<II", image, 0x248)
    start = (setup_sects + 1) * 512 + offset
    return image[start : start + length] if length and start + length <= len(image) else None


def _decompress(data: bytes, kind: str, runner: Optional[Runner]) -> bytes:
    try:
        if kind == "gzip":
            return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(data, _LIMIT)
        if kind == "xz":
            return lzma.LZMADecompressor().decompress(data, _LIMIT)
        if kind == "bzip2":
            return bz2.BZ2Decompressor().decompress(data, _LIMIT)
    except (zlib.error, lzma.LZMAError, OSError, EOFError):
        return b""
    if runner is None:
        return b""
    try:  # zstd: not in this Python's standard library
        return runner.run(["zstd", "-dcq"], input_bytes=data, timeout=120, check=False).stdout_bytes
    except (CommandFailed, OSError):
        return b""


def _candidates(image: bytes) -> Iterator[Tuple[bytes, str]]:
    payload = _payload(image)
    if payload is not None:
        for magic, kind in _MAGICS:
            if payload.startswith(magic):
                yield payload, kind
                return
    for magic, kind in _MAGICS:  # not a bzImage: every place a compressed stream may start
        at = image.find(magic)
        while at >= 0:
            yield image[at:], kind
            at = image.find(magic, at + 1)


def linux_banner(vmlinuz: Path, runner: Optional[Runner] = None) -> str:
    """The ``Linux version ...`` line of a kernel image, or '' when none is found."""
    image = read_input(vmlinuz, "kernel image")
    found = _BANNER.search(image)  # an uncompressed image
    tried = 0
    for data, kind in [] if found else _candidates(image):
        tried += 1
        if tried > 16:
            break
        found = _BANNER.search(_decompress(data, kind, runner))
        if found:
            break
    return found.group(0).decode("ascii", "replace") if found else ""


def compiler_of_banner(banner: str) -> str:
    """``gcc-12 (Debian 12.2.0-14) 12.2.0`` out of a ``Linux version`` banner, or ''."""
    m = _COMPILER.match(banner)
    return m.group(1) if m else ""


def kernel_compiler_text(paths: HostPaths, kernel: str, runner: Optional[Runner] = None) -> str:
    """The compiler banner of ``kernel``: ``CONFIG_CC_VERSION_TEXT`` of its build tree's .config,
    else the banner of its image (``/lib/modules/<k>/vmlinuz``, ``/boot/vmlinuz-<k>``); '' if neither."""
    module_dir = paths.module_dir(kernel)
    config = paths.follow(module_dir / "build") / ".config"
    if config.is_file():
        text = parse_config(read_input_text(config, "kernel tree file")).get("CONFIG_CC_VERSION_TEXT", "")
        if text:
            return text
    images: List[Path] = [module_dir / "vmlinuz", paths.host("/boot/vmlinuz-%s" % kernel)]
    for image in images:
        if image.is_file():
            text = compiler_of_banner(linux_banner(image, runner))
            if text:
                return text
    return ""
