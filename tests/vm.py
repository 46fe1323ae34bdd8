"""A real Debian kernel under qemu as the "node" where modules are loaded.

The guest's root is an overlay: this machine's ``/`` shared read-only over
9p (so the guest runs the host's Python, the project and kmod, unchanged)
under a tmpfs, so every path is writable in the guest only: ``/drivers``,
``/etc/modprobe.d``, ``/run/nvidia`` are the real paths, nothing re-rooted.
A second, writable 9p share (``/run/out`` in the guest) carries the script
in and the results out. KVM is tried first only where it can boot a stock
kernel; here it cannot (a PVM host), so TCG it is (about 5-10 s a boot).

``boot(kernel, script)`` runs ``script`` (sh) as root in the guest and
returns its exit status, its output and the kernel log.
"""

from __future__ import annotations

import gzip
import lzma
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

QEMU = "qemu-system-x86_64"
BUSYBOX = "/bin/busybox"
INIT_MODULES = ("virtio_pci", "9pnet_virtio", "9p", "overlay")
BUSYBOX_APPLETS = (
    "sh",
    "mount",
    "mkdir",
    "chroot",
    "insmod",
    "poweroff",
    "cat",
    "echo",
    "sleep",
    "umount",
    "switch_root",
    "ls",
)

INIT = r"""#!/bin/sh
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /mods/order); do insmod /mods/$m || echo "VMINIT insmod $m failed"; done
mkdir -p /lower /upper /newroot
mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose,msize=262144 hostroot /lower || echo "VMINIT 9p root failed"
mount -t tmpfs -o size=512m tmpfs /upper
mkdir -p /upper/u /upper/w
mount -t overlay -o lowerdir=/lower,upperdir=/upper/u,workdir=/upper/w overlay /newroot || echo "VMINIT overlay failed"
mount -t tmpfs tmpfs /newroot/run
mkdir -p /newroot/run/out
mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 out /newroot/run/out || echo "VMINIT out share failed"
mount --move /proc /newroot/proc
mount --move /sys /newroot/sys
mount --move /dev /newroot/dev
echo "VMINIT ready"
chroot /newroot /bin/sh -c 'cd /; sh /run/out/guest.sh > /run/out/stdout 2> /run/out/stderr; echo $? > /run/out/rc; dmesg > /run/out/dmesg 2>/dev/null; sync'
poweroff -f
"""


@dataclass
class VmResult:
    rc: Optional[int]
    stdout: str
    stderr: str
    dmesg: str
    console: str
    seconds: float
    out: Path


def unavailable_reason(kernel: str) -> Optional[str]:
    """Why a VM cannot run here (None when it can)."""
    if not shutil.which(QEMU):
        return "%s is not installed (scripts/test installs qemu-system-x86)" % QEMU
    if not os.path.exists(BUSYBOX):
        return "busybox-static is not installed (scripts/test installs it)"
    if not Path("/boot/vmlinuz-%s" % kernel).is_file():
        return "no /boot/vmlinuz-%s (linux-image-%s is not installed)" % (kernel, kernel)
    return None


def _module_files(kernel: str) -> List[Path]:
    """The modules the init needs, in load order, each once."""
    out = subprocess.run(
        ["modprobe", "-S", kernel, "--show-depends", "-a", *INIT_MODULES],
        capture_output=True,
        text=True,
        check=True,
        env=dict(os.environ, PATH=os.environ.get("PATH", "") + ":/sbin:/usr/sbin"),
    ).stdout
    seen: List[Path] = []
    for line in out.splitlines():
        parts = line.split()
        if parts and parts[0] == "insmod" and Path(parts[1]) not in seen:
            seen.append(Path(parts[1]))
    return seen


def build_initramfs(kernel: str, dest: Path) -> Path:
    """A busybox initramfs that mounts the 9p/overlay root (cached per kernel)."""
    if dest.is_file():
        return dest
    work = Path(tempfile.mkdtemp(prefix="vm-initramfs-"))
    try:
        for d in ("bin", "proc", "sys", "dev", "mods"):
            (work / d).mkdir()
        shutil.copy2(BUSYBOX, str(work / "bin/busybox"))
        for a in BUSYBOX_APPLETS:
            (work / "bin" / a).symlink_to("busybox")
        names = []
        for ko in _module_files(kernel):
            data = ko.read_bytes()
            if ko.name.endswith(".xz"):
                data = lzma.decompress(data)
            elif ko.name.endswith(".zst"):
                data = subprocess.run(["zstd", "-dc"], input=data, capture_output=True, check=True).stdout
            name = ko.name.split(".ko")[0] + ".ko"
            (work / "mods" / name).write_bytes(data)
            names.append(name)
        (work / "mods/order").write_text("\n".join(names) + "\n")
        (work / "init").write_text(INIT)
        (work / "init").chmod(0o755)
        files = subprocess.run(
            ["sh", "-c", "cd %s && find . | sort" % work], capture_output=True, text=True, check=True
        ).stdout
        cpio = subprocess.run(
            ["cpio", "-o", "-H", "newc", "--quiet"],
            input=files.encode(),
            cwd=str(work),
            capture_output=True,
            check=True,
        ).stdout
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_suffix(".tmp")
        tmp.write_bytes(gzip.compress(cpio, compresslevel=1))
        tmp.replace(dest)
    finally:
        shutil.rmtree(str(work), ignore_errors=True)
    return dest


