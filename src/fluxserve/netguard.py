"""The guarded httpx client in front of every outbound request fluxserve makes.

Two checks, in two places:

* `check_url` (fluxserve/net_policy.py) is syntactic and needs no DNS. It runs
  when a task is submitted and, through `guarded_client`'s request hook, again
  for every request the client sends, redirect hops included.
* `GuardedNetworkBackend.connect_tcp` runs when a TCP connection is opened: it
  resolves the host once, refuses if any address is not public, and connects to
  the address it checked. Checking and connecting use the same answer, so a DNS
  record that changes between the two (DNS rebinding) cannot slip through.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from http.cookiejar import CookieJar, DefaultCookiePolicy

import httpcore
import httpx

from fluxserve.errors import UnsafeURLError
from fluxserve.net_addresses import describe_address, is_public_address
from fluxserve.net_policy import NetPolicy, check_url

# (host, port) -> the IP addresses to try, in order; replaceable in tests.
Resolver = Callable[[str, int], Awaitable[Sequence[str]]]
# An IP address as text -> whether the guard may connect to it.
AddressCheck = Callable[[str], bool]

_DEFAULT_LIMITS = httpx.Limits(max_connections=100, max_keepalive_connections=20)


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
                    f"host {host!r} resolves to {refused[0]}, a {describe_address(refused[0])} "
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


def unsafe_cause(exc: BaseException) -> UnsafeURLError | None:
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
            unsafe = unsafe_cause(exc)
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


__all__ = [
    "AddressCheck",
    "GuardedNetworkBackend",
    "GuardedTransport",
    "Resolver",
    "guarded_client",
    "system_resolver",
    "unsafe_cause",
]
