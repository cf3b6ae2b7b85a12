"""The net guard against real HTTP(S) servers on 127.0.0.1 and 127.0.0.2."""

from __future__ import annotations

import gzip
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from fluxserve.errors import FetchError, UnsafeURLError
from fluxserve.net_addresses import is_public_address
from fluxserve.net_fetch import Fetched, fetch_bytes
from fluxserve.net_policy import NetPolicy, check_url
from fluxserve.netguard import GuardedNetworkBackend, GuardedTransport, Resolver, guarded_client

LOOPBACK_OK = NetPolicy(allow_private_networks=True)

Route = Callable[["Handler"], None]


class Handler(BaseHTTPRequestHandler):
    """Dispatches GET to the routes of the LocalServer that owns the socket."""

    protocol_version = "HTTP/1.1"  # keep-alive and chunked bodies
    timeout = 5  # idle keep-alive threads end on their own
    server: _HTTPServer

    def do_GET(self) -> None:
        owner = self.server.owner
        path = self.path.split("?", 1)[0]
        owner.requests.append((path, dict(self.headers.items())))
        route = owner.routes.get(path)
        if route is None:
            send(self, 404, b"not here", "text/plain")
        else:
            route(self)

    def log_message(self, format: str, *args: object) -> None:
        pass  # quiet test output


class _HTTPServer(ThreadingHTTPServer):
    # Join every handler thread on close, so no socket outlives a test.
    daemon_threads = False
    block_on_close = True
    owner: LocalServer

    def handle_error(self, request: object, client_address: object) -> None:
        # Clients that stop reading early (size limit, timeout) break the pipe;
        # that is the point of those tests, not a failure.
        self.owner.errors += 1


class LocalServer:
    """A threaded HTTP server on a loopback address, with routes set per test."""

    def __init__(self, host: str = "127.0.0.1", tls: ssl.SSLContext | None = None) -> None:
        self.host = host
        self.routes: dict[str, Route] = {}
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.release = threading.Event()  # lets hanging routes finish at teardown
        self.errors = 0
        self._httpd = _HTTPServer((host, 0), Handler)
        self._httpd.owner = self
        if tls is not None:
            self._httpd.socket = tls.wrap_socket(self._httpd.socket, server_side=True)
        self.scheme = "https" if tls is not None else "http"
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}
        )

    def url(self, path: str, host: str | None = None) -> str:
        return f"{self.scheme}://{host or self.host}:{self.port}{path}"

    def paths(self) -> list[str]:
        return [path for path, _ in self.requests]

    def __enter__(self) -> LocalServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()


def send(
    handler: BaseHTTPRequestHandler,
    status: int,
    body: bytes,
    content_type: str = "application/octet-stream",
    headers: dict[str, str] | None = None,
) -> None:
    handler.send_response(status)
    handler.send_header("Content-Type", content_type)
    handler.send_header("Content-Length", str(len(body)))
    for name, value in (headers or {}).items():
        handler.send_header(name, value)
    handler.end_headers()
    handler.wfile.write(body)


def body(data: bytes, content_type: str = "application/octet-stream") -> Route:
    return lambda h: send(h, 200, data, content_type)


def redirect(location: str, status: int = 302) -> Route:
    return lambda h: send(h, status, b"", "text/plain", {"Location": location})


