"""The DTK-side program the driver container puts in the shared directory.

``driver-ctr-toolkit.pyz`` is a zipapp of ``driver_ctr.toolkit`` plus the
vendored pure-Python packages it imports (structlog, pyelftools,
inotify_simple); ``ocp_dtk_entrypoint`` is a POSIX-sh launcher that finds a
Python >= 3.9 in the DTK image and runs it. No psutil, no requests, no C
extensions: tests/test_zipapp.py checks the contents and the 3.9 floor.
"""

from __future__ import annotations

import importlib
import io
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, List, Tuple

from .toolkit import protocol as proto

if TYPE_CHECKING:
    from .toolkit.protocol import SharedDir

VENDORED = ("structlog", "elftools", "inotify_simple")
ZIP_MAIN = (
    "# driver-ctr DTK side: python3 driver-ctr-toolkit.pyz dtk-build-driver\n"
    "import sys\n"
    "from driver_ctr.toolkit.dtk_main import main\n"
    "sys.exit(main())\n"
)

INTERPRETERS = ("python3", "python3.13", "python3.12", "python3.11", "python3.9", "/usr/libexec/platform-python")

LAUNCHER = r"""#!/bin/sh
# driver-ctr DTK-side launcher (written by the driver container).
# Runs the zipapp beside it on the DTK image's own Python >= 3.9, else on an
# interpreter the driver container placed in ./python/bin/. If none runs, it
# tells the driver container through driver_toolkit_broken and idles.
dir=$(CDPATH= cd -- "$(dirname -- "$0")" && pwd)
: "${DRIVER_CTR_SHARED_DIR:=$dir}"
export DRIVER_CTR_SHARED_DIR
tried=""
for py in @INTERPRETERS@ "$dir/python/bin/python3"; do
  if command -v "$py" >/dev/null 2>&1; then
    if "$py" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 9) else 1)' >/dev/null 2>&1; then
      exec "$py" "$dir/@ZIPAPP@" "$@"
    fi
    v=$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null) || v="does not run"
    tried="$tried $py($v)"
  else
    tried="$tried $py(absent)"
  fi
done
reason="no Python >= 3.9 in the Driver Toolkit image to run driver-ctr; tried:$tried"
echo "ocp_dtk_entrypoint: $reason" >&2
tmp="$dir/.@BROKEN@.$$"
printf '{"generation": null, "verdict": "broken", "reasons": ["%s"], "likely_cause": "%s"}\n' "$reason" "@CAUSE@" > "$tmp" \
  && mv -f "$tmp" "$dir/@BROKEN@"
trap 'exit 0' TERM INT HUP QUIT PIPE
while :; do sleep 1 & wait $!; done
"""


NO_PYTHON_CAUSE = (
    "a Driver Toolkit image without Python >= 3.9: the RHEL 8 based DTKs of OpenShift 4.12 and older have "
    "Python 3.6 only (driver-ctr's DTK side needs OpenShift 4.13 or later); the driver container takes the "
    "entitlement-based build"
)


def launcher_text() -> str:
    return (
        LAUNCHER.replace("@INTERPRETERS@", " ".join(INTERPRETERS))
        .replace("@CAUSE@", NO_PYTHON_CAUSE)
        .replace("@ZIPAPP@", proto.ZIPAPP)
        .replace("@BROKEN@", proto.TOOLKIT_BROKEN)
    )


def _package_files(name: str) -> Iterator[Tuple[Path, str]]:
    mod = importlib.import_module(name)
    path = Path(mod.__file__)  # type: ignore[arg-type]
    if path.name == "__init__.py":
        root = path.parent
        for f in sorted(root.rglob("*.py")):
            yield f, (Path(name) / f.relative_to(root)).as_posix()
        for f in sorted(root.rglob("py.typed")):
            yield f, (Path(name) / f.relative_to(root)).as_posix()
    else:
        yield path, path.name


def toolkit_files(toolkit: Path) -> List[Path]:
    """Every source file of the toolkit, subpackages included (sorted: the zip is deterministic)."""
    return sorted(f for f in toolkit.rglob("*.py") if "__pycache__" not in f.parts)


def zipapp_bytes() -> bytes:
    """The zipapp, deterministic (fixed timestamps) so equal code gives equal bytes."""
    here = Path(__file__).resolve().parent
    entries = [(here / "__init__.py", "driver_ctr/__init__.py")]
    for f in toolkit_files(here / "toolkit"):
        entries.append((f, "driver_ctr/toolkit/" + f.relative_to(here / "toolkit").as_posix()))
    for name in VENDORED:
        entries.extend(_package_files(name))
    buf = io.BytesIO()
    buf.write(b"#!/usr/bin/env python3\n")
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:

        def add(arcname: str, data: bytes) -> None:
            info = zipfile.ZipInfo(arcname, date_time=(2020, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, data)

        add("__main__.py", ZIP_MAIN.encode())
        for src, arc in entries:
            add(arc, src.read_bytes())
    return buf.getvalue()


def install(shared: "SharedDir") -> None:
    """Write the zipapp and its launcher into the shared directory (never through a symlink)."""
    shared.fs.write_atomic(proto.ZIPAPP, zipapp_bytes(), mode=0o644)
    shared.fs.write_atomic(proto.LAUNCHER, launcher_text().encode(), mode=0o755)
