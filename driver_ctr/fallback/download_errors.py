"""Why a package manager could not download, in the terms a cluster admin acts on.

dnf (librepo, curl) and apt print a transport error per repository; the last line ("All mirrors were
tried", "Some index files failed to download") says nothing. :func:`explain` reads the details and
names the cause: the proxy refused, the server refused the certificate (for Red Hat's CDN: the
entitlement), a URL without the repository (404), name resolution, or another network error.
"""

from __future__ import annotations

import re
from typing import List, Mapping
from urllib.parse import urlsplit

from ..toolkit.redact import redact_url_credentials

PROXY_NAMES = ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY")

_DETAIL = re.compile(
    r"(Curl error|Status code|Could not connect|Failed to fetch|Err:|E: |"
    r"Certificate|SSL|TLS|Could not resolve|Temporary failure)",
    re.IGNORECASE,
)
_TLS = re.compile(r"TLS|SSL|certificate|GnuTLS|handshake", re.IGNORECASE)
_REFUSED = re.compile(
    r"(?:Failed to connect to|Could not connect to) \[?([^\s\]:]+)\]?(?::| port )(\d+)|"
    r"Could not connect to ([^\s:]+):(\d+)",
    re.IGNORECASE,
)


def details(text: str) -> List[str]:
    """The lines of a package manager's output that describe a transport failure."""
    lines = [line.strip(" -\t") for line in text.splitlines()]
    return [line for line in lines if line and _DETAIL.search(line) and "All mirrors were tried" not in line]


def _proxy(env: Mapping[str, str]) -> str:
    return next((env[n] for n in PROXY_NAMES if env.get(n)), "")


def explain(text: str, env: Mapping[str, str]) -> str:
    """One sentence on the cause, then the package manager's own words (credentials redacted)."""
    found = details(text) or [line.strip() for line in text.strip().splitlines()[-1:]]
    said = redact_url_credentials("; ".join(found[:3]))
    proxy = _proxy(env)
    refused = _REFUSED.search(text)
    if proxy and refused:
        p = urlsplit(proxy if "://" in proxy else "http://" + proxy)
        host, port = refused.group(1) or refused.group(3), refused.group(2) or refused.group(4)
        if host == p.hostname and str(p.port or 80) == port:
            return "the proxy %s refused the connection (HTTPS_PROXY/HTTP_PROXY): %s" % (
                redact_url_credentials(proxy),
                said,
            )
    if re.search(r"Status code: 40[13]|\b40[13]\s+Forbidden|\b401\b", text):
        return (
            "the repository server refused this client (403/401): for Red Hat's CDN an entitlement problem: %s" % said
        )
    if re.search(r"Status code: 404|\b404\s+Not Found", text):
        return (
            "the repository URL has no such file (404): a wrong baseurl or a mirror that lacks this "
            "repository or release: %s" % said
        )
    if _TLS.search(text):
        return (
            "the TLS handshake failed: the server refused the client certificate (for Red Hat's CDN: an "
            "entitlement problem, a wrong or expired certificate) or the server is not trusted (the CA "
            "bundle): %s" % said
        )
    if re.search(r"Could not resolve|Temporary failure resolving|resolve host", text, re.IGNORECASE):
        return "a repository host name does not resolve (DNS, or a proxy is needed): %s" % said
    return "a network error: %s" % said
