"""Shared fixtures: settings in a temporary folder, real servers on 127.0.0.1."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import dataclasses
import functools
import os
import secrets
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from fluxserve.accounts import create_key
from fluxserve.api.app import create_app
from fluxserve.engines.base import Engine
from fluxserve.runtime import Runtime
from fluxserve.settings import Settings
from fluxserve.store import Store, open_store
from fluxserve.store.base import Outcome
from fluxserve.tasks import MODELS, NewTask, ResultFile, Task, TaskInput, new_task_id

from hooked_engine import Hooked

T = TypeVar("T")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The slow tests (real processes, the chaos run the longest) first: the parallel
    workers of scripts/test then share out the quick ones as they come free, and
    none is left running a long test alone at the end."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


async def until(condition: Callable[[], bool], within: float = 30) -> None:
    """Return once `condition()` holds, looking every 20 ms; TimeoutError after `within`
    seconds. For state with no event to wait on: a fake's, another process's, a file's."""
    async with asyncio.timeout(within):
        while not condition():  # noqa: ASYNC110 - what it looks at has no event to wait on
            await asyncio.sleep(0.02)


def make_settings(data_dir: Path, **overrides: Any) -> Settings:
    """Settings for a test: its own folder, loopback allowed, quick retries, no jitter."""
    values: dict[str, Any] = {
        "data_dir": data_dir,
        "allow_private_networks": True,
        "callback_retry_delays": [0.05, 0.1, 0.2],
        "callback_retry_jitter": 0.0,
        "poll_interval": 0.5,
        **overrides,
    }
    return Settings(**values)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return make_settings(tmp_path / "data")


def _bound_socket(port: int = 0) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    return sock


@asynccontextmanager
async def serve_asgi(
    app: Any, port: int = 0, *, sock: socket.socket | None = None
) -> AsyncIterator[str]:
    """Serve an ASGI app with real uvicorn on 127.0.0.1 (on `port` if given, or on the
    bound `sock`); yields its URL."""
    sock = sock or _bound_socket(port)
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            if task.done():
                task.result()
            await asyncio.sleep(0.01)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task
        sock.close()


@dataclass
class Service:
    """A running fluxserve (API and worker in one process) and a key for it."""

    url: str
    key: str
    runtime: Runtime
    client: httpx.AsyncClient

    async def submit(self, body: dict[str, Any], key: str | None = None) -> httpx.Response:
        return await self.client.post("/api/generate/submit", json=body, headers=self.auth(key))

    async def status(self, task_id: str, key: str | None = None) -> httpx.Response:
        return await self.client.get(f"/api/generate/status/{task_id}", headers=self.auth(key))

    def auth(self, key: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {key or self.key}"}

    async def new_key(self, name: str = "other", account: str | None = None) -> str:
        """A key of a new account of its own, or of the account with email `account`."""
        key, _ = await create_key(self.runtime.store, name, account)
        return key.secret

    async def wait(
        self, task_id: str, within: float = 60, key: str | None = None
    ) -> dict[str, Any]:
        """Poll until the task ends; returns its status data."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while loop.time() < deadline:
            data = (await self.status(task_id, key)).json()["data"]
            if data["status"] in ("finished", "failed"):
                return data
            await asyncio.sleep(0.05)
        raise AssertionError(f"task {task_id} did not end within {within}s")


IN_PROCESS_URL = "http://fluxserve.test"
"""The base URL of a service called in this process: nothing listens there."""


@asynccontextmanager
async def run_service(
    settings: Settings,
    *,
    engine: Engine | None = None,
    run_worker: bool = True,
    models: Sequence[str] = MODELS,
    make_app: Callable[[Runtime], Any] = create_app,
    in_process: bool = False,
) -> AsyncIterator[Service]:
    """fluxserve with one API key, on a real uvicorn server on 127.0.0.1; `make_app`
    may wrap the app, to serve it as another server would.

    With `in_process`, no server: the client calls the app in this process through
    httpx's ASGITransport, its lifespan (the runtime's start and stop) run around
    the test. For every test that needs no socket: no streams (the transport
    answers once the app has sent everything), no other program calling in, no
    fetches by the service of its own URLs.
    """
    _start_from_a_migrated_database(settings)
    sock = None if in_process else _bound_socket()
    url = IN_PROCESS_URL if sock is None else f"http://127.0.0.1:{sock.getsockname()[1]}"
    settings = settings.model_copy(update={"public_url": url})
    runtime = Runtime(settings, run_worker=run_worker, models=models, engine=engine)
    app = make_app(runtime)
    client = _in_process_client(app) if sock is None else _served_client(app, sock)
    async with client as http:
        service = Service(url, "", runtime, http)
        service.key = await service.new_key("test")
        yield service


@functools.cache
def _migrated_sqlite_database() -> Path:
    """A SQLite database with every migration applied, made once per test run (in a
    thread of its own, with its own event loop)."""
    folder = Path(tempfile.mkdtemp(prefix="fluxserve-migrated-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    path = folder / "fluxserve.db"

    run_in_a_loop_of_its_own(_migrate(f"sqlite:///{path}"))
    return path


async def _migrate(url: str) -> None:
    store = open_store(url)
    await store.start()
    await store.close()


def run_in_a_loop_of_its_own(work: Coroutine[Any, Any, T]) -> T:
    """Run `work` to its end on a new event loop in a thread of its own: from a
    session fixture, or from a test's loop without joining it."""
    with ThreadPoolExecutor(1) as thread:
        return thread.submit(asyncio.run, work).result()


