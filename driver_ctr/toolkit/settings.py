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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Collection, Dict, List, Mapping, Optional, Tuple

from .errors import InvalidValue, SettingsError
from .paths import HostPaths
from .redact import is_secret_name, redact_url_credentials, redact_value
from .versions import DriverVersion, normalize_arch, parse_driver_version, parse_kernel_release

TRUE_WORDS = ("true", "1")
FALSE_WORDS = ("false", "0")

DRIVER_TYPES = ("passthrough", "vgpu", "vgpu-host-manager")
KERNEL_MODULE_TYPES = ("auto", "open", "proprietary")
PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy")
NVFM_PREFIX = "NVFM_CONFIG_"

DEFAULT_BUILD_TIMEOUT_S = 40 * 60.0
DEFAULT_START_TIMEOUT_S = 20 * 60.0
DEFAULT_CACHE_DIR = "/var/lib/driver-ctr/cache"
DEFAULT_MODULE_SIZE_LIMIT = 1 << 30  # bytes: no staged file is larger (nvidia.ko: ~80 MB)

_RHCOS_VERSION = re.compile(r"^\d+\.\d+\.\d+-\d+$")
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
    """One environment variable: where it goes and how it is read.

    ``shared``: carried to the DTK side in ``settings.json`` (nothing else
    crosses: no PATH/HOME, no service-account or KUBERNETES_* variables, no
    proxies, nothing secret). ``host_path``: an absolute node path, re-rooted
    under ``DRIVER_CTR_ROOT``. ``secret``: never shown in clear in an error,
    a log or ``status``. ``into``: several variables collected as
    ``(name, value)`` pairs into one tuple field. ``prefix``: every variable
    whose name starts with ``name``.
    """

    name: str
    attr: str
    parse: Callable[[str, str], Any]
    required: bool = False
    shared: bool = False
    host_path: bool = False
    secret: bool = False
    into: bool = False
    prefix: bool = False


def _nvfm_field(name: str, raw: str) -> Tuple[str, str]:
    fld = name[len(NVFM_PREFIX) :]
    if not _NVFM_FIELD.match(fld):
        raise InvalidValue(name, raw, "NVFM_CONFIG_<FIELD> with FIELD in upper case letters, digits and _")
    return fld, _one_line(name, raw).strip()


VARIABLES: Tuple[Var, ...] = (
    (
        Var("DRIVER_VERSION", "driver_version", _driver_version, required=True, shared=True),
        Var("TARGETARCH", "target_arch", _arch, required=True, shared=True),
        Var("DRIVER_BRANCH", "driver_branch", _branch, shared=True),
        Var("DRIVER_TYPE", "driver_type", _choice(DRIVER_TYPES), shared=True),
        Var("KERNEL_MODULE_TYPE", "kernel_module_type", _choice(KERNEL_MODULE_TYPES), shared=True),
        Var("GPU_DIRECT_RDMA_ENABLED", "gpu_direct_rdma_enabled", parse_bool, shared=True),
        Var("USE_HOST_MOFED", "use_host_mofed", parse_bool, shared=True),
        Var("GDS_ENABLED", "gds_enabled", parse_bool, shared=True),
        Var("GDRCOPY_ENABLED", "gdrcopy_enabled", parse_bool, shared=True),
        Var("OPEN_KERNEL_MODULES_ENABLED", "open_kernel_modules_enabled", parse_bool),
        Var("DRIVER_CONFIG_DIGEST", "driver_config_digest", _pattern(_DIGEST, "one word without spaces"), shared=True),
        Var("RHCOS_IMAGE_MISSING", "rhcos_image_missing", parse_bool),
        Var(
            "RHCOS_VERSION",
            "rhcos_version",
            _pattern(_RHCOS_VERSION, "an RHCOS version like 416.94.202407030122-0 or 9.6.20250523-0"),
            shared=True,
        ),
        Var(
            "OPENSHIFT_VERSION",
            "openshift_version",
            _pattern(_OPENSHIFT_VERSION, "an OpenShift version like 4.16"),
            shared=True,
        ),
        Var("RHEL_VERSION", "rhel_version", _pattern(_RHEL_VERSION, "a RHEL version like 9 or 9.4"), shared=True),
        Var("DNF_RELEASEVER", "dnf_releasever", _pattern(_RHEL_VERSION, "a dnf releasever like 9 or 9.4")),
        Var("VGPU_LICENSE_SERVER_TYPE", "vgpu_license_server_type", _upper_choice(("nls", "fne"))),
        Var("DISABLE_VGPU_VERSION_CHECK", "disable_vgpu_version_check", parse_bool),
        Var("IGNORE_PREEMPT_RT_PRESENCE", "ignore_preempt_rt_presence", parse_bool, shared=True),
        Var(NVFM_PREFIX, "nvfm_config", _nvfm_field, prefix=True, into=True),
    )
    + tuple(Var(v, "proxies", _proxy, secret=True, into=True) for v in PROXY_VARIABLES)
    + (
        # driver-ctr's own
        Var("DRIVER_CTR_ROOT", "root", _abs_path),
        Var("DRIVER_CTR_KERNEL_RELEASE", "running_kernel_override", _kernel_release),
        Var("DRIVER_CTR_LOG_FORMAT", "log_format", _choice(("json", "console"))),
        Var("DRIVER_CTR_LOG_LEVEL", "log_level", _choice(("debug", "info", "warning", "error"))),
        Var("DRIVER_CTR_SHARED_DIR", "shared_dir", _abs_path),
        Var("DRIVER_CTR_BUILD_TIMEOUT", "build_timeout_s", _positive_seconds, shared=True),
        Var("DRIVER_CTR_START_TIMEOUT", "start_timeout_s", _positive_seconds),
        Var("DRIVER_CTR_MAX_THREADS", "max_threads", _positive_int, shared=True),
        Var("DRIVER_CTR_SOURCE_DIR", "source_dir", _abs_path),
        Var("DRIVER_CTR_MODULE_SIZE_LIMIT", "module_size_limit", _positive_int, shared=True),
        Var("DRIVER_CTR_CACHE_DIR", "cache_dir", _abs_path, host_path=True),
        Var("DRIVER_CTR_LOCAL_REPO", "local_repo", _abs_path, host_path=True),
        Var("DRIVER_CTR_USERSPACE", "userspace", _choice(("auto", "none"))),
        Var("DRIVER_CTR_PRECOMPILED_DIR", "precompiled_dir", _abs_path, host_path=True),
        Var("DRIVER_CTR_CACHE_KEEP", "cache_keep", _positive_int),
        Var("DRIVER_CTR_SIGNING_KEY", "signing_key", _abs_path, secret=True),
        Var("DRIVER_CTR_SIGNING_CERT", "signing_cert", _abs_path),
        Var("DRIVER_CTR_SIGNING_HASH", "signing_hash", _choice(("sha256", "sha384", "sha512", "sha224", "sha1"))),
    )
)

