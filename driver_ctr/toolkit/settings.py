"""Settings: the environment, validated once, as one immutable object.

Both sides use it: the driver container builds it from its environment, the
DTK side from ``settings.json`` (an allow-listed subset, :meth:`Settings.shared`)
overlaid with the few variables the operator gives the DTK container itself.
Every invalid value is collected and reported at once, by name, with the value
(redacted when the name looks secret) and what was expected.
"""

from __future__ import annotations

import os
import re
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Collection, Dict, List, Mapping, Optional, Tuple

from .errors import InvalidValue, SettingsError
from .paths import HostPaths
from .redact import is_secret_name, redact_url_credentials, redact_value
from .versions import DriverVersion, normalize_arch, parse_driver_version, parse_kernel_release

TRUE_WORDS = ("true", "1")
FALSE_WORDS = ("false", "0")

DRIVER_TYPES = ("passthrough", "vgpu")
KERNEL_MODULE_TYPES = ("auto", "open", "proprietary")
PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy")
NVFM_PREFIX = "NVFM_CONFIG_"

SIGNING_HASHES = ("sha256", "sha384", "sha512", "sha224", "sha1")
DEFAULT_CACHE_DIR = "/var/lib/driver-ctr/cache"
DEFAULT_MODULE_SIZE_LIMIT = 1 << 30  # bytes: no staged file is larger (nvidia.ko: ~80 MB)

_OPENSHIFT_VERSION = re.compile(r"^\d+\.\d+(\.\d+)?$")
_RHEL_VERSION = re.compile(r"^\d+(\.\d+)?$")
_DIGEST = re.compile(r"^[!-~]+$")  # printable, no whitespace: the state file is one line
_NVFM_FIELD = re.compile(r"^[A-Z][A-Z0-9_]*$")
# curl and dnf take a proxy without a scheme (proxy.corp:3128: http); a scheme, when given, must be one of these
_PROXY_URL = re.compile(r"^((https?|socks5h?|socks4a?)://)?(\S+@)?[^\s/:@]+(:\d+)?/?$", re.IGNORECASE)


def parse_bool(name: str, raw: str) -> bool:
    v = raw.strip().lower()
    if v in TRUE_WORDS:
        return True
    if v in FALSE_WORDS:
        return False
    raise InvalidValue(name, raw, "true or false (any case)")


def _choice(choices: Tuple[str, ...]) -> Callable[[str, str], str]:
    def parse(name: str, raw: str) -> str:
        v = raw.strip().lower()
        if v not in choices:
            raise InvalidValue(name, raw, "one of " + ", ".join(choices))
        return v

    return parse


def _driver_type(name: str, raw: str) -> str:
    """``passthrough`` or ``vgpu`` (a vGPU guest). The operator's ``vgpu-host-manager`` DaemonSets (hypervisor
    hosts) run NVIDIA's separate vGPU manager image: driver-ctr is not that image, and says so."""
    if raw.strip().lower() == "vgpu-host-manager":
        raise InvalidValue(
            name,
            raw,
            "passthrough or vgpu: vgpu-host-manager (a hypervisor host) is served by NVIDIA's vGPU manager "
            "image, not by driver-ctr; set the operator's vgpuManager image for these nodes",
        )
    return _choice(DRIVER_TYPES)(name, raw)


def _upper_choice(choices: Tuple[str, ...]) -> Callable[[str, str], str]:
    def parse(name: str, raw: str) -> str:
        return _choice(choices)(name, raw).upper()

    return parse


def _pattern(rx: "re.Pattern[str]", expected: str) -> Callable[[str, str], str]:
    def parse(name: str, raw: str) -> str:
        v = raw.strip()
        if not rx.match(v):
            raise InvalidValue(name, raw, expected)
        return v

    return parse


def _positive_seconds(name: str, raw: str) -> float:
    try:
        v = float(raw.strip())
    except ValueError:
        raise InvalidValue(name, raw, "a number of seconds greater than 0") from None
    if not v > 0 or v != v or v == float("inf"):
        raise InvalidValue(name, raw, "a number of seconds greater than 0")
    return v


