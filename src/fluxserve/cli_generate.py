"""`fluxserve generate`: one image from the shell, from a running server or in this process.

Both ways run the same `AsyncClient` code. With `--server` or `--key` (or their
environment variables) it talks to that server, with the data directory's own key
(see `local_key`) when no key is given. With neither, it starts the service inside
the command, on the same settings and data directory as `fluxserve serve`, and
sends its requests to the app in memory (httpx's `ASGITransport`): nothing has to
be running. That run authenticates with the data directory's key too, made on
first use if `serve` has not made it, so its tasks are in the same account's history.
"""

from __future__ import annotations

import asyncio
import logging
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
from fluxserve.client.flows import LoraOption, TaskOptions
from fluxserve.local_key import local_key, saved_key
from fluxserve.protocol import EDIT_MODELS, OUTPUT_FORMATS
from fluxserve.settings import Settings

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
    lora: Annotated[
        list[str] | None,
        typer.Option(
            "--lora",
            help="A LoRA as NAME[:SCALE] (see GET /api/loras), or an https:// URL of a "
            ".safetensors file; repeat for more.",
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
        str | None,
        typer.Option(
            envvar="FLUXSERVE_API_KEY",
            help="Its API key; default: the one serve made at its first start on --data-dir.",
        ),
    ] = None,
    timeout: Annotated[float | None, typer.Option(help="Seconds to wait for the image.")] = None,
    data_dir: Annotated[
        Path | None,
        typer.Option("--data-dir", help="SQLite file and results; where the key is kept."),
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
    if lora:
        options["loras"] = [_lora(value) for value in lora]
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
            from fluxserve.cli import _settings as settings_of

            key = key or saved_key(settings_of(data_dir=data_dir).data_dir)
            made = asyncio.run(_remote(server, key, run))
        else:
            made = asyncio.run(_in_process(_settings(data_dir), run))
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


def _lora(value: str) -> LoraOption:
    """`--lora NAME[:SCALE]` as an `input.loras` entry; an https:// URL is sent as `url`."""
    source, colon, scale = value.rpartition(":")
    if not colon or "/" in scale:  # no scale: the colon is a URL's own
        source, scale = value, ""
    entry: LoraOption = {"url": source} if source.startswith("https://") else {"name": source}
    if scale:
        try:
            entry["scale"] = float(scale)
        except ValueError:
            message = f"fluxserve: --lora {value}: the scale must be a number"
            typer.secho(message, fg="red", err=True)
            raise typer.Exit(2) from None
    return entry


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


async def _in_process(settings: Settings, run: Run) -> GeneratedImage:
    """The service in this process, the client talking to it in memory."""
    from fluxserve.api.app import create_app
    from fluxserve.runtime import Runtime

    runtime = Runtime(settings, run_worker=True)
    app = create_app(runtime)
    async with app.router.lifespan_context(app):
        key = await local_key(runtime.store, settings.data_dir, "fluxserve generate")
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
