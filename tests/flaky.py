"""A real HTTP proxy on 127.0.0.1 that loses answers on purpose, to test client retries."""

from __future__ import annotations

import asyncio
from collections import Counter
from types import TracebackType

import httpx

_HOP_BY_HOP = {"host", "connection", "content-length", "transfer-encoding", "content-encoding"}
_BUSY = b'{"code":503,"error":{"message":"busy, try again","type":"server_error"}}'


class FlakyProxy:
    """Forwards each request to `upstream`. For a path in `answer_503`, answers 503 that
    many times without forwarding; for a path in `drop_after_forwarding`, forwards it and
    then closes the connection without answering, that many times (the server did the
    work; the client never hears of it). `forwarded` counts what reached the server."""

    def __init__(
        self,
        upstream: str,
        *,
        answer_503: dict[str, int] | None = None,
        drop_after_forwarding: dict[str, int] | None = None,
    ) -> None:
        self.upstream = upstream
        self.answer_503 = dict(answer_503 or {})
        self.drop_after_forwarding = dict(drop_after_forwarding or {})
        self.forwarded: Counter[str] = Counter()
        self.url = ""

    async def __aenter__(self) -> FlakyProxy:
        self._client = httpx.AsyncClient(base_url=self.upstream, timeout=30)
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._server.close()
        await self._client.aclose()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while await self._one(reader, writer):
                pass
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def _one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Proxy one request; False to close the connection."""
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        method, target, _ = head[0].split(" ", 2)
        headers = [tuple(part.strip() for part in line.split(":", 1)) for line in head[1:] if line]
        length = next((int(v) for k, v in headers if k.lower() == "content-length"), 0)
        body = await reader.readexactly(length)
        path = target.split("?", 1)[0]
        if self.answer_503.get(path, 0) > 0:
            self.answer_503[path] -= 1
            writer.write(
                b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                b"Retry-After: 0\r\nContent-Length: %d\r\n\r\n%s" % (len(_BUSY), _BUSY)
            )
            await writer.drain()
            return True
        answer = await self._client.request(
            method,
            target,
            headers=[(k, v) for k, v in headers if k.lower() not in _HOP_BY_HOP],
            content=body,
        )
        self.forwarded[path] += 1
        if self.drop_after_forwarding.get(path, 0) > 0:
            self.drop_after_forwarding[path] -= 1
            return False
        lines = [f"HTTP/1.1 {answer.status_code} {answer.reason_phrase}"]
        lines += [f"{k}: {v}" for k, v in answer.headers.items() if k.lower() not in _HOP_BY_HOP]
        lines.append(f"Content-Length: {len(answer.content)}")
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + answer.content)
        await writer.drain()
        return True
