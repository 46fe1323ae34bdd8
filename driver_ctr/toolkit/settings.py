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
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

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

# The variables settings.json carries to the DTK side. Nothing else crosses:
# no PATH/HOME, no service-account or KUBERNETES_* variables, no proxies (the
# DTK build needs no network), nothing whose name looks secret.
SHARED_VARIABLES = (
    "DRIVER_VERSION",
    "DRIVER_BRANCH",
    "TARGETARCH",
    "DRIVER_TYPE",
    "KERNEL_MODULE_TYPE",
    "GPU_DIRECT_RDMA_ENABLED",
    "USE_HOST_MOFED",
    "GDS_ENABLED",
    "GDRCOPY_ENABLED",
    "DRIVER_CONFIG_DIGEST",
    "RHCOS_VERSION",
    "OPENSHIFT_VERSION",
    "RHEL_VERSION",
    "IGNORE_PREEMPT_RT_PRESENCE",
    "DRIVER_CTR_BUILD_TIMEOUT",
    "DRIVER_CTR_MAX_THREADS",
)

_RHCOS_VERSION = re.compile(r"^\d+\.\d+\.\d+-\d+$")
_OPENSHIFT_VERSION = re.compile(r"^\d+\.\d+(\.\d+)?$")
_RHEL_VERSION = re.compile(r"^\d+(\.\d+)?$")
_DIGEST = re.compile(r"^[!-~]+$")  # printable, no whitespace: the state file is one line
_NVFM_FIELD = re.compile(r"^[A-Z][A-Z0-9_]*$")
_PROXY_URL = re.compile(r"^(https?|socks5h?|socks4a?)://[^\s/]+(:\d+)?/?\S*$", re.IGNORECASE)


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
    if not _PROXY_URL.match(v):
        raise InvalidValue(name, redact_url_credentials(raw), "a proxy URL such as http://proxy.example:3128")
    return v


def _log_format(name: str, raw: str) -> str:
    return _choice(("json", "console"))(name, raw)


def _one_line(name: str, raw: str) -> str:
    if "\n" in raw or "\r" in raw or "\x00" in raw:
        raise InvalidValue(name, raw, "a single line of text")
    return raw


