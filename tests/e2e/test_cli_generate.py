"""`fluxserve generate` as a user runs it: a subprocess, against a live server and in process."""

from __future__ import annotations

import asyncio
import io
import os
import stat
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from PIL import Image

from fluxserve.engines.base import Engine
from fluxserve.local_key import local_key, saved_key
from fluxserve.store import open_store

from conftest import Service, make_settings, run_service

PROMPT = "a lighthouse at dawn"
pytestmark = pytest.mark.slow


async def fluxserve(*args: str, cwd: Path, **env: str) -> tuple[int, str, str]:
    """Run the `fluxserve` command; its exit code, stdout and stderr."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("FLUXSERVE_")}
    src = str(Path(__file__).parents[2] / "src")
    clean["PYTHONPATH"] = os.pathsep.join(filter(None, [src, clean.get("PYTHONPATH")]))
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "fluxserve",
        *args,
        cwd=cwd,
        env={**clean, **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


def printed(stdout: str) -> dict[str, str]:
    return dict(line.split(": ", 1) for line in stdout.splitlines() if ": " in line)


@pytest.fixture
async def service(tmp_path: Path, tiny_engine: Engine) -> AsyncIterator[Service]:
    async with run_service(make_settings(tmp_path / "data"), engine=tiny_engine) as svc:
        yield svc


async def test_generate_against_a_running_server(service: Service, tmp_path: Path) -> None:
    reference = tmp_path / "ref.png"
    Image.new("RGB", (120, 80), (0, 90, 160)).save(reference)
    code, out, err = await fluxserve(
        "generate",
        PROMPT,
        "--server",
        service.url,
        "--size",
        "1:1",
        "--seed",
        "7",
        "--image",
        str(reference),
        "-o",
        "out.webp",
        cwd=tmp_path,
        FLUXSERVE_API_KEY=service.key,
    )
    assert code == 0, err
    shown = printed(out)
    assert shown["file"] == "out.webp" and shown["seed"] == "7" and shown["time"].endswith("s")
    with Image.open(tmp_path / "out.webp") as image:
        assert (image.format, image.size) == ("WEBP", (1024, 1024))
    task = (await service.status(shown["task"])).json()["data"]
    assert task["status"] == "finished" and task["model"] == "flux-2-pro-edit"
    stored = await service.runtime.store.get_task(shown["task"])
    assert stored is not None
    [url] = stored.input.image_urls
    assert url.startswith(f"{service.url}/files/uploads/"), "the local file was uploaded first"


@pytest.mark.timeout(600)
async def test_generate_with_a_lora(tmp_path: Path, lora_dir: Path, lora_engine: Engine) -> None:
    settings = make_settings(tmp_path / "data", lora_dir=lora_dir)
    async with run_service(settings, engine=lora_engine) as svc:
        code, out, err = await fluxserve(
            "generate",
            PROMPT,
            "--server",
            svc.url,
            "--size",
            "1:1",
            "--lora",
            "ink:0.5",
            "--lora",
            "plain",
            cwd=tmp_path,
            FLUXSERVE_API_KEY=svc.key,
        )
        assert code == 0, err
        task = (await svc.status(printed(out)["task"])).json()["data"]
    assert task["status"] == "finished"
    assert task["loras"] == [{"name": "ink", "scale": 0.5}, {"name": "plain", "scale": 1.0}]


async def test_failures_exit_non_zero_with_the_servers_message(
    service: Service, tmp_path: Path
) -> None:
    base = ("generate", PROMPT, "--server", service.url)
    code, _, err = await fluxserve(
        *base, "--size", "5:4", cwd=tmp_path, FLUXSERVE_API_KEY=service.key
    )
    assert code == 1 and "input.size must be one of" in err
    code, _, err = await fluxserve(*base, "--key", "fs-wrong", cwd=tmp_path)
    assert code == 1 and "Invalid API key" in err
    missing = "http://127.0.0.1:9/missing.png"
    code, out, err = await fluxserve(
        *base, "--image", missing, cwd=tmp_path, FLUXSERVE_API_KEY=service.key
    )
    assert code == 1 and "failed: " in err and "missing.png" in err and out == ""
    code, _, err = await fluxserve(*base, "--image", "nowhere.png", cwd=tmp_path)
    assert code == 2 and "nowhere.png: no such file" in err
    assert not [p for p in os.listdir(tmp_path) if p.startswith("task-")], "no file written"


async def test_generate_in_process_with_nothing_running(tmp_path: Path) -> None:
    data = tmp_path / "data"
    code, out, err = await fluxserve(
        "generate",
        PROMPT,
        "--data-dir",
        str(data),
        "--size",
        "1:1",
        cwd=tmp_path,
        FLUXSERVE_ENGINE="tiny",
        FLUXSERVE_TINY_STEPS="1",
    )
    assert code == 0, err
    assert "random weights" in err, "the tiny engine says so"
    shown = printed(out)
    assert shown["file"] == f"{shown['task']}.png"
    assert Image.open(io.BytesIO((tmp_path / shown["file"]).read_bytes())).size == (1024, 1024)
    key_file = data / "local.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600


async def test_the_in_process_key_is_kept_until_revoked(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'fluxserve.db'}")
    await store.start()
    try:
        first = await local_key(store, tmp_path, "fluxserve generate")
        assert saved_key(tmp_path) == first
        assert await local_key(store, tmp_path, "fluxserve generate") == first
        [record] = await store.list_keys()
        assert record.name == "fluxserve generate"
        await store.revoke_key(record.key_id)
        second = await local_key(store, tmp_path, "fluxserve generate")
        assert second != first and saved_key(tmp_path) == second
    finally:
        await store.close()