def _positive_int(name: str, raw: str) -> int:
    v = raw.strip()
    if not v.isdigit() or int(v) < 1:
        raise InvalidValue(name, raw, "a whole number of at least 1")
    return int(v)


def _branch(name: str, raw: str) -> int:
    v = raw.strip()
    if not v.isdigit():
        raise InvalidValue(name, raw, "the driver branch, a whole number such as 535")
    return int(v)


def _abs_path(name: str, raw: str) -> str:
    v = raw.strip()
    if not v.startswith("/") or "\x00" in v:
        raise InvalidValue(name, raw, "an absolute path")
    return os.path.normpath(v)


def _kernel_release(name: str, raw: str) -> str:
    try:
        parse_kernel_release(raw)
    except InvalidValue as exc:
        raise InvalidValue(name, raw, exc.expected) from None
    return raw.strip()


def _driver_version(name: str, raw: str) -> DriverVersion:
    try:
        return parse_driver_version(raw)
    except InvalidValue as exc:
        raise InvalidValue(name, raw, exc.expected) from None


def _arch(name: str, raw: str) -> str:
    try:
        return normalize_arch(raw)
    except InvalidValue as exc:
        raise InvalidValue(name, raw, exc.expected) from None


def _proxy(name: str, raw: str) -> str:
    v = raw.strip()
    if name.lower() == "no_proxy":
        if any(c.isspace() for c in v.replace(" ", "")):
            raise InvalidValue(name, raw, "a comma-separated list of hosts")
        return v
    scheme_ok = "://" not in v or re.match(r"^(https?|socks5h?|socks4a?)://", v, re.IGNORECASE)
    if not scheme_ok or not _PROXY_URL.match(v):
        raise InvalidValue(
            name, redact_url_credentials(raw), "a proxy such as http://proxy.example:3128 or proxy.example:3128"
        )
    return v


def _one_line(name: str, raw: str) -> str:
    if "\n" in raw or "\r" in raw or "\x00" in raw:
        raise InvalidValue(name, raw, "a single line of text")
    return raw


@dataclass(frozen=True)
class Var:
    """One environment variable: how it is read and who reads it.

    ``shared``: carried to the DTK side in ``settings.json`` (nothing else
    crosses: no PATH/HOME, no service-account or KUBERNETES_* variables, no
    proxies, nothing secret). ``dtk_own``: the operator also sets it on the DTK
    container itself, and that value wins over ``settings.json``.
    ``build_only``: only a build, a download or a package manager reads it; a
    command that never builds ignores a bad value. ``host_path``: an absolute
    node path, re-rooted under ``DRIVER_CTR_ROOT``. ``secret``: never shown in
    clear in an error, a log or ``status``. ``into``: several variables
    collected as ``(name, value)`` pairs into one tuple field. ``prefix``: every
    variable whose name starts with ``name``. ``attr`` is the field it fills.
    """

    name: str
    parse: Callable[[str, str], Any]
    attr: str = ""
    required: bool = False
    shared: bool = False
    dtk_own: bool = False
    build_only: bool = False
    host_path: bool = False
    secret: bool = False
    into: bool = False
    prefix: bool = False


def setting(*names: str, parse: Callable[[str, str], Any], default: Any = MISSING, **flags: bool) -> Any:
    """A :class:`Settings` field and its row: the variable(s) that fill it, the parser, the default, the
    flags of :class:`Var`."""
    rows = tuple(Var(name, parse, "", **flags) for name in names)
    if default is MISSING:
        return field(metadata={"vars": rows})
    if isinstance(default, (list, dict, set)):
        raise TypeError("a setting's default is immutable")
    return field(default=default, metadata={"vars": rows})


def _nvfm_field(name: str, raw: str) -> Tuple[str, str]:
    fld = name[len(NVFM_PREFIX) :]
    if not _NVFM_FIELD.match(fld):
        raise InvalidValue(name, raw, "NVFM_CONFIG_<FIELD> with FIELD in upper case letters, digits and _")
    return fld, _one_line(name, raw).strip()


