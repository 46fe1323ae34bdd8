"""Helpers to run both sides of the protocol as real processes on a temporary root.

Fixture modules are real ELF objects compiled by gcc with a ``.modinfo``
section naming the kernel they claim: enough for vermagic and sha256 checks
without a kernel tree (the real kbuild is tested in the build tier).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from conftest import BASE_ENV, REPO

RHEL_KERNEL = "5.14.0-427.13.1.el9_4.x86_64"
FIXTURE_DTK = REPO / "tests" / "fixture_dtk.py"
# The product's one timing contract (README, "Signals and timing"): every state ends within 2 s of a SIGTERM,
# and a wait ends within 2 s of the event it waits for (a failure flag, a file); a read of a hostile input ends
# within 2 s of starting. Tests assert it with that margin, measured from the signal or the event, never from a
# process's start. The measured figures are printed by scripts/bench-protocol.
PROMPT_S = 2.0
# A run that must end at once rather than at its deadline (a minute or more in those tests), Python's start
# and imports included: far under the deadline, far over a loaded machine's start-up.
AT_ONCE_S = 20.0
VERMAGIC_FLAGS = "SMP preempt mod_unload modversions "

_C = """
static const char m_vermagic[] __attribute__((section(".modinfo"), used, aligned(1))) = "vermagic=%(vermagic)s";
static const char m_name[] __attribute__((section(".modinfo"), used, aligned(1))) = "name=%(name)s";
static const char m_version[] __attribute__((section(".modinfo"), used, aligned(1))) = "version=%(version)s";
static const char m_depends[] __attribute__((section(".modinfo"), used, aligned(1))) = "depends=%(depends)s";
static const char m_srcversion[] __attribute__((section(".modinfo"), used, aligned(1))) = "srcversion=%(srcversion)s";
static const char m_parmtype[] __attribute__((section(".modinfo"), used, aligned(1))) = "parmtype=NVreg_Test:uint";
int %(name)s_init(void) { return 0; }
"""


def make_fixture_module(dest: Path, name: str, kernel: str, version: str = "535.261.03", depends: str = "") -> Path:
    """Compile a tiny ELF object carrying the .modinfo of a module built for ``kernel``."""
    dest.mkdir(parents=True, exist_ok=True)
    src = dest / (name + ".c")
    src.write_text(
        _C
        % {
            "vermagic": kernel + " " + VERMAGIC_FLAGS,
            "name": name.replace("-", "_"),
            "version": version,
            "depends": depends,
            "srcversion": fixture_srcversion(name, kernel, version),
        }
    )
    out = dest / (name + ".ko")
    subprocess.run(["gcc", "-c", "-o", str(out), str(src)], check=True)
    src.unlink()
    return out


def fixture_srcversion(name: str, kernel: str, version: str = "535.261.03") -> str:
    """The srcversion a fixture module carries (24 hex digits, as modpost writes it)."""
    import hashlib

    return hashlib.md5(("%s %s %s" % (name, kernel, version)).encode()).hexdigest()[:24].upper()


def make_fixture_modules(dest: Path, kernel: str) -> Path:
    make_fixture_module(dest, "nvidia", kernel, depends="drm")
    make_fixture_module(dest, "nvidia-uvm", kernel, depends="nvidia")
    make_fixture_module(dest, "nvidia-modeset", kernel, depends="nvidia,video")
    return dest


def make_dtk_image(
    root: Path,
    kernel: str = RHEL_KERNEL,
    release_json: Optional[dict] = None,
    build_tree: bool = True,
    rt_kernel: Optional[str] = None,
) -> None:
    """Lay out what a DTK image holds for ``kernel`` under ``root``."""
    trees = [kernel] + ([rt_kernel] if rt_kernel else [])
    for k in trees:
        mod = root / "lib/modules" / k
        mod.mkdir(parents=True, exist_ok=True)
        (mod / "vmlinuz").write_bytes(b"\0")
        if build_tree:
            src = root / "usr/src/kernels" / k
            src.mkdir(parents=True, exist_ok=True)
            (src / "Makefile").write_text("# kernel-devel\n")
            if not (mod / "build").exists():
                (mod / "build").symlink_to("/usr/src/kernels/" + k)
    if release_json is None:
        release_json = {"KERNEL_VERSION": kernel.split("+")[0], "RHEL_VERSION": "9.4"}
        if rt_kernel:
            release_json["RT_KERNEL_VERSION"] = rt_kernel
    (root / "etc").mkdir(parents=True, exist_ok=True)
    (root / "etc/driver-toolkit-release.json").write_text(json.dumps(release_json))


# -- the node's tools, never the test host's -----------------------------------------------------------------
# Tests never load a module into, mount onto or unload from the machine they run on: every process a test
# starts gets these stand-ins first on its PATH (env_for), whatever the host's kernel could do. They record
# their arguments in $NODE_TOOLS_LOG and answer as this project's hosts do: a load is refused
# ("Operation not permitted"), or accepted with NODE_TOOLS_LOADING=accept (a fault-injection run that must
# reach Ready). modprobe's read-only questions (--show-depends, a staging tree's) go to the real modprobe.
# Loading for real happens in the VM tier, in the guest.
NODE_TOOLS = ("modprobe", "insmod", "rmmod", "mount", "umount", "chcon", "chroot")
_STAND_IN = """#!/bin/sh
# driver-ctr test stand-in for %(tool)s (tests/harness.py): the test host is never touched
[ -n "$NODE_TOOLS_LOG" ] && echo "%(tool)s $*" >> "$NODE_TOOLS_LOG"
case %(tool)s in
  modprobe)
    for a in "$@"; do
      case "$a" in --show-depends|-D|--resolve-alias|-R|-c|--showconfig) exec %(real)s "$@" ;; esac
    done
    for a in "$@"; do case "$a" in -r|--remove) exit 0 ;; esac; done ;;
  insmod) ;;
  chroot) [ "$NODE_TOOLS_LOADING" = accept ] && exit 0
          echo "chroot: stand-in: tests never enter a node's root" >&2; exit 1 ;;
  *) exit 0 ;;