def _start_from_a_migrated_database(settings: Settings) -> None:
    """Where the service would make a new SQLite database in its data folder, put a
    copy of a migrated one there: its start finds the schema current instead of
    running every migration (tests/store/test_migrations.py and
    tests/e2e/test_first_run.py start from empty databases)."""
    if settings.database_url is not None:
        return
    path = settings.data_dir / "fluxserve.db"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(_migrated_sqlite_database(), path)


class _YieldingTransport(httpx.ASGITransport):
    """ASGITransport, but each request first lets the loop's other tasks run, as a
    request sent over a socket does: a test that polls without sleeping must not
    starve the worker and the dispatcher sharing its loop."""

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(0)
        return await super().handle_async_request(request)


@asynccontextmanager
async def _in_process_client(app: Any) -> AsyncIterator[httpx.AsyncClient]:
    """A client calling `app` in this process, the app's lifespan run around it."""
    # raise_app_exceptions off: an error the app does not handle is a 500, as a server sends.
    transport = _YieldingTransport(app, raise_app_exceptions=False)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url=IN_PROCESS_URL, timeout=30) as client,
    ):
        yield client


@asynccontextmanager
async def _served_client(app: Any, sock: socket.socket) -> AsyncIterator[httpx.AsyncClient]:
    """A client of `app` served by uvicorn on `sock`."""
    async with (
        serve_asgi(app, sock=sock) as url,
        httpx.AsyncClient(base_url=url, timeout=30) as client,
    ):
        yield client


@dataclass
class Receiver:
    """A real callback receiver: records every POST, fails the first `fail` times."""

    fail: int = 0
    status_code: int = 500
    bodies: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    raw: list[bytes] = field(default_factory=list)
    attempts: int = 0
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    def app(self) -> Starlette:
        async def hook(request: Request) -> Response:
            self.attempts += 1
            if self.attempts <= self.fail:
                return Response(status_code=self.status_code)
            self.raw.append(await request.body())
            self.bodies.append(await request.json())
            self.headers.append(dict(request.headers))
            self.arrived.set()
            return JSONResponse({"ok": True})

        return Starlette(routes=[Route("/hook", hook, methods=["POST"])])

    async def wait_for(self, count: int, within: float = 30) -> None:
        async with asyncio.timeout(within):
            while len(self.bodies) < count:
                self.arrived.clear()
                await self.arrived.wait()


@pytest.fixture
def receiver_factory() -> Callable[..., Receiver]:
    return Receiver


class Paused(Hooked):
    """The tiny engine, paused after its first step's progress until `go` is set."""

    def __init__(self, inner: Engine) -> None:
        self.go = threading.Event()
        super().__init__(inner, lambda *_: self.go.wait(60), after_report=True)


@pytest.fixture(scope="session")
def tiny_engine() -> Engine:
    """One loaded tiny FLUX.2 engine for the whole session (it is stateless per call)."""
    from fluxserve.engines.tiny import TinyEngine

    engine = TinyEngine()
    engine.load()
    return engine


