"""`fluxserve generate`: one image from the shell, from a running server or in this process.

Both ways run the same `AsyncClient` code. With `--server` or `--key` (or their
environment variables) it talks to that server. With neither, it starts the
service inside the command, on the same settings and data directory as
`fluxserve serve`, and sends its requests to the app in memory (httpx's
`ASGITransport`): nothing has to be running. That run authenticates with a key
of its own, made on first use and kept in `<data_dir>/generate.key` (readable by
its owner alone): the data directory's database grants as much already, and the
key appears in `fluxserve keys list` like any other, so it can be revoked.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated

import httpx
import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

from fluxserve.client import (
    AsyncClient,
    FluxserveError,
    GeneratedImage,
    TaskData,
    TaskFailedError,
)
from fluxserve.client.flows import TaskOptions
from fluxserve.protocol import EDIT_MODELS, OUTPUT_FORMATS
from fluxserve.settings import Settings
from fluxserve.store import Store

KEY_FILE = "generate.key"
IN_PROCESS_URL = "http://fluxserve.local"
# In process, status reads cost no network: read often, for a smooth bar.
IN_PROCESS_POLL = 0.2
SUFFIXES = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp"}

Run = Callable[[AsyncClient], Awaitable[GeneratedImage]]


def generate(
    prompt: Annotated[str, typer.Argument(help="What the image shows.")],
    model: Annotated[
        str | None,
        typer.Option(help="flux-2-pro (default), flux-2-flex, or their -edit forms."),
    ] = None,
    size: Annotated[str | None, typer.Option(help="1:1, 4:3, 16:9, ... or auto.")] = None,
    resolution: Annotated[str | None, typer.Option(help="1K or 2K.")] = None,
    seed: Annotated[int | None, typer.Option(help="The same seed gives the same image.")] = None,
    image: Annotated[
        list[str] | None,
        typer.Option(
            "--image",
            help="A reference image: a file (uploaded first) or a URL; repeat for more. "
            "With references, a model is run as its -edit form.",
        ),
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option("-o", "--output", help="Where to write the image; default <task id>.<ext>."),
    ] = None,
    output_format: Annotated[
        str | None,
        typer.Option("--format", help="png, jpeg or webp; default: from -o's suffix, else png."),
    ] = None,
    server: Annotated[
        str | None,
        typer.Option(
            envvar="FLUXSERVE_URL",
            help="A running server's URL. Without it and --key: run in this process.",
        ),
    ] = None,
    key: Annotated[
        str | None, typer.Option(envvar="FLUXSERVE_API_KEY", help="Its API key.")
    ] = None,
    timeout: Annotated[float | None, typer.Option(help="Seconds to wait for the image.")] = None,
    data_dir: Annotated[
        Path | None, typer.Option("--data-dir", help="In process: SQLite file and results.")
    ] = None,
) -> None:
    """Make one image: submit, follow its progress, download it."""
    started = time.monotonic()
    references = image or []
    options: TaskOptions = {}
    if size:
        options["size"] = size
    if resolution:
        options["resolution"] = resolution
    if seed is not None:
        options["seed"] = seed
    chosen_format = output_format or (SUFFIXES.get(output.suffix.lower()) if output else None)
    if chosen_format:
        options["output_format"] = chosen_format
    chosen_model = _model(model or "flux-2-pro", bool(references))
    console = Console(stderr=True)
    for ref in references:
        if not _is_url(ref) and not Path(ref).is_file():
            typer.secho(f"fluxserve: --image {ref}: no such file", fg="red", err=True)
            raise typer.Exit(2)

    async def run(client: AsyncClient) -> GeneratedImage:
        urls = [await _reference(client, ref) for ref in references]
        if urls:
            options["image_urls"] = urls
        with _bar(console) as bar:
            job = bar.add_task("submitting", total=100)

            def show(task: TaskData) -> None:
                waiting = f" (queue position {task.queue_position})" if task.queue_position else ""
                bar.update(job, completed=task.progress, description=task.status.value + waiting)

            return await client.generate(
                prompt, model=chosen_model, timeout=timeout, on_progress=show, **options
            )

    try:
        if server or key:
            made = asyncio.run(_remote(server, key, run))
        else:
            settings = _settings(data_dir)
            key_file = settings.data_dir / KEY_FILE
            saved = key_file.read_text().strip() if key_file.is_file() else None
            made = asyncio.run(_in_process(settings, saved, run))
    except FluxserveError as exc:
        task = f"task {exc.task.task_id} failed: " if isinstance(exc, TaskFailedError) else ""
        typer.secho(f"fluxserve: {task}{exc}", fg="red", err=True)
        raise typer.Exit(1) from exc
    path = made.save(output or Path(f"{made.task_id}.{_extension(made.content_type)}"))
    typer.echo(f"task: {made.task_id}")
    typer.echo(f"file: {path}")
    typer.echo(f"seed: {made.seed if made.seed is not None else 'unknown'}")
    typer.echo(f"time: {time.monotonic() - started:.1f}s")


def _model(model: str, has_references: bool) -> str:
    edit = f"{model}-edit"
    return edit if has_references and edit in EDIT_MODELS else model


def _extension(content_type: str | None) -> str:
    name = next((n for n, kind in OUTPUT_FORMATS.items() if kind == content_type), "png")
    return "jpg" if name == "jpeg" else name


def _bar(console: Console) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
        console=console,
    )


async def _reference(client: AsyncClient, ref: str) -> str:
    """A URL for `ref`: a URL as it is, a file uploaded first."""
    return ref if _is_url(ref) else (await client.upload(Path(ref))).file_url


def _is_url(ref: str) -> bool:
    return ref.startswith(("http://", "https://", "data:"))


async def _remote(server: str | None, key: str | None, run: Run) -> GeneratedImage:
    async with AsyncClient(server, key) as client:
        return await run(client)


def _settings(data_dir: Path | None) -> Settings:
    from fluxserve.cli import _configure_logging, _settings

    settings = _settings(data_dir=data_dir)
    _configure_logging(settings, runs_engine=True)  # the warning when the engine is tiny
    # Only warnings from here on: the service's info lines would break up the bar.
    logging.getLogger().setLevel(logging.WARNING)
    return settings


async def _in_process(settings: Settings, saved_key: str | None, run: Run) -> GeneratedImage:
    """The service in this process, the client talking to it in memory."""
    from fluxserve.api.app import create_app
    from fluxserve.runtime import Runtime

    runtime = Runtime(settings, run_worker=True)
    app = create_app(runtime)
    async with app.router.lifespan_context(app):
        key = await _local_key(runtime.store, saved_key, settings.data_dir / KEY_FILE)
        client = AsyncClient(
            IN_PROCESS_URL,
            key,
            transport=httpx.ASGITransport(app=app),
            # ASGITransport hands over a response once it is complete: a stream would
            # arrive in one piece at the end, so the bar follows status reads instead.
            use_stream=False,
            poll_interval=IN_PROCESS_POLL,
        )
        try:
            return await run(client)
        finally:
            await client.aclose()


async def _local_key(store: Store, saved: str | None, path: Path) -> str:
    """The in-process run's key: the one saved in `path` while the store still honours
    it, else a new one, saved there."""
    from fluxserve.accounts import create_key
    from fluxserve.keys import hash_key

    if saved:
        record = await store.key_for_hash(hash_key(saved))
        if record is not None and record.revoked_at is None:
            return saved
    made, _ = await create_key(store, "fluxserve generate")
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write(made.secret + "\n")
    return made.secret
