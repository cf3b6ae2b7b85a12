"""Fetching a URL's bytes through the net guard, with a size and time limit.

`fetch_bytes` returns the body in memory, for what is small (a reference image);
`fetch_streamed` hands it over chunk by chunk as it arrives, for what may be large
(a LoRA), so that no more than a chunk of it is ever held.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

import httpx

from fluxserve.errors import FetchError, ResponseTooLarge, UnsafeURLError
from fluxserve.net_policy import NetPolicy, check_url, short_url
from fluxserve.netguard import unsafe_cause


@dataclass(frozen=True)
class Fetched:
    """A fetched body, its Content-Type and the final URL after redirects."""

    content: bytes
    content_type: str | None
    url: str


@dataclass(frozen=True)
class Streamed:
    """What a streamed fetch tells besides its body: its Content-Type and the final
    URL after redirects."""

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
    body = bytearray()
    streamed = await fetch_streamed(
        client, url, body.extend, policy=policy, max_bytes=max_bytes, total_timeout=total_timeout
    )
    return Fetched(content=bytes(body), content_type=streamed.content_type, url=streamed.url)


async def fetch_streamed(
    client: httpx.AsyncClient,
    url: str,
    write: Callable[[bytes], object],
    *,
    policy: NetPolicy,
    max_bytes: int,
    total_timeout: float | None = None,
) -> Streamed:
    """`fetch_bytes`, but each chunk of the body goes to `write` as it arrives.

    A chunk that would take the body past max_bytes is refused before it is
    written; on any error, `write` may have had part of the body.
    """
    check_url(url, policy)
    shown = short_url(url)
    try:
        async with asyncio.timeout(total_timeout):
            return await _fetch(client, url, write, policy=policy, max_bytes=max_bytes)
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
        unsafe = unsafe_cause(exc)
        if unsafe is not None:
            raise UnsafeURLError(str(unsafe)) from exc
        reason = str(exc) or type(exc).__name__
        raise FetchError(f"could not fetch {shown}: {reason}") from exc


async def _fetch(
    client: httpx.AsyncClient,
    url: str,
    write: Callable[[bytes], object],
    *,
    policy: NetPolicy,
    max_bytes: int,
) -> Streamed:
    shown = short_url(url)
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
            return await _read_limited(response, shown, write, max_bytes)
        finally:
            await response.aclose()
    raise FetchError(f"could not fetch {shown}: more than {policy.max_redirects} redirects")


async def _read_limited(
    response: httpx.Response, shown: str, write: Callable[[bytes], object], max_bytes: int
) -> Streamed:
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
    size = 0
    async for chunk in response.aiter_raw():
        size += len(chunk)
        if size > max_bytes:
            raise ResponseTooLarge(too_big)
        write(chunk)
    return Streamed(content_type=response.headers.get("content-type"), url=str(response.url))


__all__ = ["Fetched", "Streamed", "fetch_bytes", "fetch_streamed"]