def chunked(chunks: Sequence[bytes]) -> Route:
    def route(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()
        for chunk in chunks:
            h.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        h.wfile.write(b"0\r\n\r\n")

    return route


def hang(owner: LocalServer) -> Route:
    def route(h: BaseHTTPRequestHandler) -> None:
        owner.release.wait(10)  # never answers while the test runs
        h.close_connection = True

    return route


@pytest.fixture
def server() -> Iterator[LocalServer]:
    with LocalServer() as srv:
        srv.routes["/ok"] = body(b"hello", "text/plain; charset=utf-8")
        yield srv


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port: int = sock.getsockname()[1]
    sock.close()
    return port


def fake_resolver(table: dict[str, list[str]], calls: list[str] | None = None) -> Resolver:
    """A resolver from a table, for hostnames that need no DNS."""

    async def resolve(host: str, port: int) -> list[str]:
        if calls is not None:
            calls.append(host)
        try:
            return table[host]
        except KeyError:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known") from None

    return resolve


# -- is_public_address and check_url: no network -------------------------------------


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("8.8.8.8", True),
        ("1.1.1.1", True),
        ("93.184.215.14", True),
        ("2606:4700:4700::1111", True),
        ("2001:4860:4860::8888", True),
        ("::ffff:8.8.8.8", True),
        ("127.0.0.1", False),
        ("127.255.255.254", False),
        ("::1", False),
        ("::ffff:127.0.0.1", False),
        ("::ffff:169.254.169.254", False),
        ("::127.0.0.1", False),
        ("169.254.169.254", False),  # cloud metadata
        ("169.254.0.1", False),
        ("fe80::1", False),
        ("fe80::1%1", False),
        ("10.0.0.1", False),
        ("172.16.5.4", False),
        ("172.31.255.255", False),
        ("192.168.1.1", False),
        ("fc00::1", False),
        ("fd12:3456::1", False),
        ("100.64.0.1", False),  # carrier-grade NAT
        ("100.127.255.254", False),
        ("0.0.0.0", False),
        ("::", False),
        ("224.0.0.1", False),
        ("239.255.255.250", False),
        ("ff02::1", False),
        ("240.0.0.1", False),
        ("255.255.255.255", False),
        ("192.0.2.1", False),
        ("198.18.0.1", False),
        ("2001:db8::1", False),
        ("2002:7f00:1::1", False),  # 6to4 wrapping 127.0.0.1
        ("2002:808:808::1", True),  # 6to4 wrapping 8.8.8.8
        ("64:ff9b::a9fe:a9fe", False),  # NAT64 wrapping 169.254.169.254
        ("not an address", False),
    ],
)
def test_is_public_address(address: str, public: bool) -> None:
    assert is_public_address(address) is public


def test_is_public_address_accepts_ip_objects() -> None:
    import ipaddress

    assert is_public_address(ipaddress.ip_address("8.8.4.4"))
    assert not is_public_address(ipaddress.ip_address("10.1.1.1"))


def test_policy_defaults_and_frozen() -> None:
    policy = NetPolicy()
    assert policy.allow_private_networks is False
    assert policy.allowed_schemes == frozenset({"http", "https"})
    assert (policy.connect_timeout, policy.read_timeout, policy.max_redirects) == (5.0, 10.0, 5)
    with pytest.raises(AttributeError):
        policy.max_redirects = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("file:///etc/passwd", "scheme 'file' is not allowed"),
        ("ftp://example.com/a.png", "scheme 'ftp' is not allowed"),
        ("gopher://example.com/", "scheme 'gopher' is not allowed"),
        ("example.com/a.png", "no scheme"),
        ("http:///a.png", "no host"),
        ("http://user:secret@example.com/a.png", "credentials"),
        ("http://example.com:0/", "port 0"),
        ("http://example.com:70000/", "port 70000"),
        ("http://127.0.0.1/", "loopback"),
        ("http://127.1/", "loopback"),
        ("http://2130706433/", "loopback"),
        ("http://0x7f.0.0.1/", "loopback"),
        ("http://[::1]:8080/", "loopback"),
        ("http://[::ffff:127.0.0.1]/", "loopback"),
        ("http://169.254.169.254/latest/meta-data/", "link-local"),
        ("http://10.0.0.8/", "private"),
        ("http://100.64.0.1/", "carrier-grade NAT"),
        ("http://0.0.0.0:8000/", "unspecified"),
    ],
)
def test_check_url_refuses(url: str, words: str) -> None:
    with pytest.raises(UnsafeURLError, match=words):
        check_url(url, NetPolicy())


def test_check_url_does_not_echo_credentials() -> None:
    with pytest.raises(UnsafeURLError) as info:
        check_url("http://user:secret@example.com/a.png", NetPolicy())
    assert "secret" not in str(info.value)


