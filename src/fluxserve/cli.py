"""The `fluxserve` command: serve, and manage accounts, API keys and credits."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from pydantic import ValidationError

from fluxserve import accounts, logs
from fluxserve.errors import ApiError, NotFound, StoreOpenFailed
from fluxserve.settings import Settings
from fluxserve.store import Store, store_for
from fluxserve.store.base import Account, LedgerEntry
from fluxserve.tasks import MODELS

app = typer.Typer(help="fluxserve: self-hosted FLUX.2 behind the unified task API.")
keys_app = typer.Typer(help="Create, list and revoke API keys.")
app.add_typer(keys_app, name="keys")
accounts_app = typer.Typer(help="Create accounts: keys, tasks and credits belong to one.")
app.add_typer(accounts_app, name="accounts")
credits_app = typer.Typer(help="Add credits to an account and show its ledger.")
app.add_typer(credits_app, name="credits")

if TYPE_CHECKING:
    import uvicorn

    from fluxserve.cli_welcome import Welcome
    from fluxserve.runtime import Runtime

T = TypeVar("T")

STARTUP_FAILURE = 3
"""The exit code of a server whose app did not start (as `uvicorn.run` exits)."""

TINY_WARNING = (
    "WARNING: engine 'tiny' serves a FLUX.2 pipeline with random weights: "
    "every image it makes is noise. Set FLUXSERVE_ENGINE for real images."
)


def _settings(**overrides: Any) -> Settings:
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        for error in exc.errors():
            name = ".".join(str(part) for part in error["loc"])
            typer.secho(f"fluxserve: setting {name}: {error['msg']}", fg="red", err=True)
        raise typer.Exit(2) from exc


async def on_store(settings: Settings, action: Callable[[Store], Awaitable[T]]) -> T:
    """Start the store (StoreOpenFailed if its database cannot be opened), run `action`
    on it, and close it."""
    store = store_for(settings)
    await store.start()
    try:
        return await action(store)
    finally:
        await store.close()


def _with_store(settings: Settings, action: Callable[[Store], Awaitable[T]]) -> T:
    """Run `action` on the store; an ApiError (no such account...), or a database that
    cannot be opened, exits 1 with its message."""
    try:
        return asyncio.run(on_store(settings, action))
    except (ApiError, StoreOpenFailed) as exc:
        typer.secho(f"fluxserve: {exc}", fg="red", err=True)
        raise typer.Exit(1) from exc


DataDir = Annotated[Path | None, typer.Option("--data-dir", help="SQLite file and results.")]


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Address to listen on.")] = None,
    port: Annotated[int | None, typer.Option(help="Port to listen on.")] = None,
    data_dir: DataDir = None,
    engine: Annotated[str | None, typer.Option(help="auto, diffusers, tiny or bfl.")] = None,
    new_key: Annotated[
        bool,
        typer.Option(
            "--new-key",
            help="Make a key for the first account and print the page's URL with it, "
            "as the first start does.",
        ),
    ] = False,
) -> None:
    """Run the API and a worker in one process (the embedded default). The first start
    on an empty database prints a key, inside the page's URL."""
    from fluxserve.cli_welcome import Welcome

    settings = _settings(host=host, port=port, data_dir=data_dir, engine=engine)
    _serve_http(settings, run_worker=True, welcome=Welcome(settings, new_key=new_key))


@app.command()
def api(
    host: Annotated[str | None, typer.Option(help="Address to listen on.")] = None,
    port: Annotated[int | None, typer.Option(help="Port to listen on.")] = None,
    data_dir: DataDir = None,
) -> None:
    """Run the HTTP API alone: no worker, no model code (for many machines)."""
    settings = _settings(host=host, port=port, data_dir=data_dir)
    _serve_http(settings, run_worker=False)


