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
    """Replace the user-info of every URL in ``text`` with ``***``, with or without a scheme (a proxy may
    be given as ``user:password@proxy:3128``): ``scheme://user:password@host`` -> ``scheme://***@host``,
    ``user:password@host`` -> ``***@host``; see :func:`_redact_schemeless` for the second form.
    The user-info is everything from ``://`` to the *last* ``@`` of the URL
    token (up to whitespace or a quote), so a password holding ``@``, ``/``,
    ``:`` or percent-escapes is hidden whole; a path holding ``@`` is hidden
    too (more than needed, never less). Linear in the length of ``text``:
    every character is looked at a bounded number of times.
    """
    if "@" not in text:
        return text
    if "://" not in text:
        return _redact_schemeless(text)
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
    return _redact_schemeless("".join(out))


_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
_TOKEN = re.compile(r"[^\s\"'`]+")  # maximal runs: each character is in one token, looked at once


def _redact_schemeless(text: str) -> str:
    """``user:password@host`` tokens (up to whitespace or a quote) without ``://``: everything before the
    token's last ``@`` is hidden when it holds a ``:`` (a user and a password; a ``NAME=`` in front, as in
    ``https_proxy=user:pw@host``, is kept). Linear: each token is looked at once."""
    out = []
    pos = 0
    for m in _TOKEN.finditer(text):
        token = m.group(0)
        at = token.rfind("@")
        if at <= 0 or at == len(token) - 1 or "://" in token:
            continue
        lead = _ASSIGNMENT.match(token)
        start = lead.end() if lead else 0
        user_info = token[start:at]
        if ":" not in user_info or user_info == REDACTED:
            continue
        out.append(text[pos : m.start() + start])
        out.append(REDACTED)
        pos = m.start() + at
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
