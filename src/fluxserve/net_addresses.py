"""Which IP addresses are public, and which address a URL host spells literally.

`is_public_address` is the rule the net guard applies to every address it would
connect to (fluxserve/netguard.py) and to literal hosts in URLs
(fluxserve/net_policy.py); `describe_address` names why an address is refused.
"""

from __future__ import annotations

import ipaddress
import re
import socket

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# IANA special-purpose ranges that are not globally reachable. Listed here rather
# than trusting only `ipaddress`' flags, whose tables changed between Python
# patch releases (3.11.10 / 3.12.4 corrected several of them).
_BLOCKED_V4 = tuple(
    ipaddress.IPv4Network(net)
    for net in (
        "0.0.0.0/8",  # "this network"; 0.0.0.0 reaches localhost on Linux
        "10.0.0.0/8",
        "100.64.0.0/10",  # shared address space (carrier-grade NAT)
        "127.0.0.0/8",
        "169.254.0.0/16",  # link-local, includes cloud metadata 169.254.169.254
        "172.16.0.0/12",
        "192.0.0.0/24",
        "192.0.2.0/24",
        "192.88.99.0/24",
        "192.168.0.0/16",
        "198.18.0.0/15",
        "198.51.100.0/24",
        "203.0.113.0/24",
        "224.0.0.0/4",  # multicast
        "240.0.0.0/4",  # reserved, includes broadcast 255.255.255.255
    )
)
_BLOCKED_V6 = tuple(
    ipaddress.IPv6Network(net)
    for net in (
        "::/96",  # unspecified, loopback and deprecated IPv4-compatible addresses
        "64:ff9b:1::/48",  # local-use NAT64
        "100::/64",  # discard-only
        "2001::/23",  # IETF protocol assignments, Teredo included
        "2001:db8::/32",  # documentation
        "3fff::/20",  # documentation
        "5f00::/16",  # SRv6 SIDs
        "fc00::/7",  # unique local
        "fe80::/10",  # link-local
        "fec0::/10",  # deprecated site-local
        "ff00::/8",  # multicast
    )
)
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_CGNAT = ipaddress.IPv4Network("100.64.0.0/10")

# Hosts that only digits, dots and hex could spell: inet_aton reads these as IPv4
# ("127.1", "2130706433", "0x7f.0.0.1"), and so does the system resolver.
_NUMERIC_HOST = re.compile(r"[0-9a-fA-FxX.]+")


def _parse_address(ip: str | IPAddress) -> IPAddress | None:
    if isinstance(ip, ipaddress.IPv4Address | ipaddress.IPv6Address):
        return ip
    try:
        return ipaddress.ip_address(str(ip).strip("[]"))
    except ValueError:
        return None


def _embedded_ipv4(addr: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    # These IPv6 forms deliver to an IPv4 address; judge them by that address.
    if addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    if addr.sixtofour is not None:
        return addr.sixtofour
    if addr in _NAT64:
        return ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
    return None


def is_public_address(ip: str | IPAddress) -> bool:
    """Whether an IP address is globally routable (not loopback, private, link-local...)."""
    addr = _parse_address(ip)
    if addr is None:
        return False
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.scope_id:  # a zone index only makes sense for link-local targets
            return False
        embedded = _embedded_ipv4(addr)
        if embedded is not None:
            return is_public_address(embedded)
        blocked: tuple[ipaddress.IPv4Network, ...] | tuple[ipaddress.IPv6Network, ...]
        blocked = _BLOCKED_V6
    else:
        blocked = _BLOCKED_V4
    if any(addr in net for net in blocked):
        return False
    return addr.is_global and not (
        addr.is_private
        or addr.is_loopback
        or addr.is_link_local
        or addr.is_multicast
        or addr.is_reserved
        or addr.is_unspecified
    )


def describe_address(ip: str | IPAddress) -> str:
    """A word for why an address is not public, for error messages."""
    addr = _parse_address(ip)
    if addr is None:
        return "unparsable"
    if isinstance(addr, ipaddress.IPv6Address):
        addr = _embedded_ipv4(addr) or addr
    if addr.is_unspecified:
        return "unspecified"
    if addr.is_loopback:
        return "loopback"
    if addr.is_link_local:
        return "link-local"
    if addr.is_multicast:
        return "multicast"
    if isinstance(addr, ipaddress.IPv4Address) and addr in _CGNAT:
        return "shared (carrier-grade NAT)"
    if addr.is_private:
        return "private"
    return "reserved"


def literal_address(host: str) -> IPAddress | None:
    """The IP address a URL host spells literally, without asking DNS."""
    addr = _parse_address(host)
    if addr is not None:
        return addr
    if _NUMERIC_HOST.fullmatch(host):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return None
    return None


__all__ = ["IPAddress", "describe_address", "is_public_address", "literal_address"]