def boot(
    kernel: str,
    script: str,
    out: Path,
    cache_dir: Path,
    append: str = "",
    timeout: float = 600,
    memory_mb: int = 1536,
    files: Optional[Dict[str, str]] = None,
) -> VmResult:
    """Boot ``kernel``, run ``script`` as root in the guest, power off."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "guest.sh").write_text(script)
    for name, text in (files or {}).items():
        (out / name).write_text(text)
    initrd = build_initramfs(kernel, cache_dir / ("initramfs-%s.cpio.gz" % kernel))
    argv = [
        "timeout",
        str(int(timeout)),
        QEMU,
        "-accel",
        "tcg",
        "-cpu",
        "max",
        "-m",
        str(memory_mb),
        "-smp",
        "1",
        "-nographic",
        "-no-reboot",
        "-nic",
        "none",
        "-kernel",
        "/boot/vmlinuz-%s" % kernel,
        "-initrd",
        str(initrd),
        "-append",
        "console=ttyS0 panic=-1 loglevel=4 " + append,
        "-virtfs",
        "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
        "-virtfs",
        "local,path=%s,mount_tag=out,security_model=none,multidevs=remap" % out,
    ]
    t0 = time.monotonic()
    p = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True)
    took = time.monotonic() - t0

    def read(name: str) -> str:
        f = out / name
        return f.read_text(errors="replace") if f.is_file() else ""

    rc_text = read("rc").strip()
    return VmResult(
        rc=int(rc_text) if rc_text.lstrip("-").isdigit() else None,
        stdout=read("stdout"),
        stderr=read("stderr"),
        dmesg=read("dmesg"),
        console=p.stdout.decode(errors="replace") + p.stderr.decode(errors="replace"),
        seconds=took,
        out=out,
    )


LOAD_FROM_HOST_CACHE = r"""
O=/run/out
mkdir -p /tmp/empty-shared
python -m driver_ctr nvidia-driver load > $O/load.out 2> $O/load.err &
P=$!
i=0; while [ $i -lt 3000 ]; do grep -qsx Ready /run/nvidia/validations/.driver-daemons-status && break; kill -0 $P 2>/dev/null || break; sleep 0.2; i=$((i+1)); done
cat /proc/modules > $O/modules
kill -TERM $P 2>/dev/null; wait $P; echo $? > $O/load.rc
"""


def guest_exports(kernel: str, **extra: str) -> str:
    """``export`` lines for the project's commands in the guest: the host's Python and this checkout, the
    operator's variables, ``kernel`` as the node kernel, JSON logs, modules only (no NVIDIA userspace)."""
    repo = Path(__file__).resolve().parent.parent
    env = {
        "PATH": "%s:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" % os.path.dirname(sys.executable),
        "PYTHONPATH": str(repo),
        "HOME": "/root",
        "DRIVER_VERSION": "535.261.03",
        "TARGETARCH": "amd64",
        "DRIVER_CONFIG_DIGEST": "3522141578",
        "DRIVER_CTR_LOG_FORMAT": "json",
        "DRIVER_CTR_KERNEL_RELEASE": kernel,
        "DRIVER_CTR_USERSPACE": "none",
    }
    env.update(extra)
    return "".join("export %s=%s\n" % (k, shlex.quote(v)) for k, v in env.items())


def load_from_host_cache(kernel: str, cache: Path, out: Path, **extra: str) -> VmResult:
    """``nvidia-driver load`` in the guest, its modules from the host cache ``cache`` (no shared dir):
    the guest's ``load.err``, ``load.rc`` and ``modules`` (``/proc/modules`` at Ready or at the end)."""
    script = guest_exports(kernel, DRIVER_CTR_SHARED_DIR="/tmp/empty-shared", DRIVER_CTR_CACHE_DIR=str(cache), **extra)
    return boot(kernel, script + LOAD_FROM_HOST_CACHE, out, Path(__file__).resolve().parent.parent / ".cache" / "vm")


if __name__ == "__main__":  # manual use: python tests/vm.py KERNEL 'sh commands'
    r = boot(sys.argv[1], sys.argv[2], Path(tempfile.mkdtemp(prefix="vm-out-")), Path(".cache/vm"))
    print(r.stdout, r.stderr, "rc=%s in %.1f s" % (r.rc, r.seconds), sep="\n")
