"""Module parameters: ``/drivers/<module>.conf`` -> ``options <module> ...`` drop-ins.

Each ``.conf`` line holds one or more words as modprobe and the kernel take them (the reference takes
lines verbatim): ``name=value``, a value in double quotes (``NVreg_RegistryDwords="RMA=1;RMB=2"``, kept
as written: the kernel removes the quotes), or a bare ``name`` (the kernel sets a bool to true and
rejects it for any other declared type). Every parameter is checked against what the built
module declares (``parm``/``parmtype`` of its ``.modinfo``), as the kernel
treats them (:func:`usable`): an unknown one is dropped with a warning naming
the file, the line and the module's parameters; a file for a module not being
loaded is ignored; a malformed line or a bad value of a declared parameter is
an error before any insmod. ``NVreg_CoherentGPUMemoryMode=driver`` is added to
nvidia only when the module declares it (the reference adds it always).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Tuple

from ..toolkit.errors import DriverCtrError, ProtocolError
from ..toolkit.fsio import atomic_write_text
from ..toolkit.inputs import read_input_text
from ..toolkit.log import Logger
from ..toolkit.modinfo import ModInfo
from ..toolkit.nvidia_modules import PARAMETER_MODULES, normalize, parameter_file

CDMM = ("NVreg_CoherentGPUMemoryMode", "driver")

_INT = re.compile(r"^[+-]?(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)$")
_UINT = re.compile(r"^\+?(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)$")
_BOUNDS = {
    "byte": (0, 255),
    "short": (-(1 << 15), (1 << 15) - 1),
    "ushort": (0, (1 << 16) - 1),
    "int": (-(1 << 31), (1 << 31) - 1),
    "uint": (0, (1 << 32) - 1),
    "long": (-(1 << 63), (1 << 63) - 1),
    "ulong": (0, (1 << 64) - 1),
    "ullong": (0, (1 << 64) - 1),
    "hexint": (0, (1 << 32) - 1),
}
_BOOL = {"y", "Y", "n", "N", "1", "0", "true", "false", "on", "off"}


class ParameterError(DriverCtrError):
    """A parameter file names a parameter the module does not declare, or a bad value."""


@dataclass(frozen=True)
class Param:
    module: str
    name: str
    value: Optional[str]  # as written, double quotes kept; None: a bare word
    source: str  # "file:line"

    @property
    def word(self) -> str:
        """The parameter as modprobe is given it."""
        return self.name if self.value is None else "%s=%s" % (self.name, self.value)

    @property
    def kernel_value(self) -> Optional[str]:
        """The value the kernel reads: enclosing double quotes removed, as its ``parse_args`` does."""
        v = self.value
        return v[1:-1] if v is not None and len(v) >= 2 and v[0] == v[-1] == '"' else v


def split_words(text: str) -> List[str]:
    """The words of an ``options`` line as the kernel's ``next_arg`` splits them: at spaces outside double
    quotes (the quotes stay in the word). ValueError for an unterminated quote."""
    words, word, quoted = [], "", False
    for ch in text:
        if ch == '"':
            quoted = not quoted
        elif ch.isspace() and not quoted:
            if word:
                words.append(word)
            word = ""
            continue
        word += ch
    if quoted:
        raise ValueError("a double quote is not closed")
    return words + ([word] if word else [])


def check_param(typ: str, p: Param) -> Optional[str]:
    """Why the kernel would refuse ``p`` for a parameter of type ``typ`` (None when it takes it)."""
    if p.kernel_value is None:
        if typ in ("bool", "invbool"):
            return None
        return "a bare word gives no value: the kernel refuses it for a %s parameter" % (typ or "declared")
    return check_value(typ, p.kernel_value)


def check_value(typ: str, value: str) -> Optional[str]:
    """Why ``value`` is not a valid ``typ`` (None when it is)."""
    if typ.startswith("array of "):
        elem = typ[len("array of ") :]
        for v in value.split(","):
            why = check_value(elem, v)
            if why:
                return why
        return None
    if typ in ("charp", "string", ""):
        return None
    if typ in ("bool", "invbool"):
        return None if value in _BOOL else "expected a boolean (Y/N/1/0/true/false/on/off)"
    if typ in _BOUNDS:
        pattern = _INT if typ in ("int", "long", "short") else _UINT
        if typ == "hexint":
            pattern = _UINT
        if not pattern.match(value):
            return "expected an integer (%s)" % typ
        n = int(value, 0)
        lo, hi = _BOUNDS[typ]
        if not lo <= n <= hi:
            return "out of range for %s (%d..%d)" % (typ, lo, hi)
        return None
    return None  # a type this code does not know: the kernel decides


def read_param_files(drivers_dir: Path, modules: Tuple[str, ...] = PARAMETER_MODULES) -> Dict[str, List[Param]]:
    out: Dict[str, List[Param]] = {}
    for mod in modules:
        f = drivers_dir / parameter_file(mod)
        if not (f.exists() or f.is_symlink()):
            continue
        try:  # a ConfigMap file is a symlink to a regular file; a FIFO or directory is named, never read
            content = read_input_text(f, "parameter file")
        except ProtocolError as exc:
            raise ParameterError("%s: %s" % (f, exc.message)) from None
        params: List[Param] = []
        for n, line in enumerate(content.splitlines(), 1):
            text = line.split("#", 1)[0].strip()
            if not text:
                continue
            # a line that does not parse is named by file and line, never printed: the file is a node's or a
            # ConfigMap's, and a link may have put another file's secrets there
            try:
                words = split_words(text)
            except ValueError as exc:
                raise ParameterError("%s:%d: the line does not parse (%s)" % (f, n, exc)) from None
            for i, w in enumerate(words, 1):
                name, eq, value = w.partition("=")
                if not name or not re.match(r"^\w+$", name):
                    raise ParameterError("%s:%d: word %d of the line is not name=value or a parameter name" % (f, n, i))
                params.append(Param(mod, name, value if eq else None, "%s:%d" % (f, n)))
        out[mod] = params
    return out


def usable(params: Mapping[str, List[Param]], infos: Mapping[str, ModInfo], log: Logger) -> Dict[str, List[Param]]:
    """The parameters to apply, as the kernel treats them: a ``.conf`` for a module not being loaded is
    ignored (info), an unknown parameter is dropped (a warning naming the file, the line and what the
    module declares); a bad value of a declared parameter is an error before any insmod (the kernel
    would refuse the module)."""
    kept: Dict[str, List[Param]] = {}
    problems = []
    for mod, ps in params.items():
        info = infos.get(mod)
        if info is None:
            if ps:
                log.info(
                    "parameter file ignored: its module is not being loaded",
                    file=ps[0].source.split(":")[0],
                    module=mod,
                )
            continue
        known = info.parameters
        kept[mod] = []
        for p in ps:
            if p.name not in known:
                log.warning(
                    "unknown module parameter dropped",
                    at=p.source,
                    module=mod,
                    parameter=p.name,
                    declared=sorted(known),
                )
                continue
            why = check_param(known[p.name], p)
            if why:
                problems.append("%s: %s=%r: %s" % (p.source, p.name, p.kernel_value, why))
            kept[mod].append(p)
    if problems:
        raise ParameterError("invalid module parameters:\n" + "\n".join("  - " + x for x in problems))
    return kept


def with_defaults(params: Mapping[str, List[Param]], infos: Mapping[str, ModInfo]) -> Dict[str, List[Param]]:
    out = {m: list(ps) for m, ps in params.items()}
    nvidia = infos.get("nvidia")
    if nvidia is not None and CDMM[0] in nvidia.parameters:
        ps = out.setdefault("nvidia", [])
        if not any(p.name == CDMM[0] for p in ps):
            ps.insert(0, Param("nvidia", CDMM[0], CDMM[1], "driver-ctr default"))
    return out


def option_lines(params: Mapping[str, List[Param]]) -> Dict[str, str]:
    """Module -> the text of its drop-in."""
    out = {}
    for mod, ps in params.items():
        if ps:
            words = " ".join(p.word for p in ps)
            out[mod] = "# written by driver-ctr from %s\noptions %s %s\n" % (
                ", ".join(sorted({p.source.rsplit(":", 1)[0] for p in ps})),
                normalize(mod),
                words,
            )
    return out


def write_dropins(modprobe_d: Path, params: Mapping[str, List[Param]]) -> List[Path]:
    """``<modprobe.d>/<module>.conf`` for each module with parameters; stale ones removed."""
    modprobe_d.mkdir(parents=True, exist_ok=True)
    texts = option_lines(params)
    written = []
    for mod in PARAMETER_MODULES:
        f = modprobe_d / parameter_file(mod)
        if mod in texts:
            atomic_write_text(f, texts[mod])
            written.append(f)
        elif f.is_file() and f.read_text(errors="replace").startswith("# written by driver-ctr"):
            f.unlink()
    return written