@pytest.mark.parametrize(
    "url",
    [
        "https://example.com/a.png",
        "http://example.com:8080/a.png?x=1",
        "HTTPS://EXAMPLE.COM/",
        "http://8.8.8.8/",
        "http://[2606:4700:4700::1111]/",
        "http://cafe.be/",  # looks hex-ish, but is a name
        "http://localhost/",  # a name: judged at connect time, not here
    ],
)
def test_check_url_accepts(url: str) -> None:
    check_url(url, NetPolicy())


def test_check_url_allows_private_literals_when_policy_does() -> None:
    check_url("http://127.0.0.1:8000/", LOOPBACK_OK)
    check_url("http://[::1]/", LOOPBACK_OK)
    with pytest.raises(UnsafeURLError, match="scheme"):
        check_url("file:///etc/passwd", LOOPBACK_OK)


def test_check_url_honours_allowed_schemes() -> None:
    only_https = NetPolicy(allowed_schemes=frozenset({"https"}))
    check_url("https://example.com/", only_https)
    with pytest.raises(UnsafeURLError, match=r"allowed: https"):
        check_url("http://example.com/", only_https)


# -- the connect-time decision, with an injected resolver --------------------------------


async def test_backend_refuses_if_any_resolved_address_is_not_public() -> None:
    backend = GuardedNetworkBackend(
        NetPolicy(),
        resolver=fake_resolver(
            {
                "public.test": ["8.8.8.8", "2606:4700:4700::1111"],
                "mixed.test": ["8.8.8.8", "10.0.0.5"],
                "metadata.test": ["169.254.169.254"],
                "mapped.test": ["::ffff:127.0.0.1"],
            }
        ),
    )
    assert await backend.resolve("public.test", 80) == ["8.8.8.8", "2606:4700:4700::1111"]
    with pytest.raises(UnsafeURLError, match=r"mixed\.test.*10\.0\.0\.5.*private"):
        await backend.resolve("mixed.test", 80)
    with pytest.raises(UnsafeURLError, match=r"169\.254\.169\.254, a link-local"):
        await backend.resolve("metadata.test", 80)
    with pytest.raises(UnsafeURLError, match="loopback"):
        await backend.resolve("mapped.test", 443)


async def test_backend_allows_private_addresses_when_policy_does() -> None:
    backend = GuardedNetworkBackend(
        LOOPBACK_OK, resolver=fake_resolver({"nas.test": ["192.168.1.20"]})
    )
    assert await backend.resolve("nas.test", 80) == ["192.168.1.20"]


async def test_backend_refuses_literal_loopback_and_unix_sockets(server: LocalServer) -> None:
    # Straight to the backend, skipping check_url: the connect-time check alone holds.
    backend = GuardedNetworkBackend(NetPolicy())
    with pytest.raises(UnsafeURLError, match="loopback"):
        await backend.connect_tcp("127.0.0.1", server.port, timeout=2)
    with pytest.raises(UnsafeURLError, match="Unix"):
        await backend.connect_unix_socket("/tmp/some.sock")
    assert server.requests == []


async def test_unresolvable_host_is_a_fetch_error() -> None:
    transport = GuardedTransport(NetPolicy(), resolver=fake_resolver({}))
    async with guarded_client(NetPolicy(), transport=transport) as client:
        with pytest.raises(FetchError, match=r"could not fetch http://nowhere\.test/.*resolve"):
            await fetch_bytes(client, "http://nowhere.test/a.png", policy=NetPolicy(), max_bytes=10)


# -- real sockets -------------------------------------------------------------------------


async def test_literal_loopback_refused(server: LocalServer) -> None:
    policy = NetPolicy()
    async with guarded_client(policy) as client:
        with pytest.raises(UnsafeURLError, match="loopback"):
            await fetch_bytes(client, server.url("/ok"), policy=policy, max_bytes=100)
        with pytest.raises(UnsafeURLError, match="loopback"):
            await client.get(server.url("/ok"))
    assert server.requests == []


