"""Which compiler built the node's kernel (the fallback installs that gcc): .config first, else the
``Linux version`` banner of the kernel image, decompressed in Python (gzip, xz, bzip2) or by zstd."""

from __future__ import annotations

import gzip
import lzma
import struct
from pathlib import Path

import pytest
from harness import installed_kernels

from driver_ctr.fallback.kernel_compiler import compiler_of_banner, kernel_compiler_text, linux_banner
from driver_ctr.toolkit.kernel_tree import compiler_version
from driver_ctr.toolkit.paths import HostPaths
from driver_ctr.toolkit.runner import Runner

RHEL_BANNER = (
    "Linux version 5.14.0-427.13.1.el9_4.x86_64 (mockbuild@x86-64-01.build.eng.rdu2.redhat.com) "
    "(gcc (GCC) 11.4.1 20231218 (Red Hat 11.4.1-3), GNU ld version 2.35.2-43.el9) #1 SMP PREEMPT_DYNAMIC"
)


def _bzimage(payload: bytes, setup_sects: int = 3) -> bytes:
    """A minimal x86 bzImage: boot header with the payload's offset and length, then the payload."""
    head = bytearray((setup_sects + 1) * 512)
    head[0x1F1] = setup_sects
    head[0x202:0x206] = b"HdrS"
    struct.pack_into("<II", head, 0x248, 64, len(payload))
    return bytes(head) + b"\0" * 64 + payload + b"\0" * 100


@pytest.mark.parametrize("compress", [gzip.compress, lzma.compress])
def test_the_banner_comes_out_of_a_compressed_bzimage(tmp_path, compress):
    kernel = b"\x7fELF" + b"\0" * 5000 + RHEL_BANNER.encode() + b"\n\0" + b"\x90" * 5000
    (tmp_path / "vmlinuz").write_bytes(_bzimage(compress(kernel)))
    banner = linux_banner(tmp_path / "vmlinuz")
    assert banner == RHEL_BANNER
    assert compiler_of_banner(banner) == "gcc (GCC) 11.4.1 20231218 (Red Hat 11.4.1-3)"
    assert compiler_version(compiler_of_banner(banner)) == "11.4.1"


def test_an_image_without_a_banner_gives_nothing(tmp_path):
    (tmp_path / "vmlinuz").write_bytes(_bzimage(gzip.compress(b"no banner here" * 100)))
    assert linux_banner(tmp_path / "vmlinuz") == ""


@pytest.mark.parametrize("pattern", [r"6\.1\.0-\d+-amd64", r"6\.12\.\d+\+deb12-amd64"])
def test_debians_real_images_xz_and_zstd_name_the_compiler_their_config_names(pattern):
    """Debian's 6.1 image is xz-compressed, its 6.12 image zstd: the banner names the compiler
    the kernel's own .config names."""
    import re

    kernel = next((k for k in installed_kernels() if re.fullmatch(pattern, k)), None)
    image = Path("/boot/vmlinuz-%s" % kernel)
    if kernel is None or not image.is_file():
        pytest.skip("no /boot image of a kernel matching %s (scripts/setup-test-deps installs it)" % pattern)
    banner = linux_banner(image, Runner())
    assert banner.startswith("Linux version %s " % kernel)
    config = Path("/boot/config-%s" % kernel).read_text()
    assert 'CONFIG_CC_VERSION_TEXT="%s"' % compiler_of_banner(banner) in config


def test_the_config_wins_and_the_image_serves_without_one(tmp_path):
    paths = HostPaths(str(tmp_path))
    k = "5.14.0-427.13.1.el9_4.x86_64"
    mod = tmp_path / "lib/modules" / k
    mod.mkdir(parents=True)
    (mod / "vmlinuz").write_bytes(_bzimage(gzip.compress(RHEL_BANNER.encode())))
    assert kernel_compiler_text(paths, k) == "gcc (GCC) 11.4.1 20231218 (Red Hat 11.4.1-3)"
    tree = tmp_path / "usr/src/kernels" / k
    tree.mkdir(parents=True)
    (tree / ".config").write_text('CONFIG_CC_VERSION_TEXT="gcc (GCC) 11.5.0 20240719 (Red Hat 11.5.0-2)"\n')
    (mod / "build").symlink_to("/usr/src/kernels/" + k)  # an image path, re-rooted
    assert kernel_compiler_text(paths, k) == "gcc (GCC) 11.5.0 20240719 (Red Hat 11.5.0-2)"
    assert kernel_compiler_text(paths, "6.1.0-1-amd64") == ""
