"""What must never appear in clear in a log, a shared file or an error message."""

from __future__ import annotations

import re
from typing import Any

REDACTED = "***"

_SECRET_NAME = re.compile(r"(PASSWORD|PASSWD|TOKEN|SECRET|KEY|CREDENTIAL)", re.IGNORECASE)
# scheme://user:password@host -> scheme://***@host ; also user@host.
_URL_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/@\s]+)@")


def is_secret_name(name: str) -> bool:
    """True for variable or field names that look like they hold a secret."""
    return bool(_SECRET_NAME.search(name))


def redact_url_credentials(text: str) -> str:
    """Replace the user-info part of every URL in ``text`` with ``***``."""
    return _URL_USERINFO.sub(lambda m: m.group("scheme") + REDACTED + "@", text)


def redact_value(name: str, value: Any) -> Any:
    """The value to show for ``name``: hidden when the name looks secret,
    URL credentials stripped when it is a string."""
    if is_secret_name(name):
        return REDACTED if value not in (None, "") else value
    if isinstance(value, str):
        return redact_url_credentials(value)
    return value


def redact_mapping(data: Any) -> Any:
    """Recursively redact a mapping/list structure (log event dicts, JSON)."""
    if isinstance(data, dict):
        out = {}
        for k, v in data.items():
            if isinstance(v, (dict, list, tuple)):
                out[k] = REDACTED if is_secret_name(str(k)) and v else redact_mapping(v)
            else:
                out[k] = redact_value(str(k), v)
        return out
    if isinstance(data, (list, tuple)):
        return type(data)(redact_mapping(v) for v in data)
    if isinstance(data, str):
        return redact_url_credentials(data)
    return data
