"""The one guard in front of every outbound request fluxserve makes.

Two checks, in two places:

* `check_url` is syntactic and needs no DNS: allowed scheme, a host, no credentials,
  a valid port, and no literal IP address that is not public. It runs when a task is
  submitted and again for every request the client sends, redirect hops included.
* `GuardedNetworkBackend.connect_tcp` runs when a TCP connection is opened: it
  resolves the host once, refuses if any address is not public, and connects to
  the address it checked. Checking and connecting use the same answer, so a DNS
  record that changes between the two (DNS rebinding) cannot slip through.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from http.cookiejar import CookieJar, DefaultCookiePolicy

import httpcore
import httpx

from fluxserve.errors import FetchError, ResponseTooLarge, UnsafeURLError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# (host, port) -> the IP addresses to try, in order; replaceable in tests.
Resolver = Callable[[str, int], Awaitable[Sequence[str]]]
# An IP address as text -> whether the guard may connect to it.
AddressCheck = Callable[[str], bool]

_DEFAULT_LIMITS = httpx.Limits(max_connections=100, max_keepalive_connections=20)


@dataclass(frozen=True)
class NetPolicy:
    """What outbound requests may reach, and how long they may take."""

    allow_private_networks: bool = False
    allowed_schemes: frozenset[str] = frozenset({"http", "https"})
    connect_timeout: float = 5.0
    read_timeout: float = 10.0
    max_redirects: int = 5


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


def _describe(ip: str | IPAddress) -> str:
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


def _literal_address(host: str) -> IPAddress | None:
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


_USERINFO = re.compile(r"(?<=//)[^/?#@]*@")


def _short(url: str | httpx.URL, limit: int = 200) -> str:
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
        raise UnsafeURLError(f"invalid URL {_short(url)!r}: {exc}") from exc
    shown = _short(url)
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
        addr = _literal_address(host)
        if addr is not None and not is_public_address(addr):
            raise UnsafeURLError(
                f"URL host {host} is a {_describe(addr)} address, "
                f"and private networks are not allowed: {shown}"
            )


async def system_resolver(host: str, port: int) -> list[str]:
    """Resolve a host with the event loop's getaddrinfo; IP addresses in its order."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    addresses: list[str] = []
    for family, _type, _proto, _canonname, sockaddr in infos:
        if family in (socket.AF_INET, socket.AF_INET6):
            address = str(sockaddr[0])
            if address not in addresses:
                addresses.append(address)
    return addresses


class GuardedNetworkBackend(httpcore.AsyncNetworkBackend):
    """An httpcore network backend that only connects to addresses the policy allows."""

    def __init__(
        self,
        policy: NetPolicy,
        *,
        backend: httpcore.AsyncNetworkBackend | None = None,
        resolver: Resolver | None = None,
        address_allowed: AddressCheck | None = None,
    ) -> None:
        self.policy = policy
        # AnyIOBackend is what httpcore's AutoBackend picks under asyncio; the
        # resolver below needs asyncio anyway, so trio is not supported.
        self._backend = backend if backend is not None else httpcore.AnyIOBackend()
        self._resolver = resolver if resolver is not None else system_resolver
        self._address_allowed = (
            address_allowed if address_allowed is not None else is_public_address
        )

    async def resolve(self, host: str, port: int) -> list[str]:
        """Resolve `host` and return its addresses; UnsafeURLError if any is refused."""
        addresses = list(dict.fromkeys(await self._resolver(host, port)))
        if not addresses:
            raise httpcore.ConnectError(f"could not resolve host {host!r}: no addresses")
        if not self.policy.allow_private_networks:
            # Refuse when ANY address is refused, not just the first: the attacker
            # controls the order, and a later fallback would reach the bad one.
            refused = [a for a in addresses if not self._address_allowed(a)]
            if refused:
                raise UnsafeURLError(
                    f"host {host!r} resolves to {refused[0]}, a {_describe(refused[0])} "
                    "address, and private networks are not allowed"
                )
        return addresses

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore's interface
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        """Resolve, check every address, then connect to a checked address."""
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            async with asyncio.timeout(timeout):
                addresses = await self.resolve(host, port)
        except TimeoutError as exc:
            raise httpcore.ConnectTimeout(f"timed out resolving host {host!r}") from exc
        except (OSError, UnicodeError) as exc:
            # socket.gaierror; or the resolver's IDNA codec refusing the name
            # ("a..b": an empty label), which no retry will change either.
            raise httpcore.ConnectError(f"could not resolve host {host!r}: {exc}") from exc

        # Connect to the IP we checked, never to `host` again: a second lookup
        # could answer differently. TLS is unaffected: httpcore's
        # AsyncHTTPConnection._connect (httpcore 1.0.9, _async/connection.py) calls
        # `stream.start_tls(server_hostname=sni_hostname or origin.host)`, taken
        # from the request URL and not from this stream, and AnyIOStream.start_tls
        # hands it to TLSStream.wrap(hostname=...) -> SSLContext.wrap_bio(
        # server_hostname=...). So SNI and certificate hostname checks still use
        # the URL's host name.
        last_error: Exception | None = None
        for address in addresses:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                return await self._backend.connect_tcp(
                    address,
                    port,
                    timeout=remaining,
                    local_address=local_address,
                    socket_options=socket_options,
                )
            except httpcore.ConnectError as exc:
                last_error = exc  # try the next address, as happy eyeballs would
        assert last_error is not None
        raise last_error

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore's interface
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        """Always refused: a Unix socket is a local target by definition."""
        raise UnsafeURLError("connections to Unix sockets are not allowed")

    async def sleep(self, seconds: float) -> None:
        """Sleep between connection retries."""
        await self._backend.sleep(seconds)