async def test_localhost_refused_at_connect_time(server: LocalServer) -> None:
    policy = NetPolicy()
    url = server.url("/ok", host="localhost")
    check_url(url, policy)  # a name passes the syntactic check...
    async with guarded_client(policy) as client:
        # ...and is refused once it resolves to 127.0.0.1, before any byte is sent.
        with pytest.raises(UnsafeURLError, match=r"'localhost' resolves to .*loopback"):
            await fetch_bytes(client, url, policy=policy, max_bytes=100)
        with pytest.raises(UnsafeURLError, match="loopback"):
            await client.get(url)
    assert server.requests == []


async def test_refusal_surfaces_from_the_transport_without_hooks(server: LocalServer) -> None:
    # A plain AsyncClient around the transport: no check_url hook, still refused,
    # and still as UnsafeURLError rather than an httpx error.
    async with httpx.AsyncClient(transport=GuardedTransport(NetPolicy())) as client:
        with pytest.raises(UnsafeURLError):
            await client.get(server.url("/ok"))
        with pytest.raises(UnsafeURLError):
            await client.get(server.url("/ok", host="localhost"))
    assert server.requests == []


async def test_loopback_allowed_when_policy_allows(server: LocalServer) -> None:
    async with guarded_client(LOOPBACK_OK) as client:
        got = await fetch_bytes(client, server.url("/ok"), policy=LOOPBACK_OK, max_bytes=100)
        named = await fetch_bytes(
            client, server.url("/ok", host="localhost"), policy=LOOPBACK_OK, max_bytes=100
        )
    assert got == Fetched(b"hello", "text/plain; charset=utf-8", server.url("/ok"))
    assert named.content == b"hello"
    assert server.paths() == ["/ok", "/ok"]
    # Identity was asked for, so nothing can inflate past max_bytes.
    assert server.requests[0][1]["Accept-Encoding"] == "identity"


async def test_connects_to_the_checked_address_and_keeps_the_host_name(
    server: LocalServer,
) -> None:
    calls: list[str] = []
    transport = GuardedTransport(
        NetPolicy(),
        resolver=fake_resolver({"images.test": ["127.0.0.1"]}, calls),
        address_allowed=lambda ip: ip == "127.0.0.1",
    )
    policy = NetPolicy()
    async with guarded_client(policy, transport=transport) as client:
        got = await fetch_bytes(
            client, server.url("/ok", host="images.test"), policy=policy, max_bytes=100
        )
    assert got.content == b"hello"
    # One lookup, made by the guard; the connection went to the IP it returned
    # (images.test is in no DNS), and the request still names the host.
    assert calls == ["images.test"]
    assert server.requests[0][1]["Host"] == f"images.test:{server.port}"


async def test_redirect_to_a_refused_address_is_refused() -> None:
    # The first hop is allowed, the redirect target resolves to an address the
    # guard refuses; the second server must never see a request.
    with LocalServer("127.0.0.1") as outside, LocalServer("127.0.0.2") as inside:
        inside.routes["/secret"] = body(b"internal data")
        outside.routes["/hop"] = redirect(inside.url("/secret", host="internal.test"))
        outside.routes["/fine"] = body(b"fine")
        resolver = fake_resolver({"allowed.test": ["127.0.0.1"], "internal.test": ["127.0.0.2"]})
        policy = NetPolicy()
        transport = GuardedTransport(
            policy, resolver=resolver, address_allowed=lambda ip: ip == "127.0.0.1"
        )
        async with guarded_client(policy, transport=transport) as client:
            first = outside.url("/hop", host="allowed.test")
            with pytest.raises(UnsafeURLError, match=r"internal\.test.*127\.0\.0\.2"):
                await fetch_bytes(client, first, policy=policy, max_bytes=100)
            # httpx's own redirect following goes through the same guard.
            with pytest.raises(UnsafeURLError, match=r"internal\.test"):
                await client.get(first)
            fine = await fetch_bytes(
                client, outside.url("/fine", host="allowed.test"), policy=policy, max_bytes=100
            )
        assert fine.content == b"fine"
        assert outside.paths() == ["/hop", "/hop", "/fine"]
        assert inside.requests == []