@dataclass(frozen=True)
class Settings:
    """Every setting of the reference table plus driver-ctr's own (``DRIVER_CTR_*``)."""

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
    kernel_release_override: str = ""
    log_format: str = ""
    shared_dir: str = ""
    build_timeout_s: float = DEFAULT_BUILD_TIMEOUT_S
    start_timeout_s: float = DEFAULT_START_TIMEOUT_S
    max_threads: Optional[int] = None
    source_dir: str = ""
    cache_dir: str = DEFAULT_CACHE_DIR
    cache_keep: int = 3
    signing_key: str = ""
    signing_cert: str = ""
    signing_hash: str = "sha256"
    raw: Tuple[Tuple[str, str], ...] = field(default=(), repr=False, compare=False)

    # ------------------------------------------------------------------

    @property
    def paths(self) -> HostPaths:
        return HostPaths(root=self.root, shared_dir_override=self.shared_dir or None)

    def kernel_release(self) -> str:
        """The node kernel: ``DRIVER_CTR_KERNEL_RELEASE``, else ``uname -r``."""
        return self.kernel_release_override or os.uname().release

    @property
    def proxy_env(self) -> Dict[str, str]:
        return dict(self.proxies)

    def shared(self) -> Dict[str, str]:
        """The allow-listed variables written to ``settings.json`` (strings, as in env)."""
        src = dict(self.raw)
        return {k: src[k] for k in SHARED_VARIABLES if k in src}

    def describe(self) -> Dict[str, Any]:
        """A redacted view for logs and ``status``."""
        out: Dict[str, Any] = {}
        for k, v in self.raw:
            out[k] = redact_value(k, v)
        return out

    # ------------------------------------------------------------------

    @classmethod
    def from_env(cls, env: Optional[Mapping[str, str]] = None) -> "Settings":
        """Build and validate; raises :class:`SettingsError` with every problem."""
        env = dict(os.environ if env is None else env)
        problems: List[InvalidValue] = []
        values: Dict[str, Any] = {}
        used: Dict[str, str] = {}

        def take(var: str, attr: str, parser: Callable[[str, str], Any], required: bool = False) -> None:
            raw = env.get(var)
            if raw is None or raw.strip() == "":
                if required:
                    problems.append(InvalidValue(var, raw if raw is not None else "", "to be set (it is required)"))
                return
            used[var] = raw
            try:
                values[attr] = parser(var, raw)
            except InvalidValue as exc:
                if exc.name != var:
                    exc = InvalidValue(var, exc.value, exc.expected)
                if is_secret_name(var) or var in PROXY_VARIABLES:
                    exc = InvalidValue(var, redact_value(var, raw), exc.expected)
                problems.append(exc)

        take("DRIVER_VERSION", "driver_version", _driver_version, required=True)
        take("TARGETARCH", "target_arch", _arch, required=True)
        take("DRIVER_BRANCH", "driver_branch", _branch)
        take("DRIVER_TYPE", "driver_type", _choice(DRIVER_TYPES))
        take("KERNEL_MODULE_TYPE", "kernel_module_type", _choice(KERNEL_MODULE_TYPES))
        take("GPU_DIRECT_RDMA_ENABLED", "gpu_direct_rdma_enabled", parse_bool)
        take("USE_HOST_MOFED", "use_host_mofed", parse_bool)
        take("GDS_ENABLED", "gds_enabled", parse_bool)
        take("GDRCOPY_ENABLED", "gdrcopy_enabled", parse_bool)
        take("OPEN_KERNEL_MODULES_ENABLED", "open_kernel_modules_enabled", parse_bool)
        take("DRIVER_CONFIG_DIGEST", "driver_config_digest", _pattern(_DIGEST, "one word without spaces"))
        take("RHCOS_IMAGE_MISSING", "rhcos_image_missing", parse_bool)
        take("RHCOS_VERSION", "rhcos_version", _pattern(_RHCOS_VERSION, "an RHCOS version like 416.94.202407030122-0 or 9.6.20250523-0"))
        take("OPENSHIFT_VERSION", "openshift_version", _pattern(_OPENSHIFT_VERSION, "an OpenShift version like 4.16"))
        take("RHEL_VERSION", "rhel_version", _pattern(_RHEL_VERSION, "a RHEL version like 9 or 9.4"))
        take("DNF_RELEASEVER", "dnf_releasever", _pattern(_RHEL_VERSION, "a dnf releasever like 9 or 9.4"))
        take("VGPU_LICENSE_SERVER_TYPE", "vgpu_license_server_type", _choice(("nls", "fne")))
        take("DISABLE_VGPU_VERSION_CHECK", "disable_vgpu_version_check", parse_bool)
        take("IGNORE_PREEMPT_RT_PRESENCE", "ignore_preempt_rt_presence", parse_bool)
        take("DRIVER_CTR_ROOT", "root", _abs_path)
        take("DRIVER_CTR_KERNEL_RELEASE", "kernel_release_override", _kernel_release)
        take("DRIVER_CTR_LOG_FORMAT", "log_format", _log_format)
        take("DRIVER_CTR_SHARED_DIR", "shared_dir", _abs_path)
        take("DRIVER_CTR_BUILD_TIMEOUT", "build_timeout_s", _positive_seconds)
        take("DRIVER_CTR_START_TIMEOUT", "start_timeout_s", _positive_seconds)
        take("DRIVER_CTR_MAX_THREADS", "max_threads", _positive_int)
        take("DRIVER_CTR_SOURCE_DIR", "source_dir", _abs_path)
        take("DRIVER_CTR_CACHE_DIR", "cache_dir", _abs_path)
        take("DRIVER_CTR_CACHE_KEEP", "cache_keep", _positive_int)
        take("DRIVER_CTR_SIGNING_KEY", "signing_key", _abs_path)
        take("DRIVER_CTR_SIGNING_CERT", "signing_cert", _abs_path)
        take("DRIVER_CTR_SIGNING_HASH", "signing_hash", _choice(("sha256", "sha384", "sha512", "sha224", "sha1")))

        nvfm: List[Tuple[str, str]] = []
        for var in sorted(env):
            if var.startswith(NVFM_PREFIX):
                fld = var[len(NVFM_PREFIX):]
                if not _NVFM_FIELD.match(fld):
                    problems.append(InvalidValue(var, env[var], "NVFM_CONFIG_<FIELD> with FIELD in upper case letters, digits and _"))
                    continue
                try:
                    nvfm.append((fld, _one_line(var, env[var]).strip()))
                    used[var] = env[var]
                except InvalidValue as exc:
                    problems.append(exc)
        proxies: List[Tuple[str, str]] = []
        for var in PROXY_VARIABLES:
            raw = env.get(var)
            if raw is None or raw.strip() == "":
                continue
            try:
                proxies.append((var, _proxy(var, raw)))
                used[var] = raw
            except InvalidValue as exc:
                problems.append(exc)

        key_set = bool(env.get("DRIVER_CTR_SIGNING_KEY", "").strip())
        cert_set = bool(env.get("DRIVER_CTR_SIGNING_CERT", "").strip())
        if key_set != cert_set:
            missing = "DRIVER_CTR_SIGNING_CERT" if key_set else "DRIVER_CTR_SIGNING_KEY"
            problems.append(InvalidValue(missing, "", "to be set too: signing needs both a key and a certificate"))

        if problems:
            raise SettingsError(problems)

        dv: DriverVersion = values["driver_version"]
        if "driver_branch" not in values:
            values["driver_branch"] = dv.branch
        values["targetarch_raw"] = env["TARGETARCH"].strip()
        if "vgpu_license_server_type" in values:
            values["vgpu_license_server_type"] = values["vgpu_license_server_type"].upper()
        return cls(nvfm_config=tuple(nvfm), proxies=tuple(proxies), raw=tuple(sorted(used.items())), **values)