@app.command()
def worker(
    models: Annotated[
        str, typer.Option(help="Comma-separated public model names this worker serves.")
    ] = ",".join(MODELS),
    data_dir: DataDir = None,
    engine: Annotated[str | None, typer.Option(help="auto, diffusers, tiny or bfl.")] = None,
) -> None:
    """Run one worker (one per GPU): claim tasks for MODELS until SIGTERM."""
    served = [name.strip() for name in models.split(",") if name.strip()]
    unknown = sorted(set(served) - set(MODELS))
    if unknown or not served:
        typer.secho(
            f"fluxserve: --models: unknown {', '.join(unknown) or '(none given)'}; "
            f"choose from {', '.join(MODELS)}",
            fg="red",
            err=True,
        )
        raise typer.Exit(2)
    settings = _settings(data_dir=data_dir, engine=engine)
    _configure_logging(settings, runs_engine=True)
    _database_opens(settings)
    raise typer.Exit(asyncio.run(_run_worker(settings, served)))


def _database_opens(settings: Settings) -> None:
    """Open the database and close it, before a server or worker starts (and opens it
    again): one that cannot be opened exits 1 here, said in one line, not in a traceback
    of the failed start (uvicorn's, for the app)."""
    _with_store(settings, lambda store: store.schema_revision())


async def _run_worker(settings: Settings, models: list[str]) -> int:
    from fluxserve.runtime import Runtime

    runtime = Runtime(settings, run_worker=True, models=models)
    stop_metrics = None
    if settings.metrics_port is not None:  # first: a port in use stops the worker here
        stop_metrics = runtime.metrics.serve(settings.host, settings.metrics_port)
    await runtime.start()
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    try:
        return await runtime.wait_until(stopping)
    finally:
        # The running task, if any, stops at its next step and goes back to the queue.
        await runtime.stop()
        if stop_metrics is not None:
            stop_metrics()


def _configure_logging(settings: Settings, *, runs_engine: bool) -> None:
    logs.configure(settings.log_format)
    warning = None
    if runs_engine and settings.engine == "tiny":
        warning = TINY_WARNING
    elif runs_engine:
        from fluxserve.checkpoints import fallback_warning, plan_engines

        warning = fallback_warning(plan_engines(settings, MODELS))
    if warning and settings.log_format == "json":
        logging.getLogger("fluxserve").warning(warning)
    elif warning:
        typer.secho(warning, fg=typer.colors.YELLOW, err=True)


def _serve_http(settings: Settings, *, run_worker: bool, welcome: Welcome | None = None) -> None:
    import uvicorn
    from uvicorn.config import LOGGING_CONFIG

    from fluxserve.api.app import create_app
    from fluxserve.runtime import Runtime

    _configure_logging(settings, runs_engine=run_worker)
    _database_opens(settings)
    runtime = Runtime(settings, run_worker=run_worker)
    config = uvicorn.Config(
        create_app(runtime),
        host=settings.host,
        port=settings.port,
        log_level="info",
        access_log=settings.access_log,
        # JSON: uvicorn's loggers keep no handlers of their own, and their lines
        # reach the root logger's JSON handler.
        log_config=LOGGING_CONFIG if settings.log_format == "text" else None,
    )
    server = uvicorn.Server(config) if welcome is None else welcome.server(config, runtime)
    with asyncio.Runner(loop_factory=config.get_loop_factory()) as runner:
        code = runner.run(_serve_until_failure(server, runtime))
    raise typer.Exit(code)


async def _serve_until_failure(server: uvicorn.Server, runtime: Runtime) -> int:
    """Serve until stopped (exit code 0), or until one of the runtime's background loops
    ends on its own (1; see `Runtime.failure`), or the app cannot start (uvicorn's 3)."""
    serving = asyncio.create_task(server.serve())
    failing = asyncio.create_task(runtime.wait_for_failure())
    await asyncio.wait([serving, failing], return_when=asyncio.FIRST_COMPLETED)
    if failing.done():
        server.should_exit = True
    failing.cancel()
    await serving
    if runtime.failure is not None:
        return 1
    return 0 if server.started else STARTUP_FAILURE