@pytest.mark.parametrize(
    ("location", "words"),
    [
        ("file:///etc/passwd", "scheme 'file'"),
        ("ftp://first.test/x", "scheme 'ftp'"),
        ("http://user:pw@first.test:{port}/ok", "credentials"),
        ("http://169.254.169.254/latest/meta-data/", "link-local"),
        ("http://[::1]:{port}/ok", "loopback"),
    ],
)
async def test_redirect_target_must_pass_check_url(
    server: LocalServer, location: str, words: str
) -> None:
    # first.test reaches the server through the injected resolver; every redirect
    # target is refused by check_url (run for each hop) before any connection.
    server.routes["/hop"] = redirect(location.format(port=server.port))
    policy = NetPolicy()
    transport = GuardedTransport(
        policy,
        resolver=fake_resolver({"first.test": ["127.0.0.1"]}),
        address_allowed=lambda ip: ip == "127.0.0.1",
    )
    first = server.url("/hop", host="first.test")
    async with guarded_client(policy, transport=transport) as client:
        with pytest.raises(UnsafeURLError, match=words):
            await fetch_bytes(client, first, policy=policy, max_bytes=100)
        with pytest.raises(UnsafeURLError, match=words):
            await client.get(first)
    assert server.paths() == ["/hop", "/hop"]


async def test_redirect_to_disallowed_scheme_by_policy(server: LocalServer) -> None:
    policy = NetPolicy(allow_private_networks=True, allowed_schemes=frozenset({"http"}))
    server.routes["/hop"] = redirect(server.url("/ok").replace("http:", "https:"))
    async with guarded_client(policy) as client:
        with pytest.raises(UnsafeURLError, match="scheme 'https' is not allowed"):
            await fetch_bytes(client, server.url("/hop"), policy=policy, max_bytes=100)


async def test_redirects_followed_and_final_url_reported(server: LocalServer) -> None:
    server.routes["/a"] = redirect("/b", 301)
    server.routes["/b"] = redirect(server.url("/ok", host="localhost"), 307)
    async with guarded_client(LOOPBACK_OK) as client:
        got = await fetch_bytes(client, server.url("/a"), policy=LOOPBACK_OK, max_bytes=100)
    assert got.content == b"hello"
    assert got.url == server.url("/ok", host="localhost")
    assert server.paths() == ["/a", "/b", "/ok"]


async def test_too_many_redirects(server: LocalServer) -> None:
    server.routes["/loop"] = redirect("/loop")
    policy = NetPolicy(allow_private_networks=True, max_redirects=3)
    async with guarded_client(policy) as client:
        with pytest.raises(FetchError, match="more than 3 redirects"):
            await fetch_bytes(client, server.url("/loop"), policy=policy, max_bytes=100)
        with pytest.raises(httpx.TooManyRedirects):
            await client.get(server.url("/loop"))
    assert server.paths().count("/loop") == 4 + 4


async def test_redirect_body_is_not_read(server: LocalServer) -> None:
    # A redirect with a huge declared body: httpx would read it whole; we don't.
    def big_redirect(h: BaseHTTPRequestHandler) -> None:
        h.send_response(302)
        h.send_header("Location", "/ok")
        h.send_header("Content-Length", str(10**10))
        h.end_headers()
        h.wfile.write(b"x" * 1000)
        server.release.wait(10)
        h.close_connection = True

    server.routes["/hop"] = big_redirect
    async with guarded_client(LOOPBACK_OK) as client:
        started = time.monotonic()
        got = await fetch_bytes(client, server.url("/hop"), policy=LOOPBACK_OK, max_bytes=100)
    assert got.content == b"hello"
    assert time.monotonic() - started < 3


