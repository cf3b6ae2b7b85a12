"""What `fluxserve serve` prints once it listens: the page's URL, holding a key on the
first start.

The key is made only by `serve` (never by `api` processes, which may be many) and
only when the database has no account yet, or when `--new-key` asks for one. It
travels in the URL's fragment (`/#key=...`), which a browser never sends, so it
reaches no server's log; the page stores it and takes it out of the address bar.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from typing import TYPE_CHECKING

import typer
import uvicorn

from fluxserve.local_key import FIRST_ACCOUNT, first_start_key, key_path, new_local_key
from fluxserve.settings import Settings

if TYPE_CHECKING:
    from fluxserve.runtime import Runtime

logger = logging.getLogger(__name__)


class Welcome:
    def __init__(self, settings: Settings, *, new_key: bool) -> None:
        self.settings = settings
        self.new_key = new_key

    def server(self, config: uvicorn.Config, runtime: Runtime) -> uvicorn.Server:
        """A uvicorn server that prints the welcome once it listens."""
        return WelcomingServer(config, self, runtime)

    async def show(self, runtime: Runtime, listening: socket.socket) -> None:
        data_dir = self.settings.data_dir
        key: str | None
        if self.new_key:
            key = await new_local_key(runtime.store, data_dir, "serve --new-key")
        else:
            key = await first_start_key(runtime.store, data_dir)
        page = page_url(listening)
        if key is None:
            self._say(
                f"fluxserve: the page is at {page}\n"
                "  It needs a key: make one with `fluxserve keys create --name NAME`, or\n"
                "  start with `fluxserve serve --new-key` for a link that holds one."
            )
            return
        first = "" if self.new_key else "First start: "
        self._say(
            f"fluxserve: {first}made a key for the account {FIRST_ACCOUNT}, stored hashed.\n"
            f"  It is not shown again; `fluxserve generate` reads it from {key_path(data_dir)}.\n"
            "  Open the page, which keeps the key in your browser:\n\n"
            f"    {page}#key={key}\n"
        )

    def _say(self, text: str) -> None:
        # With JSON logs every line the process writes is JSON: the text goes in one.
        if self.settings.log_format == "json":
            logger.info(text.rstrip())
        else:
            typer.echo(text)


class WelcomingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, welcome: Welcome, runtime: Runtime) -> None:
        super().__init__(config)
        self.welcome = welcome
        self.runtime = runtime

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        # The app has started (the store is open) and the port is bound: the URL works.
        await super().startup(sockets)
        if self.started and self.servers and self.servers[0].sockets:
            await self.welcome.show(self.runtime, self.servers[0].sockets[0])


def page_url(listening: socket.socket) -> str:
    """The page's address on the socket the server listens on; an address that stands
    for every interface is shown as the loopback one, which a browser can open."""
    host, port = listening.getsockname()[:2]
    address = ipaddress.ip_address(host)
    if address.is_unspecified:
        address = ipaddress.ip_address("::1" if address.version == 6 else "127.0.0.1")
    shown = f"[{address}]" if address.version == 6 else str(address)
    return f"http://{shown}:{port}/"