@keys_app.command("create")
def keys_create(
    name: Annotated[str, typer.Option(help="A label for the key, e.g. its owner.")],
    account: Annotated[
        str | None,
        typer.Option(help="The account's email; without it, the key gets an account of its own."),
    ] = None,
    data_dir: DataDir = None,
) -> None:
    """Create a key; it is printed once, on the last line, and stored only hashed."""
    settings = _settings(data_dir=data_dir)
    key, owner = _with_store(settings, lambda s: accounts.create_key(s, name, account))
    typer.echo(
        f"created key {key.key_id} ({name}) for {owner.email}; keep it, it is not shown again:"
    )
    typer.echo(key.secret)


@keys_app.command("list")
def keys_list(data_dir: DataDir = None) -> None:
    """List keys: id, name, prefix, created, revoked."""
    records = _with_store(_settings(data_dir=data_dir), lambda s: s.list_keys())
    for record in records:
        revoked = _when(record.revoked_at) if record.revoked_at else "active"
        typer.echo(
            f"{record.key_id}\t{record.name}\t{record.prefix}...\t"
            f"{_when(record.created_at)}\t{revoked}"
        )


@keys_app.command("revoke")
def keys_revoke(key_id: str, data_dir: DataDir = None) -> None:
    """Revoke a key by its id; requests with it get 401 from then on. A key revoked
    already stays as it is, and is told with the time it was revoked."""

    async def revoke(store: Store) -> float:
        key = await store.revoke_key(key_id)
        if key is None or key.revoked_at is None:
            raise NotFound(f"No key {key_id}; `fluxserve keys list` shows their ids")
        return key.revoked_at

    revoked_at = _with_store(_settings(data_dir=data_dir), revoke)
    typer.echo(f"{key_id} is revoked, since {_when(revoked_at)}")


@accounts_app.command("create")
def accounts_create(
    email: Annotated[str, typer.Option(help="The account's email, its name everywhere.")],
    data_dir: DataDir = None,
) -> None:
    """Create an account with no credits; then `keys create --account EMAIL`."""
    made = _with_store(_settings(data_dir=data_dir), lambda s: accounts.create_account(s, email))
    typer.echo(f"created account {made.account_id} ({made.email})")


@credits_app.command("add")
def credits_add(
    email: str,
    amount: Annotated[int, typer.Argument(help="Credits to add; negative to take away.")],
    note: Annotated[str | None, typer.Option(help="Kept in the ledger beside the grant.")] = None,
    data_dir: DataDir = None,
) -> None:
    """Add credits to the account of EMAIL."""

    async def grant(store: Store) -> Account:
        return await store.grant_credits((await _account(store, email)).account_id, amount, note)

    after = _with_store(_settings(data_dir=data_dir), grant)
    typer.echo(f"{after.email}: balance {after.balance}, available {after.available}")


@credits_app.command("show")
def credits_show(
    email: str,
    limit: Annotated[int, typer.Option(help="Ledger rows to show, newest first.")] = 20,
    data_dir: DataDir = None,
) -> None:
    """The account's balance, what its tasks hold, and its newest ledger rows."""

    async def show(store: Store) -> tuple[Account, list[LedgerEntry]]:
        account = await _account(store, email)
        return account, await store.ledger(account.account_id, limit)

    account, entries = _with_store(_settings(data_dir=data_dir), show)
    typer.echo(
        f"{account.email}: balance {account.balance}, held {account.held}, "
        f"available {account.available}"
    )
    for entry in entries:
        typer.echo(
            f"{_when(entry.created_at)}\t{entry.kind}\t{entry.amount:+d}\t"
            f"{entry.task_id or ''}\t{entry.note or ''}"
        )


async def _account(store: Store, email: str) -> Account:
    found = await store.account_by_email(email)
    if found is None:
        raise NotFound(f"No account {email}; create it with: fluxserve accounts create")
    return found


def _when(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d %H:%M:%S")


# Registered last: cli_models reads settings through _settings above.
from fluxserve.cli_generate import generate  # noqa: E402
from fluxserve.cli_models import doctor, models_app  # noqa: E402

app.add_typer(models_app, name="models")
app.command()(doctor)
app.command()(generate)
