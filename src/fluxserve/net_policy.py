"""What outbound requests may reach, and the URL check that needs no DNS.

`check_url` is syntactic: allowed scheme, a host, no credentials, a valid port,
and no literal IP address that is not public. It runs when a task is submitted
and again for every request the guarded client sends, redirect hops included
(fluxserve/netguard.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import httpx

from fluxserve.errors import UnsafeURLError
from fluxserve.net_addresses import describe_address, is_public_address, literal_address


@dataclass(frozen=True)
class NetPolicy:
    """What outbound requests may reach, and how long they may take."""

    allow_private_networks: bool = False
    allowed_schemes: frozenset[str] = frozenset({"http", "https"})
    connect_timeout: float = 5.0
    read_timeout: float = 10.0
    max_redirects: int = 5


_USERINFO = re.compile(r"(?<=//)[^/?#@]*@")


def short_url(url: str | httpx.URL, limit: int = 200) -> str:
    """A URL for error messages: credentials removed, long ones cut."""
    text = _USERINFO.sub("", str(url), count=1)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_url(url: str | httpx.URL, policy: NetPolicy) -> None:
    """Refuse a URL the policy does not allow, without DNS; raises UnsafeURLError."""
    try:
        parsed = url if isinstance(url, httpx.URL) else httpx.URL(url)
        # httpx decodes an IDNA host ("xn--...") only when asked for it, and an
        # invalid one raises then (idna.IDNAError, a ValueError).
        host = parsed.host
    except (httpx.InvalidURL, TypeError, ValueError) as exc:
        raise UnsafeURLError(f"invalid URL {short_url(url)!r}: {exc}") from exc
    shown = short_url(url)
    if not parsed.scheme:
        raise UnsafeURLError(f"URL has no scheme: {shown}")
    if parsed.scheme not in policy.allowed_schemes:
        allowed = ", ".join(sorted(policy.allowed_schemes))
        raise UnsafeURLError(
            f"URL scheme {parsed.scheme!r} is not allowed (allowed: {allowed}): {shown}"
        )
    if not host:
        raise UnsafeURLError(f"URL has no host: {shown}")
    if parsed.userinfo:
        # Credentials in URLs leak into logs and redirects; callers use headers.
        raise UnsafeURLError(f"URL must not contain credentials (user:password@): {shown}")
    if parsed.port is not None and not 1 <= parsed.port <= 65535:
        raise UnsafeURLError(f"URL port {parsed.port} is out of range: {shown}")
    if not policy.allow_private_networks:
        addr = literal_address(host)
        if addr is not None and not is_public_address(addr):
            raise UnsafeURLError(
                f"URL host {host} is a {describe_address(addr)} address, "
                f"and private networks are not allowed: {shown}"
            )


__all__ = ["NetPolicy", "check_url", "short_url"]
