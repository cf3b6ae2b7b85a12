"""A real TCP proxy on 127.0.0.1 in front of PostgreSQL that a test can make misbehave,
as a network or a middlebox may: to test what the store does when its database
does not answer, or answers what no PostgreSQL would."""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import AsyncIterator

import sqlalchemy as sa

# A DataRow of one column, which no LISTEN returns: the client cannot make sense of it.
_ROW_NOBODY_ASKED_FOR = b"D" + struct.pack("!ihi", 11, 1, 1) + b"x"


class PostgresProxy:
    """Forwards each connection to the database of `database_url` while `serving()`;
    `url` is the same database through the proxy.

    `black_hole`: from now on nothing gets through, either way, on any connection,
    old or new (connections are still accepted); turned off, new connections work
    again. `break_next_listen()`: the next LISTEN a client sends is answered with a
    row besides the server's own answer, once.
    """

    def __init__(self, database_url: str) -> None:
        self._upstream = sa.engine.make_url(database_url)
        self.url = ""
        self.black_hole = False
        self._listen_to_break = False
        self._pumps: set[asyncio.Task[None]] = set()

    @contextlib.asynccontextmanager
    async def serving(self) -> AsyncIterator[PostgresProxy]:
        server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        self.url = self._upstream.set(host="127.0.0.1", port=port).render_as_string(
            hide_password=False
        )
        try:
            yield self
        finally:
            server.close()
            for pump in self._pumps:
                pump.cancel()
            await asyncio.gather(*self._pumps, return_exceptions=True)

    def break_next_listen(self) -> None:
        self._listen_to_break = True

    async def _serve(
        self, client_in: asyncio.StreamReader, client_out: asyncio.StreamWriter
    ) -> None:
        server_in, server_out = await asyncio.open_connection(
            self._upstream.host, self._upstream.port or 5432
        )
        pumps = [
            asyncio.create_task(self._pump(client_in, server_out, client_out)),
            asyncio.create_task(self._pump(server_in, client_out)),
        ]
        self._pumps.update(pumps)
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pump in pumps:
                pump.cancel()
                self._pumps.discard(pump)
            for writer in (client_out, server_out):
                writer.close()

    async def _pump(
        self,
        source: asyncio.StreamReader,
        sink: asyncio.StreamWriter,
        client: asyncio.StreamWriter | None = None,
    ) -> None:
        """`source`'s bytes to `sink`; from a `client`, a LISTEN to break is broken."""
        listening = False
        while chunk := await source.read(65536):
            if self.black_hole:
                continue
            sink.write(chunk)
            with contextlib.suppress(ConnectionError):
                await sink.drain()
            if client is None:
                continue
            if listening:
                # The client sent the LISTEN's execute: a row arrives before the answer.
                client.write(_ROW_NOBODY_ASKED_FOR)
                listening = self._listen_to_break = False
            elif self._listen_to_break and b"LISTEN " in chunk:
                listening = True  # this was its parse; the execute comes next