def _rhcos(name: str, raw: str) -> str:
    """The node's OS version as NFD reports it (``OSTREE_VERSION``): RHCOS ``416.94.202407030122-0`` or
    ``9.6.20250523-0``, FCOS/OKD ``39.20240210.3.0``, SCOS ``9.0.20250510-0``. Only messages and the
    DTK decision's notes show it: any one word."""
    return _pattern(_DIGEST, "the node's OS version as one word, such as 416.94.202407030122-0")(name, raw)


@dataclass(frozen=True)
class Settings:
    """Every setting of the reference table plus driver-ctr's own (``DRIVER_CTR_*``), one field a row:
    the variable(s) that fill it, their parser, the default and who reads them (:func:`setting`)."""

    driver_version: DriverVersion = setting("DRIVER_VERSION", parse=_driver_version, required=True, shared=True)
    target_arch: str = setting("TARGETARCH", parse=_arch, required=True, shared=True)  # x86_64 / aarch64
    driver_branch: int = setting("DRIVER_BRANCH", parse=_branch, shared=True)  # default: the version's
    targetarch_raw: str = ""  # as the image says it: amd64 / arm64
    driver_type: str = setting("DRIVER_TYPE", parse=_driver_type, default="passthrough", shared=True)
    kernel_module_type: str = setting(
        "KERNEL_MODULE_TYPE", parse=_choice(KERNEL_MODULE_TYPES), default="auto", shared=True
    )
    gpu_direct_rdma_enabled: bool = setting("GPU_DIRECT_RDMA_ENABLED", parse=parse_bool, default=False, shared=True)
    use_host_mofed: bool = setting("USE_HOST_MOFED", parse=parse_bool, default=False, shared=True)
    gds_enabled: bool = setting("GDS_ENABLED", parse=parse_bool, default=False, shared=True, dtk_own=True)
    gdrcopy_enabled: bool = setting("GDRCOPY_ENABLED", parse=parse_bool, default=False, shared=True, dtk_own=True)
    # legacy, read for validation only
    open_kernel_modules_enabled: Optional[bool] = setting("OPEN_KERNEL_MODULES_ENABLED", parse=parse_bool, default=None)
    driver_config_digest: str = setting(
        "DRIVER_CONFIG_DIGEST",
        parse=_pattern(_DIGEST, "one word without spaces"),
        default="",
        shared=True,
        dtk_own=True,
    )
    rhcos_image_missing: bool = setting("RHCOS_IMAGE_MISSING", parse=parse_bool, default=False, dtk_own=True)
    rhcos_version: str = setting("RHCOS_VERSION", parse=_rhcos, default="", shared=True, dtk_own=True)
    openshift_version: str = setting(
        "OPENSHIFT_VERSION",
        parse=_pattern(_OPENSHIFT_VERSION, "an OpenShift version like 4.16"),
        default="",
        shared=True,
    )
    rhel_version: str = setting(
        "RHEL_VERSION", parse=_pattern(_RHEL_VERSION, "a RHEL version like 9 or 9.4"), default="", shared=True
    )
    dnf_releasever: str = setting(
        "DNF_RELEASEVER", parse=_pattern(_RHEL_VERSION, "a dnf releasever like 9 or 9.4"), default="", build_only=True
    )
    vgpu_license_server_type: str = setting(
        "VGPU_LICENSE_SERVER_TYPE", parse=_upper_choice(("nls", "fne")), default="NLS"
    )
    disable_vgpu_version_check: bool = setting("DISABLE_VGPU_VERSION_CHECK", parse=parse_bool, default=True)
    ignore_preempt_rt_presence: bool = setting(
        "IGNORE_PREEMPT_RT_PRESENCE", parse=parse_bool, default=False, shared=True, build_only=True
    )
    nvfm_config: Tuple[Tuple[str, str], ...] = setting(
        NVFM_PREFIX, parse=_nvfm_field, default=(), prefix=True, into=True
    )
    proxies: Tuple[Tuple[str, str], ...] = setting(
        *PROXY_VARIABLES, parse=_proxy, default=(), secret=True, into=True, build_only=True
    )
    # driver-ctr's own
    root: Optional[str] = setting("DRIVER_CTR_ROOT", parse=_abs_path, default=None)
    running_kernel_override: str = setting("DRIVER_CTR_KERNEL_RELEASE", parse=_kernel_release, default="")
    log_format: str = setting("DRIVER_CTR_LOG_FORMAT", parse=_choice(("json", "console")), default="")
    log_level: str = setting(
        "DRIVER_CTR_LOG_LEVEL", parse=_choice(("debug", "info", "warning", "error")), default="info"
    )
    shared_dir: str = setting("DRIVER_CTR_SHARED_DIR", parse=_abs_path, default="")
    build_timeout_s: float = setting(
        "DRIVER_CTR_BUILD_TIMEOUT", parse=_positive_seconds, default=40 * 60.0, shared=True, build_only=True
    )
    start_timeout_s: float = setting("DRIVER_CTR_START_TIMEOUT", parse=_positive_seconds, default=20 * 60.0)
    max_threads: Optional[int] = setting(
        "DRIVER_CTR_MAX_THREADS", parse=_positive_int, default=None, shared=True, build_only=True
    )
    source_dir: str = setting("DRIVER_CTR_SOURCE_DIR", parse=_abs_path, default="", build_only=True)
    module_size_limit: int = setting(
        "DRIVER_CTR_MODULE_SIZE_LIMIT", parse=_positive_int, default=DEFAULT_MODULE_SIZE_LIMIT, shared=True
    )
    cache_dir: str = setting("DRIVER_CTR_CACHE_DIR", parse=_abs_path, default=DEFAULT_CACHE_DIR, host_path=True)
    local_repo: str = setting("DRIVER_CTR_LOCAL_REPO", parse=_abs_path, default="", host_path=True, build_only=True)
    # "none": modules only (the test suite; userspace from elsewhere)
    userspace: str = setting("DRIVER_CTR_USERSPACE", parse=_choice(("auto", "none")), default="auto")
    # default: /usr/src/nvidia-<version>/kernel/precompiled
    precompiled_dir: str = setting("DRIVER_CTR_PRECOMPILED_DIR", parse=_abs_path, default="", host_path=True)
    cache_keep: int = setting("DRIVER_CTR_CACHE_KEEP", parse=_positive_int, default=3)
    signing_key: str = setting("DRIVER_CTR_SIGNING_KEY", parse=_abs_path, default="", secret=True, build_only=True)
    signing_cert: str = setting("DRIVER_CTR_SIGNING_CERT", parse=_abs_path, default="", build_only=True)
    signing_hash: str = setting(
        "DRIVER_CTR_SIGNING_HASH", parse=_choice(SIGNING_HASHES), default="sha256", build_only=True
    )
    raw: Tuple[Tuple[str, str], ...] = field(default=(), repr=False, compare=False)

    # ------------------------------------------------------------------

    @property
    def paths(self) -> HostPaths:
        return HostPaths(root=self.root, shared_dir_override=self.shared_dir or None)

    def running_kernel(self) -> str:
        """The kernel the node runs: ``DRIVER_CTR_KERNEL_RELEASE``, else ``uname -r``.
        A build may target another kernel (``update -k``); the loader compares
        a tree with this one only."""
        return self.running_kernel_override or os.uname().release

    def host_path(self, attr: str) -> Optional[Path]:
        """A ``host_path`` setting re-rooted under ``DRIVER_CTR_ROOT`` (None when empty)."""
        assert any(v.attr == attr and v.host_path for v in VARIABLES), attr
        value = getattr(self, attr)
        return self.paths.host(value) if value else None

    def shared(self) -> Dict[str, str]:
        """The allow-listed variables written to ``settings.json`` (strings, as in env)."""
        src = dict(self.raw)
        return {k: src[k] for k in SHARED_VARIABLES if k in src}

    def describe(self) -> Dict[str, Any]:
        """A redacted view for logs and ``status``."""
        secret = {v.name for v in VARIABLES if v.secret}
        return {
            k: (redact_url_credentials(redact_value(k, v)) if k in secret else redact_value(k, v)) for k, v in self.raw
        }

    # ------------------------------------------------------------------

    @classmethod
    def from_env(cls, env: Optional[Mapping[str, str]] = None, unused: Collection[str] = ()) -> "Settings":
        """Build and validate; raises :class:`SettingsError` with every problem. A bad value of a
        variable in ``unused`` (what the command never reads) is left at its default instead."""
        env = dict(os.environ if env is None else env)
        env = {k: v for k, v in env.items() if k not in unused or _valid(k, v)}
        problems: List[InvalidValue] = []
        values: Dict[str, Any] = {}
        used: Dict[str, str] = {}
        for var in VARIABLES:
            for name in sorted(n for n in env if n.startswith(var.name)) if var.prefix else [var.name]:
                raw = env.get(name)
                if raw is None or raw.strip() == "":
                    if var.required:
                        problems.append(InvalidValue(name, raw or "", "to be set (it is required)"))
                    continue
                try:
                    value = _read(var, name, raw)
                except InvalidValue as exc:
                    problems.append(exc)
                    continue
                used[name] = raw
                if var.into:
                    values[var.attr] = values.get(var.attr, ()) + ((value if var.prefix else (name, value)),)
                else:
                    values[var.attr] = value
        for names, check in CROSS_CHECKS:
            if not all(n in unused for n in names):
                problems += check(env)
        if problems:
            raise SettingsError(problems)
        dv: DriverVersion = values["driver_version"]
        values.setdefault("driver_branch", dv.branch)
        values["targetarch_raw"] = env["TARGETARCH"].strip()
        return cls(raw=tuple(sorted(used.items())), **values)


