"""What must never appear in clear in a log, a shared file or an error message."""

from __future__ import annotations

import re
from typing import Any

REDACTED = "***"

_SECRET_NAME = re.compile(r"(PASSWORD|PASSWD|TOKEN|SECRET|KEY|CREDENTIAL)", re.IGNORECASE)
# Where a URL token ends: whitespace or a quote (a JSON string, a shell word).
_TOKEN_END = re.compile(r"[\s\"'`]")
_SCHEME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789+.-")


def is_secret_name(name: str) -> bool:
    """True for variable or field names that look like they hold a secret."""
    return bool(_SECRET_NAME.search(name))


def redact_url_credentials(text: str) -> str:
    """Replace the user-info of every URL in ``text`` with ``***``:
    ``scheme://user:password@host`` -> ``scheme://***@host``.

    The user-info is everything from ``://`` to the *last* ``@`` of the URL
    token (up to whitespace or a quote), so a password holding ``@``, ``/``,
    ``:`` or percent-escapes is hidden whole; a path holding ``@`` is hidden
    too (more than needed, never less). Linear in the length of ``text``:
    every character is looked at a bounded number of times.
    """
    if "://" not in text:
        return text
    out = []
    pos = 0  # everything before pos is already in out
    i = text.find("://")
    while i != -1:
        start = i
        while start > pos and text[start - 1] in _SCHEME_CHARS:
            start -= 1
        body = i + 3
        if start == i or not text[start].isalpha():
            i = text.find("://", body)
            continue
        m = _TOKEN_END.search(text, body)
        end = m.start() if m else len(text)
        at = text.rfind("@", body, end)
        if at != -1:
            out.append(text[pos:body])
            out.append(REDACTED)
            pos = at  # keeps the "@host..."
        i = text.find("://", end)
    out.append(text[pos:])
    return "".join(out)


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