POSTGRES_ADMIN_URL = os.environ.get(
    "FLUXSERVE_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test"
)


@asynccontextmanager
async def fresh_postgres_database() -> AsyncIterator[str]:
    """A new, empty PostgreSQL database, dropped afterwards; yields its URL."""
    import asyncpg

    try:
        admin = await asyncpg.connect(POSTGRES_ADMIN_URL)
    except (OSError, asyncpg.PostgresError) as exc:
        pytest.skip(f"no PostgreSQL at {POSTGRES_ADMIN_URL} ({exc}); scripts/test starts one")
    name = f"fluxserve_{secrets.token_hex(6)}"
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + "/" + name
    finally:
        await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        await admin.close()


@pytest.fixture
async def postgres_url() -> AsyncIterator[str]:
    async with fresh_postgres_database() as url:
        yield url


async def _as_postgres_admin(statement: str) -> None:
    import asyncpg

    admin = await asyncpg.connect(POSTGRES_ADMIN_URL)
    try:
        await admin.execute(statement)
    finally:
        await admin.close()


@pytest.fixture(scope="session")
def migrated_postgres_url() -> Iterator[str]:
    """A PostgreSQL database with every migration applied, made once per run."""
    import asyncpg

    name = f"fluxserve_{secrets.token_hex(6)}"
    try:
        run_in_a_loop_of_its_own(_as_postgres_admin(f'CREATE DATABASE "{name}"'))
    except (OSError, asyncpg.PostgresError) as exc:
        pytest.skip(f"no PostgreSQL at {POSTGRES_ADMIN_URL} ({exc}); scripts/test starts one")
    try:
        url = POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + "/" + name
        run_in_a_loop_of_its_own(_migrate(url))
        yield url
    finally:
        run_in_a_loop_of_its_own(_as_postgres_admin(f'DROP DATABASE "{name}" WITH (FORCE)'))


@pytest.fixture
def emptied_postgres_url(migrated_postgres_url: str) -> str:
    """The run's migrated PostgreSQL database, every table emptied: for a test of what
    stands on the store, a clean database far quicker than a new one."""
    import asyncpg

    async def empty() -> None:
        conn = await asyncpg.connect(migrated_postgres_url)
        try:
            tables = await conn.fetch(
                "SELECT tablename FROM pg_tables"
                " WHERE schemaname = 'public' AND tablename <> 'alembic_version'"
            )
            names = ", ".join(f'"{row["tablename"]}"' for row in tables)
            await conn.execute(f"TRUNCATE {names} RESTART IDENTITY CASCADE")
        finally:
            await conn.close()

    run_in_a_loop_of_its_own(empty())
    return migrated_postgres_url


async def submit_ended(service: Service, url: str, model: str = "flux-2-pro") -> str:
    """Submit a task with a callback and finish it as a worker would, through the store:
    for tests of what happens after a task ends, without an engine's run."""
    body = {"model": model, "callback_url": url, "input": {"prompt": "a quiet harbour"}}
    response = await service.submit(body)
    task_id: str = response.json()["data"]["task_id"]
    store = service.runtime.store
    claim = await store.claim_task([model], "test-worker", 30)
    assert claim is not None and claim.task.task_id == task_id
    image = ResultFile(f"results/{task_id}/image.png", "image.png", "image/png", 1234)
    assert await store.finish_task(claim, Outcome("tiny", 7, 1024, 1024, [image]))
    return task_id


async def callback_log(service: Service, task_id: str, key: str | None = None) -> dict[str, Any]:
    """GET /api/generate/callbacks/{task_id}: the task's events and every attempt."""
    response = await service.client.get(
        f"/api/generate/callbacks/{task_id}", headers=service.auth(key)
    )
    assert response.status_code == 200, response.text
    data: dict[str, Any] = response.json()["data"]
    return data


async def settled_log(
    service: Service,
    task_id: str,
    key: str | None = None,
    until: Callable[[dict[str, Any]], bool] | None = None,
) -> dict[str, Any]:
    """The callback log once every event is delivered or given up (or once `until`)."""
    async with asyncio.timeout(60):
        while True:
            log = await callback_log(service, task_id, key)
            events = log["events"]
            ended = all(e["state"] in ("delivered", "failed") for e in events)
            if until(log) if until else events and ended:
                return log
            await asyncio.sleep(0.05)