esac
[ "$NODE_TOOLS_LOADING" = accept ] && exit 0
for a in "$@"; do case "$a" in -*) ;; *) m=$a ;; esac; done
echo "%(tool)s: ERROR: could not insert '$m': Operation not permitted" >&2
exit 1
"""
_node_tools_dir: List[Path] = []


def node_tools() -> Path:
    """The directory of the stand-in node tools (made once per test process)."""
    if not _node_tools_dir:
        import tempfile

        d = Path(tempfile.mkdtemp(prefix="driver-ctr-node-tools-"))
        real = shutil.which("modprobe", path="/usr/sbin:/sbin:/usr/bin:/bin") or "/sbin/modprobe"
        for tool in NODE_TOOLS:
            (d / tool).write_text(_STAND_IN % {"tool": tool, "real": real})
            (d / tool).chmod(0o755)
        _node_tools_dir.append(d)
    return _node_tools_dir[0]


def guard_node_tools(env: Dict[str, str]) -> Dict[str, str]:
    """``env`` unchanged when the stand-in node tools come first on its PATH; otherwise the test is stopped:
    the product is never started where it could load, mount or unload on the test host."""
    first = env.get("PATH", "").split(os.pathsep)[0]
    if first != str(node_tools()):
        raise AssertionError(
            "refusing to start the product with the host's own modprobe/mount on PATH (%s): use harness.env_for" % first
        )
    return env


def fixture_python(isolated: bool = False) -> Path:
    """A directory holding a ``python3`` for the shared directory's launcher: ``python3 -c ...`` (its version
    check) is this interpreter; ``python3 ZIPAPP ARGS`` runs ``fixture_dtk.py ZIPAPP ARGS`` (the zipapp's
    DTK side with the fixture builder). ``isolated``: ``-I -S``, no site-packages, nothing of the repository
    on the path but what the zipapp carries."""
    d = Path(tempfile.gettempdir()) / ("driver-ctr-fixture-python-%d%s" % (os.getuid(), "-i" if isolated else ""))
    py = d / "python3"
    flags = "-I -S " if isolated else ""
    text = '#!/bin/sh\ncase "$1" in -c) exec %s %s"$@" ;; esac\nexec %s %s%s "$@"\n' % (
        sys.executable,
        flags,
        sys.executable,
        flags,
        FIXTURE_DTK,
    )
    if not py.is_file() or py.read_text() != text:
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / (".python3.%d" % os.getpid())
        tmp.write_text(text)
        tmp.chmod(0o755)
        os.replace(str(tmp), str(py))
    return d


def path_with(env: Dict[str, str], *first: object, rest: Optional[str] = None) -> str:
    """A PATH for ``env``: the stand-in node tools, then ``first`` (a test's own stand-ins), then ``rest``
    (default: ``env``'s PATH without the node tools)."""
    tools = str(node_tools())
    tail = env.get("PATH", "") if rest is None else rest
    return os.pathsep.join([tools, *map(str, first), *(d for d in tail.split(os.pathsep) if d and d != tools)])


def env_for(root: Path, kernel: str = RHEL_KERNEL, **extra: str) -> Dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("DRIVER_", "NVFM_", "RHCOS_", "KERNEL_MODULE", "GDS_", "GDRCOPY_"))
    }
    env.update(BASE_ENV)
    # The real interpreter first on PATH (as /usr/bin/python3 is in a DTK image),
    # not a version-manager shim that costs a shell start per call.
    env["PATH"] = os.pathsep.join((str(node_tools()), os.path.dirname(sys.executable), env.get("PATH", "")))
    env.update(
        DRIVER_CTR_ROOT=str(root),
        DRIVER_CTR_KERNEL_RELEASE=kernel,
        DRIVER_CTR_LOG_FORMAT="json",
        PYTHONPATH=str(REPO),
        DRIVER_CONFIG_DIGEST="3522141578",
    )
    fixture = extra.pop("DRIVER_CTR_FIXTURE_MODULES", None)
    if fixture is not None:
        # The DTK side stages these prepared modules instead of compiling: the launcher's python3 is the
        # test environment's (fixture_python), which runs the zipapp with the fixture builder.
        env["PATH"] = path_with(env, fixture_python())
        env["DRIVER_CTR_SOURCE_DIR"] = fixture
    env.update(extra)
    return env