SHARED_VARIABLES = tuple(v.name for v in VARIABLES if v.shared)
# What only a build, a download or a package manager reads: the commands that never build (load, unload,
# status, the peermem pair, the probes) ignore a bad value here (a liveness probe must not restart a
# healthy pod because of a proxy it never uses); the commands that use them still name every bad value.
BUILD_ONLY_VARIABLES = PROXY_VARIABLES + (
    "DRIVER_CTR_BUILD_TIMEOUT",
    "DRIVER_CTR_MAX_THREADS",
    "DRIVER_CTR_SOURCE_DIR",
    "DRIVER_CTR_LOCAL_REPO",
    "DRIVER_CTR_SIGNING_KEY",
    "DRIVER_CTR_SIGNING_CERT",
    "DRIVER_CTR_SIGNING_HASH",
    "DNF_RELEASEVER",
    "IGNORE_PREEMPT_RT_PRESENCE",
)


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


@dataclass(frozen=True)
class Settings:
    """Every setting of the reference table plus driver-ctr's own (``DRIVER_CTR_*``);
    :data:`VARIABLES` says which variable fills which field."""

    driver_version: DriverVersion
    target_arch: str  # normalized: x86_64 / aarch64
    targetarch_raw: str  # as the image says it: amd64 / arm64
    driver_branch: int
    driver_type: str = "passthrough"
    kernel_module_type: str = "auto"
    gpu_direct_rdma_enabled: bool = False
    use_host_mofed: bool = False
    gds_enabled: bool = False
    gdrcopy_enabled: bool = False
    open_kernel_modules_enabled: Optional[bool] = None  # legacy, read for validation only
    driver_config_digest: str = ""
    rhcos_image_missing: bool = False
    rhcos_version: str = ""
    openshift_version: str = ""
    rhel_version: str = ""
    dnf_releasever: str = ""
    vgpu_license_server_type: str = "NLS"
    disable_vgpu_version_check: bool = True
    ignore_preempt_rt_presence: bool = False
    nvfm_config: Tuple[Tuple[str, str], ...] = ()
    proxies: Tuple[Tuple[str, str], ...] = ()
    # driver-ctr's own
    root: Optional[str] = None
    running_kernel_override: str = ""
    log_format: str = ""
    log_level: str = "info"
    shared_dir: str = ""
    build_timeout_s: float = DEFAULT_BUILD_TIMEOUT_S
    start_timeout_s: float = DEFAULT_START_TIMEOUT_S
    max_threads: Optional[int] = None
    source_dir: str = ""
    module_size_limit: int = DEFAULT_MODULE_SIZE_LIMIT
    cache_dir: str = DEFAULT_CACHE_DIR
    local_repo: str = ""
    cache_keep: int = 3
    userspace: str = "auto"  # "none": modules only (the test suite; userspace from elsewhere)
    precompiled_dir: str = ""  # default: /usr/src/nvidia-<version>/kernel/precompiled
    signing_key: str = ""
    signing_cert: str = ""
    signing_hash: str = "sha256"
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
            names = sorted(n for n in env if n.startswith(var.name)) if var.prefix else [var.name]
            for name in names:
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
        key_set, cert_set = (
            bool(env.get(n, "").strip()) for n in ("DRIVER_CTR_SIGNING_KEY", "DRIVER_CTR_SIGNING_CERT")
        )
        if key_set != cert_set:
            missing = "DRIVER_CTR_SIGNING_CERT" if key_set else "DRIVER_CTR_SIGNING_KEY"
            problems.append(InvalidValue(missing, "", "to be set too: signing needs both a key and a certificate"))
        if problems:
            raise SettingsError(problems)
        dv: DriverVersion = values["driver_version"]
        values.setdefault("driver_branch", dv.branch)
        values["targetarch_raw"] = env["TARGETARCH"].strip()
        return cls(raw=tuple(sorted(used.items())), **values)