@pytest.fixture(params=["sqlite", "postgresql"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    """A started store on each backend: the store contract runs on both."""
    async with AsyncExitStack() as stack:
        if request.param == "sqlite":
            url = f"sqlite:///{tmp_path / 'store.db'}"
        else:
            url = await stack.enter_async_context(fresh_postgres_database())
        backend = open_store(url)
        await backend.start()
        stack.push_async_callback(backend.close)
        yield backend


@pytest.fixture(scope="session")
def klein_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny FLUX.2 [klein] pipeline saved with `save_pretrained`, as a checkpoint is."""
    from fluxserve.engines.tiny import build_tiny_pipeline

    folder = tmp_path_factory.mktemp("klein")
    build_tiny_pipeline().save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def dev_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny FLUX.2 [dev] pipeline saved with `save_pretrained`."""
    from fluxserve.engines.tiny_dev import build_tiny_dev_pipeline

    folder = tmp_path_factory.mktemp("dev")
    build_tiny_dev_pipeline().save_pretrained(folder)
    return folder


QUEUED_INPUT = TaskInput(prompt="a red fox in snow", size="1:1", resolution="1K")


async def queue_task(
    store: Store, model: str = "flux-2-pro", callback: str | None = None, **input_changes: Any
) -> str:
    """Queue a task of `model` for key_a of account acct_a, now; its id."""
    task_input = dataclasses.replace(QUEUED_INPUT, **input_changes)
    new = NewTask(new_task_id(), "key_a", "acct_a", model, task_input, callback, time.time())
    return (await store.create_task(new)).task_id


async def queue_position(store: Store, task_id: str) -> int | None:
    """The task's `queue_position`, as its status read gives it."""
    found = await store.get_task_and_position(task_id)
    return None if found is None else found[1]


async def send_until_answered(
    url: str, head: bytes, *, chunked: bool, most: int = 12_800_000
) -> tuple[bytes, bytes, int]:
    """Send `head` to the server at `url`, then 64 KiB blocks of zeros (as HTTP chunks
    when `chunked`) until it answers or `most` bytes are sent. Returns the answer's
    head, its body, and how many bytes were sent: how far the server read before
    it answered."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    block = bytes(64 * 1024)
    writer.write(head)
    answer = asyncio.create_task(reader.readuntil(b"\r\n\r\n"))
    sent = 0
    try:
        while not answer.done() and sent < most:
            writer.write(f"{len(block):x}\r\n".encode() + block + b"\r\n" if chunked else block)
            await writer.drain()
            sent += len(block)
            await asyncio.sleep(0.01)
    except ConnectionError:
        pass  # the server stopped reading and closed the connection
    answer_head = await asyncio.wait_for(answer, 30)
    lengths = [
        int(line.split(b":", 1)[1])
        for line in answer_head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    ]
    body = await reader.readexactly(lengths[0]) if lengths else b""
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()
    return answer_head, body, sent


def metric_samples(exposition: str) -> dict[str, float]:
    """Each sample of a Prometheus text exposition by its name and labels, written
    as in the text (`name{a="x",b="y"}`, labels sorted), parsed by prometheus-client."""
    samples = {}
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            labels = ",".join(f'{key}="{value}"' for key, value in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


async def ended(store: Store, task_id: str) -> Task:
    """The task once it has ended, read from the store as its owner's status would."""
    async with asyncio.timeout(120):
        while True:
            task = await store.get_task(task_id)
            if task is not None and task.status.terminal:
                return task
            await asyncio.sleep(0.05)


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA folder of the tiny pipeline's LoRAs: see tiny_loras.lora_folder."""
    from tiny_loras import lora_folder

    return lora_folder(tmp_path_factory.mktemp("loras"))


@pytest.fixture(scope="module")
def lora_engine() -> Any:
    """A tiny engine of its own (LoRAs leave it warm adapters), one step per image."""
    from fluxserve.engines.tiny import TinyEngine

    engine = TinyEngine(steps=1)
    engine.load()
    return engine