def _unsafe_cause(exc: BaseException) -> UnsafeURLError | None:
    """The UnsafeURLError an httpx/httpcore error wraps, if any."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, UnsafeURLError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


class GuardedTransport(httpx.AsyncHTTPTransport):
    """httpx's transport, with the connection pool using `GuardedNetworkBackend`."""

    def __init__(
        self,
        policy: NetPolicy,
        *,
        verify: ssl.SSLContext | bool = True,
        trust_env: bool = True,
        http1: bool = True,
        http2: bool = False,
        limits: httpx.Limits = _DEFAULT_LIMITS,
        local_address: str | None = None,
        retries: int = 0,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
        resolver: Resolver | None = None,
        address_allowed: AddressCheck | None = None,
    ) -> None:
        # No proxy and no uds parameters: both would send traffic somewhere other
        # than the address the backend checked.
        ssl_context = httpx.create_ssl_context(verify=verify, trust_env=trust_env)
        super().__init__(
            verify=ssl_context,
            trust_env=trust_env,
            http1=http1,
            http2=http2,
            limits=limits,
            local_address=local_address,
            retries=retries,
            socket_options=socket_options,
        )
        self.backend = GuardedNetworkBackend(
            policy, resolver=resolver, address_allowed=address_allowed
        )
        # The same arguments httpx 0.28's AsyncHTTPTransport passes when there is
        # no proxy, plus our network backend. The pool super() built holds no
        # connections yet, so nothing needs closing.
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=ssl_context,
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            http1=http1,
            http2=http2,
            local_address=local_address,
            retries=retries,
            socket_options=socket_options,
            network_backend=self.backend,
        )

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Send one request; a refusal from the backend surfaces as UnsafeURLError."""
        try:
            return await super().handle_async_request(request)
        except UnsafeURLError:
            raise
        except Exception as exc:
            # httpx 0.28 lets non-httpcore exceptions through unchanged, but a
            # future version could wrap them; callers must still see the refusal.
            unsafe = _unsafe_cause(exc)
            if unsafe is None:
                raise
            raise UnsafeURLError(str(unsafe)) from exc


def _no_cookies() -> CookieJar:
    # One client serves URLs from every user: a cookie one site sets must not be
    # sent on another user's request to that site. (A CookieJar, not
    # httpx.Cookies: the client copies the latter into a jar with the default
    # policy.)
    return CookieJar(policy=DefaultCookiePolicy(allowed_domains=[]))


def guarded_client(
    policy: NetPolicy,
    *,
    timeout: float | None = None,
    transport: GuardedTransport | None = None,
) -> httpx.AsyncClient:
    """An AsyncClient whose every request and redirect hop passes the net guard.

    `timeout`, when given, replaces the policy's read timeout (also used for
    writes and waiting for a pooled connection); connecting is capped by
    the policy's connect timeout. `transport` lets tests inject a resolver.
    """
    if transport is None:
        transport = GuardedTransport(policy)
    elif not isinstance(transport, GuardedTransport):
        raise TypeError("transport must be a GuardedTransport")
    read = policy.read_timeout if timeout is None else timeout
    connect = policy.connect_timeout if timeout is None else min(policy.connect_timeout, timeout)

    async def check_request(request: httpx.Request) -> None:
        # Runs for the first request and for each redirect hop httpx follows.
        check_url(request.url, policy)

    return httpx.AsyncClient(
        transport=transport,
        follow_redirects=True,
        max_redirects=policy.max_redirects,
        timeout=httpx.Timeout(read, connect=connect),
        event_hooks={"request": [check_request]},
        cookies=_no_cookies(),
        # No proxies from the environment and no ~/.netrc credentials.
        trust_env=False,
    )


@dataclass(frozen=True)
class Fetched:
    """A fetched body, its Content-Type and the final URL after redirects."""

    content: bytes
    content_type: str | None
    url: str


async def fetch_bytes(
    client: httpx.AsyncClient,
    url: str,
    *,
    policy: NetPolicy,
    max_bytes: int,
    total_timeout: float | None = None,
) -> Fetched:
    """GET `url` through the guard; FetchError on non-2xx, timeouts or more than max_bytes.

    `client` should come from `guarded_client`. `total_timeout` bounds the whole
    fetch, which the per-read timeout alone does not (a server may drip bytes).
    """
    check_url(url, policy)
    shown = _short(url)
    try:
        async with asyncio.timeout(total_timeout):
            return await _fetch(client, url, policy=policy, max_bytes=max_bytes)
    except TimeoutError as exc:
        raise FetchError(
            f"could not fetch {shown}: took longer than {total_timeout:g} s in total"
        ) from exc
    except httpx.TimeoutException as exc:
        phase = {
            httpx.ConnectTimeout: "connecting",
            httpx.ReadTimeout: "waiting for data",
            httpx.WriteTimeout: "sending the request",
            httpx.PoolTimeout: "waiting for a free connection",
        }.get(type(exc), "waiting")
        raise FetchError(f"could not fetch {shown}: timed out {phase}") from exc
    except httpx.HTTPError as exc:
        unsafe = _unsafe_cause(exc)
        if unsafe is not None:
            raise UnsafeURLError(str(unsafe)) from exc
        reason = str(exc) or type(exc).__name__
        raise FetchError(f"could not fetch {shown}: {reason}") from exc


async def _fetch(
    client: httpx.AsyncClient, url: str, *, policy: NetPolicy, max_bytes: int
) -> Fetched:
    shown = _short(url)
    # Identity encoding: images are compressed already, and a gzip body could
    # inflate far beyond max_bytes inside httpx's decoder before we count it.
    request = client.build_request("GET", url, headers={"Accept-Encoding": "identity"})
    for _hop in range(policy.max_redirects + 1):
        check_url(request.url, policy)  # again here in case the client is not guarded
        # Redirects are followed by hand: httpx reads a redirect response's whole
        # body into memory before following it, with no size limit.
        response = await client.send(request, stream=True, follow_redirects=False)
        try:
            if response.has_redirect_location and response.next_request is not None:
                request = response.next_request
                continue
            return await _read_limited(response, shown, max_bytes)
        finally:
            await response.aclose()
    raise FetchError(f"could not fetch {shown}: more than {policy.max_redirects} redirects")


async def _read_limited(response: httpx.Response, shown: str, max_bytes: int) -> Fetched:
    if not response.is_success:
        reason = f" {response.reason_phrase}" if response.reason_phrase else ""
        raise FetchError(f"could not fetch {shown}: HTTP {response.status_code}{reason}")
    encoding = response.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise FetchError(
            f"could not fetch {shown}: unsupported Content-Encoding {encoding!r} "
            "(identity was requested)"
        )
    too_big = f"could not fetch {shown}: response is larger than {max_bytes} bytes"
    declared = response.headers.get("content-length")
    if declared is not None and declared.strip().isdigit() and int(declared) > max_bytes:
        raise ResponseTooLarge(too_big)
    body = bytearray()
    async for chunk in response.aiter_raw():
        body += chunk
        if len(body) > max_bytes:
            raise ResponseTooLarge(too_big)
    return Fetched(
        content=bytes(body),
        content_type=response.headers.get("content-type"),
        url=str(response.url),
    )


__all__ = [
    "AddressCheck",
    "Fetched",
    "GuardedNetworkBackend",
    "GuardedTransport",
    "NetPolicy",
    "Resolver",
    "check_url",
    "fetch_bytes",
    "guarded_client",
    "is_public_address",
    "system_resolver",
]