def package_job(root: Path, kernel: str, runner: object, local_repo: Optional[Path] = None, **env: str) -> Any:
    """A package-manager job (``fallback.base.Job``) installing ``kernel``'s trees into ``root``, a scratch
    target (never the test host's own root); ``local_repo`` is taken as given (not re-rooted)."""
    from driver_ctr.fallback.base import Job
    from driver_ctr.toolkit.log import get_logger
    from driver_ctr.toolkit.paths import HostPaths
    from driver_ctr.toolkit.settings import Settings

    if local_repo is not None:
        env["DRIVER_CTR_LOCAL_REPO"] = str(local_repo)
    settings = Settings.from_env(dict(BASE_ENV, **env))
    return Job(settings, kernel, runner, get_logger(), HostPaths(root=str(root)))


def make_shared_dir(root: Path) -> Path:
    """Create (as the pod's emptyDir volume would be) and return the shared dir under ``root``."""
    d = root / "mnt/shared-nvidia-driver-toolkit"
    d.mkdir(parents=True, exist_ok=True)
    return d


def start_driver(env: Dict[str, str], *extra: str, dry_run: bool = True) -> subprocess.Popen:
    """``nv-ctr-run-with-dtk`` as a process; with ``dry_run`` it stops after verifying the hand-off."""
    return subprocess.Popen(
        [sys.executable, "-m", "driver_ctr", "ocp_dtk_entrypoint", "nv-ctr-run-with-dtk"]
        + (["--dry-run"] if dry_run else [])
        + list(extra),
        env=guard_node_tools(env),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def start_dtk(env: Dict[str, str], shared: Path) -> subprocess.Popen:
    """The DTK container's command, as the operator renders it (minus bash -x noise)."""
    script = "until [ -f %s/dir_prepared ]; do sleep 0.05; done; exec %s/ocp_dtk_entrypoint dtk-build-driver" % (
        shared,
        shared,
    )
    return subprocess.Popen(
        ["sh", "-c", script], env=guard_node_tools(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def finish(p: subprocess.Popen, timeout: float = 60) -> subprocess.CompletedProcess:
    """Wait for ``p``; past ``timeout`` it is killed (a test never leaves a process behind) and the test fails."""
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
        raise AssertionError(
            "%s did not end within %.0f s:\n%s" % (" ".join(map(str, p.args)), timeout, err[-3000:])
        ) from None
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def stop(p: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 10) -> float:
    """Signal ``p`` and return how long it took to exit."""
    t0 = time.monotonic()
    p.send_signal(sig)
    p.communicate(timeout=timeout)
    return time.monotonic() - t0


def wait_for_file(path: Path, timeout: float = 30) -> None:
    end = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > end:
            raise AssertionError("timed out waiting for %s" % path)
        time.sleep(0.02)


def wait_for_event(p: subprocess.Popen, timeout: float = 60, **match: object) -> List[str]:
    """Read ``p``'s stderr (JSON log lines) until an event whose fields include ``match``; the lines read.
    The synchronisation a test means ("the side is now waiting for X"), never a fixed sleep; a process that
    ends first, or a deadline passed, fails the test."""
    import select

    assert p.stderr is not None
    end = time.monotonic() + timeout
    lines: List[str] = []
    fd = p.stderr.fileno()
    while True:
        left = end - time.monotonic()
        if left <= 0:
            p.kill()
            raise AssertionError("no event %r within %.0f s:\n%s" % (match, timeout, "".join(lines)[-3000:]))
        if not select.select([fd], [], [], left)[0]:
            continue
        raw = b""
        while not raw.endswith(b"\n"):  # byte by byte from the descriptor: nothing is left in a buffer that
            byte = os.read(fd, 1)  # select cannot see, nor taken from what a later communicate() reads
            if not byte:
                break
            raw += byte
        if not raw:
            raise AssertionError("the process ended before the event %r:\n%s" % (match, "".join(lines)[-3000:]))
        line = raw.decode("utf-8", "replace")
        lines.append(line)
        for e in events(line):
            if all(e.get(k) == v for k, v in match.items()):
                return lines


def events(text: str) -> List[dict]:
    out = []
    for line in text.splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


def podman_env() -> Dict[str, str]:
    """The environment the tests run podman with: the project's containers.conf and storage."""
    return dict(
        os.environ,
        CONTAINERS_CONF=str(REPO / "images/podman/containers.conf"),
        CONTAINERS_STORAGE_CONF=str(REPO / "images/podman/storage.conf"),
    )


def podman_unavailable() -> str:
    """'' when podman can build and run here, else why not."""
    if not shutil.which("podman"):
        return "podman is not installed (scripts/test installs it)"
    env = dict(podman_env(), PATH="/usr/sbin:/usr/bin:/sbin:/bin")
    r = subprocess.run(["podman", "info"], capture_output=True, text=True, env=env)
    return "" if r.returncode == 0 else "podman cannot run here: %s" % (r.stderr.strip().splitlines() or ["?"])[-1]


FIXTURE_SOURCES = REPO / "tests" / "fixtures" / "nvidia-src"


def installed_kernels() -> List[str]:
    """Kernels of this machine with headers (a build tree with a .config) and modules (modules.dep)."""
    base = Path("/lib/modules")
    if not base.is_dir():
        return []
    return sorted(
        k.name for k in base.iterdir() if (k / "build" / ".config").is_file() and (k / "modules.dep").is_file()
    )


def newest_installed(pattern: str) -> str:
    """The newest installed kernel whose release matches ``pattern``; '' when none."""
    import re

    ks = [k for k in installed_kernels() if re.fullmatch(pattern, k)]
    return ks[-1] if ks else ""


def installed_kernel(pattern: str) -> str:
    """:func:`newest_installed`, the test skipped with the reason when there is none."""
    import pytest

    k = newest_installed(pattern)
    if not k:
        pytest.skip("no installed kernel matching %s with headers and modules (scripts/test installs it)" % pattern)
    return k


def make_real_kernel_root(root: Path, kernel: str) -> None:
    """A DTK-like root for a kernel installed on this machine: /lib/modules/<k>
    links to the real tree (headers and the kernel's own modules), and the
    release file names that kernel."""
    mod = root / "lib/modules"
    mod.mkdir(parents=True, exist_ok=True)
    if not (mod / kernel).exists():
        (mod / kernel).symlink_to(Path("/lib/modules") / kernel)
    # build/source link to absolute paths of the image, which the DTK side
    # re-roots: make those paths lead to the real trees too.
    for link in ("build", "source"):
        target = os.readlink(str(Path("/lib/modules") / kernel / link))
        if target.startswith("/"):
            there = root / target.lstrip("/")
            there.parent.mkdir(parents=True, exist_ok=True)
            if not there.exists():
                there.symlink_to(target)
    (root / "etc").mkdir(parents=True, exist_ok=True)
    release = {"KERNEL_VERSION": kernel}
    if "-rt-" in kernel:
        release["RT_KERNEL_VERSION"] = kernel
    (root / "etc/driver-toolkit-release.json").write_text(json.dumps(release))


def make_ofa_kernel(d: Path) -> Path:
    """A stand-in for MOFED's kernel tree, as its driver container exposes it
    (``/run/mellanox/drivers/usr/src/ofa_kernel/<arch>/<kver>``): ``Module.symvers`` exporting the IB
    peer-memory API from ``ib_core``, and the ``rdma/peer_mem.h`` header."""
    (d / "include/rdma").mkdir(parents=True, exist_ok=True)
    (d / "Module.symvers").write_text(
        "0x6a2b1c01\tib_register_peer_memory_client\tdrivers/infiniband/core/ib_core\tEXPORT_SYMBOL\t\n"
        "0x6a2b1c02\tib_unregister_peer_memory_client\tdrivers/infiniband/core/ib_core\tEXPORT_SYMBOL\t\n"
    )
    (d / "include/rdma/peer_mem.h").write_text(
        "/* stand-in */\n#ifndef RDMA_PEER_MEM_H\n#define RDMA_PEER_MEM_H\n#define IB_PEER_MEMORY_NAME_MAX 64\n"
        "#define IB_PEER_MEMORY_VER_MAX 16\n#endif\n"
    )
    return d


def copy_fixture_sources(dest: Path, flavours=("kernel",)) -> Path:
    """The fixture NVIDIA source tree, as an extracted .run lays it out."""
    dest.mkdir(parents=True, exist_ok=True)
    for f in flavours:
        shutil.copytree(str(FIXTURE_SOURCES / "kernel"), str(dest / f))
    return dest


def fixture_build_env(root: Path, tmp_path: Path, kernel: str, **extra: str):
    """A DTK-like root for an installed kernel and the fixture sources; the env for both sides."""
    import pytest

    for tool in ("make", "gcc", "depmod", "modprobe"):
        if not shutil.which(tool) and not os.path.exists("/sbin/" + tool):
            pytest.skip("%s is not installed (scripts/test installs it)" % tool)
    make_real_kernel_root(root, kernel)
    src = copy_fixture_sources(tmp_path / "src", flavours=("kernel", "kernel-open"))
    env = env_for(root, kernel, DRIVER_CTR_SOURCE_DIR=str(src), TMPDIR=str(tmp_path), **extra)
    env["PATH"] = env["PATH"] + ":/sbin:/usr/sbin"
    return src, env


def run_both(root: Path, env: Dict[str, str], timeout: float = 180):
    """Both sides until the driver side exits (dry run); the DTK side is then stopped."""
    shared = make_shared_dir(root)
    drv = start_driver(env)
    dtk = start_dtk(env, shared)
    try:
        d = finish(drv, timeout)
    finally:
        if dtk.poll() is None:
            stop(dtk)
    return d, finish(dtk, 10)


def copy_kernel_trees(kernel: str, trees_root: Path, modules_dir: Path) -> None:
    """A stand-in image's view of an installed kernel: its build and source trees at their own paths under
    ``trees_root`` (links followed: Debian's trees link their scripts into /usr/lib/linux-kbuild-*), and in
    ``modules_dir`` the module indexes, the build/source links and only the kernel modules a build stages
    (what NVIDIA's modules import, the companions, and their closure): a few MB instead of 400."""
    from driver_ctr.toolkit.nvidia_modules import COMPANIONS, KERNEL_DEPENDENCIES
    from driver_ctr.toolkit.staging import KernelModules, dependency_closure

    mod = Path("/lib/modules") / kernel
    for link in ("build", "source"):
        if (mod / link).is_symlink():
            target = os.readlink(str(mod / link))
            shutil.copytree(target, str(trees_root / target.lstrip("/")), symlinks=False, dirs_exist_ok=True)
    modules_dir.mkdir(parents=True, exist_ok=True)
    for name in os.listdir(str(mod)):
        p = mod / name
        if p.is_symlink():
            os.symlink(os.readlink(str(p)), str(modules_dir / name))
        elif name.startswith("modules."):
            shutil.copy2(str(p), str(modules_dir / name))
    km = KernelModules.read(mod)
    wanted = [n for n in KERNEL_DEPENDENCIES + COMPANIONS if n in km.paths]
    for name in sorted(set(wanted) | set(dependency_closure({"nvidia": wanted}, km, kernel))):
        (modules_dir / km.paths[name]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(str(mod / km.paths[name]), str(modules_dir / km.paths[name]))


def copy_root(template: Path, root: Path) -> None:
    """A copy of a prepared temporary root (symlinks kept: they name image paths, re-rooted)."""
    shutil.copytree(str(template), str(root), symlinks=True, dirs_exist_ok=True)


def nvd(env: Dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """``nvidia-driver ARGS`` as a process, to its end."""
    return subprocess.run(
        [sys.executable, "-m", "driver_ctr", "nvidia-driver", *args],
        env=guard_node_tools(env),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_with_small_disk(mountpoint: Path, size: str, script: str, env: Dict[str, str], timeout: float = 120):
    """``script`` (sh) in a private mount namespace where ``mountpoint`` is a tmpfs of ``size``: a full disk
    for the product, while the test host's own mounts are never touched (the namespace and its tmpfs end
    with the script). ``$LEFT`` in the script lists what is in the small disk. Skips when this machine
    cannot make a mount namespace."""
    import pytest

    if not shutil.which("unshare"):
        pytest.skip("unshare is not installed (util-linux)")
    probe = subprocess.run(["unshare", "-m", "--propagation", "private", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip("no private mount namespace here for a small tmpfs: %s" % probe.stderr.strip())
    mountpoint.mkdir(parents=True, exist_ok=True)
    real_mount = shutil.which("mount", path="/usr/bin:/bin:/usr/sbin:/sbin") or "/bin/mount"
    full = '%s -t tmpfs -o size=%s driver-ctr-test %s || exit 97\nLEFT="ls -A %s"\n%s' % (
        real_mount,
        size,
        mountpoint,
        mountpoint,
        script,
    )
    return subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", full],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def make_deb(path: Path, package: str, members: List[tuple]) -> Path:
    """A .deb built by hand (ar: debian-binary, control.tar.gz, data.tar.xz), so its data may hold what
    ``dpkg-deb --build`` would not make from a directory: ``members`` are ``(TarInfo, bytes or None)``."""
    import io
    import tarfile

    def tar(entries: List[tuple], mode: str) -> bytes:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode=mode) as t:
            for info, data in entries:
                t.addfile(info, io.BytesIO(data) if data is not None else None)
        return buf.getvalue()

    control = ("Package: %s\nVersion: 1\nArchitecture: amd64\nMaintainer: t <t@t>\nDescription: t\n" % package).encode()
    cinfo = tarfile.TarInfo("./control")
    cinfo.size = len(control)
    parts = [
        ("debian-binary", b"2.0\n"),
        ("control.tar.gz", tar([(cinfo, control)], "w:gz")),
        ("data.tar.xz", tar(members, "w:xz")),
    ]
    out = io.BytesIO()
    out.write(b"!<arch>\n")
    for name, data in parts:
        out.write(("%-16s%-12d%-6d%-6d%-8s%-10d`\n" % (name, 0, 0, 0, "100644", len(data))).encode())
        out.write(data + (b"\n" if len(data) % 2 else b""))
    path.write_bytes(out.getvalue())
    return path


def tar_entry(name: str, kind: str = "file", data: bytes = b"", mode: int = 0o644, link: str = "", size: int = -1):
    """``(TarInfo, data)`` for :func:`make_deb`: kind file, dir, symlink, hardlink, chr, fifo."""
    import tarfile

    info = tarfile.TarInfo(name)
    info.mode = mode
    info.type = {
        "file": tarfile.REGTYPE,
        "dir": tarfile.DIRTYPE,
        "symlink": tarfile.SYMTYPE,
        "hardlink": tarfile.LNKTYPE,
        "chr": tarfile.CHRTYPE,
        "fifo": tarfile.FIFOTYPE,
    }[kind]
    info.linkname = link
    info.size = len(data) if kind == "file" and size < 0 else max(size, 0) if kind == "file" else 0
    return info, data if kind == "file" else None
