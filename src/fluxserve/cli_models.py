"""`fluxserve models pull` and `fluxserve doctor`: checkpoints and what will serve."""

from __future__ import annotations

import asyncio
import importlib.metadata
import os
from typing import Annotated

import httpx
import sqlalchemy as sa
import typer

from fluxserve.checkpoints import is_local_folder, local_checkpoint, plan_engines, pull_hint
from fluxserve.errors import StoreOpenFailed
from fluxserve.settings import Settings
from fluxserve.tasks import MODELS

models_app = typer.Typer(help="Download and inspect FLUX.2 checkpoints.")

# Before the download: an unreachable hub answers within this, not after retries.
PROBE_TIMEOUT = 5.0


def _load_settings() -> Settings:
    from fluxserve.cli import _settings

    return _settings()


def _fail(message: str) -> typer.Exit:
    typer.secho(f"fluxserve: {message}", fg="red", err=True)
    return typer.Exit(1)


@models_app.command("pull")
def pull(
    model: Annotated[str, typer.Argument(help="A public model name, or a Hugging Face repo id.")],
) -> None:
    """Download MODEL's checkpoint into the Hugging Face cache, with a progress bar."""
    settings = _load_settings()
    if model in settings.models:
        route = settings.models[model]
        repo_id, revision = route.checkpoint, route.revision
    elif "/" in model and not is_local_folder(model):
        repo_id, revision = model, None
    else:
        raise _fail(f"unknown model {model!r}; choose from {', '.join(MODELS)} or a repo id")
    if is_local_folder(repo_id):
        raise _fail(f"{model} is routed to the local folder {repo_id}: nothing to download")
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        raise _fail(f"HF_HUB_OFFLINE is set: downloads are off; unset it to pull {repo_id}")
    try:
        from huggingface_hub import HfApi, snapshot_download
    except ImportError as exc:
        raise _fail("pulling needs huggingface_hub: pip install 'fluxserve[local]'") from exc
    try:
        HfApi().model_info(repo_id, revision=revision, timeout=PROBE_TIMEOUT)
        path = snapshot_download(repo_id, revision=revision)  # tqdm bars on stderr
    except Exception as exc:  # the hub's errors are many; each is reported as it is
        raise _fail(
            f"could not download {repo_id}: {type(exc).__name__}: {exc}. Check the network; "
            "gated checkpoints (FLUX.2 [dev]) need their license accepted on huggingface.co "
            "and `hf auth login` (or HF_TOKEN)"
        ) from exc
    typer.echo(f"{repo_id} is at {path}")


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _gpu() -> str:
    try:
        import torch
    except ImportError:
        return "unknown (torch is not installed: pip install 'fluxserve[local]')"
    if not torch.cuda.is_available():
        return "no GPU (CUDA not available): FLUX.2 runs on the CPU, slowly"
    cards = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        cards.append(f"cuda:{index} {props.name}, {props.total_memory / 2**30:.1f} GiB")
    return "; ".join(cards)


def doctor() -> None:
    """Print the GPU, package versions, present checkpoints, each model's engine and
    whether the database opens."""
    settings = _load_settings()
    typer.echo(f"GPU: {_gpu()}")
    packages = ("torch", "diffusers", "transformers", "huggingface_hub", "bitsandbytes")
    typer.echo("packages: " + ", ".join(f"{name} {_version(name)}" for name in packages))
    typer.echo(f"engine setting: {settings.engine}")
    plans = plan_engines(settings, MODELS)
    typer.echo("checkpoints:")
    seen: set[str] = set()
    for plan in plans:
        model, route = plan.model, plan.route
        if plan.engine != "diffusers" or route.checkpoint in seen:
            continue
        seen.add(route.checkpoint)
        folder = local_checkpoint(route)
        where = f"present at {folder}" if folder else f"absent ({pull_hint(model)})"
        typer.echo(f"  {route.checkpoint}: {where}")
    typer.echo("models:")
    for plan in plans:
        route = plan.route
        if plan.engine == "diffusers":
            detail = f" ({route.pipeline}, {route.steps} steps, memory_mode {route.memory_mode})"
        else:
            detail = " (random weights: noise)" if plan.engine == "tiny" else ""
        typer.echo(f"  {plan.model}: {plan.engine}{detail} - {plan.reason}")
    typer.echo(f"database: {database_check(settings)}")
    upstream = [plan.model for plan in plans if plan.engine == "bfl"]
    if upstream:
        typer.echo(f"upstream at Black Forest Labs' API: {', '.join(upstream)}")
        typer.echo(f"  key: {asyncio.run(upstream_key_check(settings))}")


def database_check(settings: Settings) -> str:
    """Whether the database opens, as every command opens it (bringing its schema to
    this version's), and the migration it is at; or, in one line, what is wrong."""
    from fluxserve.cli import on_store

    try:
        revision = asyncio.run(on_store(settings, lambda store: store.schema_revision()))
    except StoreOpenFailed as exc:
        return str(exc)
    where = sa.engine.make_url(settings.resolved_database_url)
    return f"{where.render_as_string(hide_password=True)} opens, at migration {revision}"


async def upstream_key_check(settings: Settings) -> str:
    """Whether the BFL key works, from one cheap authenticated call; offline says so."""
    from fluxserve.engines.bfl import (
        BflEngine,
        UpstreamBusy,
        UpstreamFailed,
        UpstreamUnavailable,
    )

    engine = BflEngine(settings)
    if not engine.key:
        return "not set: set FLUXSERVE_BFL_API_KEY, or no task of these models can run"
    async with engine.client() as client:
        client.timeout = httpx.Timeout(PROBE_TIMEOUT)
        try:
            credits = await engine.credits(client)
        except UpstreamFailed as exc:
            return f"does not work: {exc}"
        except (UpstreamUnavailable, UpstreamBusy) as exc:
            return f"not checked: {engine.base_url} did not answer ({exc}); offline?"
    return f"works ({credits:g} credits left at {engine.base_url})"