def _signing_pair(env: Mapping[str, str]) -> List[InvalidValue]:
    key_set, cert_set = (bool(env.get(n, "").strip()) for n in ("DRIVER_CTR_SIGNING_KEY", "DRIVER_CTR_SIGNING_CERT"))
    if key_set == cert_set:
        return []
    missing = "DRIVER_CTR_SIGNING_CERT" if key_set else "DRIVER_CTR_SIGNING_KEY"
    return [InvalidValue(missing, "", "to be set too: signing needs both a key and a certificate")]


# Checks across variables: the variables and the check. Like a single bad value, skipped when the command
# reads none of them (a signing key without its certificate concerns only a build).
CROSS_CHECKS: Tuple[Tuple[Tuple[str, ...], Callable[[Mapping[str, str]], List[InvalidValue]]], ...] = (
    (("DRIVER_CTR_SIGNING_KEY", "DRIVER_CTR_SIGNING_CERT"), _signing_pair),
)

# The rows, in field order, each with the field it fills; every list of names below is derived from them.
VARIABLES: Tuple[Var, ...] = tuple(
    replace(v, attr=f.name) for f in fields(Settings) for v in f.metadata.get("vars", ())
)
SHARED_VARIABLES = tuple(v.name for v in VARIABLES if v.shared)
DTK_OWN_VARIABLES = tuple(v.name for v in VARIABLES if v.dtk_own)
BUILD_ONLY_VARIABLES = tuple(v.name for v in VARIABLES if v.build_only)


def _valid(name: str, raw: str) -> bool:
    var = next((v for v in VARIABLES if v.name == name), None)
    if var is None or not raw.strip():
        return True
    try:
        _read(var, name, raw)
        return True
    except InvalidValue:
        return False


def _read(var: Var, name: str, raw: str) -> Any:
    """Parse one variable; the error names it and never shows a secret value."""
    try:
        return var.parse(name, raw)
    except InvalidValue as exc:
        value = exc.value if exc.name == name else raw
        if var.secret or is_secret_name(name):
            value = redact_url_credentials(redact_value(name, raw))
        raise InvalidValue(name, value, exc.expected) from None