async def test_body_over_max_bytes_with_content_length(server: LocalServer) -> None:
    server.routes["/big"] = body(b"x" * 2000)
    server.routes["/exact"] = body(b"x" * 1000)
    async with guarded_client(LOOPBACK_OK) as client:
        with pytest.raises(FetchError, match="larger than 1000 bytes"):
            await fetch_bytes(client, server.url("/big"), policy=LOOPBACK_OK, max_bytes=1000)
        exact = await fetch_bytes(client, server.url("/exact"), policy=LOOPBACK_OK, max_bytes=1000)
    assert len(exact.content) == 1000


async def test_declared_length_refused_before_reading(server: LocalServer) -> None:
    # Declares 100 MB, sends 10 bytes, then stalls: only the header can refuse it.
    def liar(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Length", str(100 * 1024 * 1024))
        h.end_headers()
        h.wfile.write(b"0123456789")
        h.wfile.flush()
        server.release.wait(10)
        h.close_connection = True

    server.routes["/liar"] = liar
    policy = NetPolicy(allow_private_networks=True, read_timeout=5)
    async with guarded_client(policy) as client:
        started = time.monotonic()
        with pytest.raises(FetchError, match="larger than 1000 bytes"):
            await fetch_bytes(client, server.url("/liar"), policy=policy, max_bytes=1000)
    assert time.monotonic() - started < 2


async def test_chunked_body_over_max_bytes(server: LocalServer) -> None:
    server.routes["/chunked"] = chunked([b"y" * 300] * 10)
    server.routes["/small"] = chunked([b"ab", b"cd"])
    async with guarded_client(LOOPBACK_OK) as client:
        with pytest.raises(FetchError, match="larger than 1000 bytes"):
            await fetch_bytes(client, server.url("/chunked"), policy=LOOPBACK_OK, max_bytes=1000)
        small = await fetch_bytes(client, server.url("/small"), policy=LOOPBACK_OK, max_bytes=4)
    assert small.content == b"abcd"
    assert small.content_type is None


async def test_compressed_response_refused(server: LocalServer) -> None:
    packed = gzip.compress(b"\0" * 100_000)
    server.routes["/gz"] = lambda h: send(h, 200, packed, "image/png", {"Content-Encoding": "gzip"})
    async with guarded_client(LOOPBACK_OK) as client:
        with pytest.raises(FetchError, match="Content-Encoding 'gzip'"):
            await fetch_bytes(client, server.url("/gz"), policy=LOOPBACK_OK, max_bytes=1000)


async def test_http_404_is_a_fetch_error(server: LocalServer) -> None:
    url = server.url("/missing.png")
    async with guarded_client(LOOPBACK_OK) as client:
        with pytest.raises(FetchError) as info:
            await fetch_bytes(client, url, policy=LOOPBACK_OK, max_bytes=100)
    assert str(info.value) == f"could not fetch {url}: HTTP 404 Not Found"


async def test_server_error_is_a_fetch_error(server: LocalServer) -> None:
    server.routes["/boom"] = lambda h: send(h, 503, b"busy", "text/plain")
    async with guarded_client(LOOPBACK_OK) as client:
        with pytest.raises(FetchError, match="HTTP 503"):
            await fetch_bytes(client, server.url("/boom"), policy=LOOPBACK_OK, max_bytes=100)


async def test_hanging_server_times_out_quickly(server: LocalServer) -> None:
    server.routes["/hang"] = hang(server)
    policy = NetPolicy(allow_private_networks=True, read_timeout=0.3)
    async with guarded_client(policy) as client:
        started = time.monotonic()
        with pytest.raises(FetchError, match="timed out waiting for data"):
            await fetch_bytes(client, server.url("/hang"), policy=policy, max_bytes=100)
    assert time.monotonic() - started < 2


async def test_dripping_server_stopped_by_total_timeout(server: LocalServer) -> None:
    def drip(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Length", "100")
        h.end_headers()
        for _ in range(100):  # each byte arrives well within the read timeout
            if server.release.wait(0.05):
                break
            h.wfile.write(b"x")
            h.wfile.flush()
        h.close_connection = True

    server.routes["/drip"] = drip
    policy = NetPolicy(allow_private_networks=True, read_timeout=1)
    async with guarded_client(policy) as client:
        started = time.monotonic()
        with pytest.raises(FetchError, match=r"longer than 0\.5 s in total"):
            await fetch_bytes(
                client, server.url("/drip"), policy=policy, max_bytes=1000, total_timeout=0.5
            )
    assert time.monotonic() - started < 2


async def test_connection_refused_is_a_fetch_error() -> None:
    url = f"http://127.0.0.1:{closed_port()}/a.png"
    async with guarded_client(LOOPBACK_OK) as client:
        with pytest.raises(FetchError, match=r"could not fetch http://127\.0\.0\.1:\d+/a\.png: "):
            await fetch_bytes(client, url, policy=LOOPBACK_OK, max_bytes=100)


async def test_unsafe_url_refused_even_with_a_plain_client(server: LocalServer) -> None:
    async with httpx.AsyncClient() as plain:
        with pytest.raises(UnsafeURLError, match="loopback"):
            await fetch_bytes(plain, server.url("/ok"), policy=NetPolicy(), max_bytes=100)
        with pytest.raises(UnsafeURLError, match="scheme 'file'"):
            await fetch_bytes(plain, "file:///etc/passwd", policy=LOOPBACK_OK, max_bytes=100)
    assert server.requests == []


async def test_cookies_are_not_kept_between_requests(server: LocalServer) -> None:
    server.routes["/set"] = lambda h: send(h, 200, b"", "text/plain", {"Set-Cookie": "s=1; Path=/"})
    async with guarded_client(LOOPBACK_OK) as client:
        await client.get(server.url("/set"))
        await client.get(server.url("/ok"))
    assert "Cookie" not in server.requests[1][1]


def test_guarded_client_settings() -> None:
    policy = NetPolicy(connect_timeout=2, read_timeout=7, max_redirects=2)
    client = guarded_client(policy)
    assert client.follow_redirects is True
    assert client.max_redirects == 2
    assert (client.timeout.connect, client.timeout.read) == (2, 7)
    shorter = guarded_client(policy, timeout=1.5)
    assert (shorter.timeout.connect, shorter.timeout.read) == (1.5, 1.5)
    with pytest.raises(TypeError):
        guarded_client(policy, transport=httpx.AsyncHTTPTransport())  # type: ignore[arg-type]


# -- TLS: the IP is connected to, the host name is verified -------------------------------


@pytest.fixture(scope="module")
def localhost_cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate valid for the name localhost only (no IP SAN)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is needed to make a test certificate")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [
            openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2",
            "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost",
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


async def test_tls_verifies_the_url_host_name_not_the_ip(
    localhost_cert: tuple[Path, Path],
) -> None:
    cert, key = localhost_cert
    server_names: list[str | None] = []
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    server_ctx.sni_callback = lambda _sock, name, _ctx: server_names.append(name)
    client_ctx = ssl.create_default_context(cafile=str(cert))

    with LocalServer(tls=server_ctx) as srv:
        srv.routes["/ok"] = body(b"secure")
        transport = GuardedTransport(LOOPBACK_OK, verify=client_ctx)
        async with guarded_client(LOOPBACK_OK, transport=transport) as client:
            # The guard connects to 127.0.0.1, yet SNI and the certificate check
            # use "localhost" from the URL: this certificate has no IP in it.
            got = await fetch_bytes(
                client, srv.url("/ok", host="localhost"), policy=LOOPBACK_OK, max_bytes=100
            )
            assert got.content == b"secure"
            assert server_names == ["localhost"]
            # Asking for the IP itself must fail verification.
            with pytest.raises(FetchError, match=r"(?i)certificate"):
                await fetch_bytes(client, srv.url("/ok"), policy=LOOPBACK_OK, max_bytes=100)
        assert srv.paths() == ["/ok"]
