"""The examples of the client in docs/clients.md, run as they are written there."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from fluxserve.engines.base import Engine

from conftest import make_settings, run_service

CLIENTS = Path(__file__).parents[2] / "docs" / "clients.md"


def docs_block(heading: str) -> str:
    """The first python block under `heading` in docs/clients.md."""
    text = CLIENTS.read_text()
    section = text[text.index(heading) :]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, f"no python block under {heading}"
    return match.group(1)


async def test_the_asgi_transport_example_runs_as_written(tmp_path: Path) -> None:
    namespace: dict[str, Any] = {}
    exec(compile(docs_block("### Testing your own code"), str(CLIENTS), "exec"), namespace)
    await namespace["test_my_code_makes_an_image"](tmp_path)


async def test_the_first_example_runs_against_a_live_server(
    tmp_path: Path, tiny_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    code = docs_block("## Python client")
    monkeypatch.chdir(tmp_path)
    async with run_service(make_settings(tmp_path / "data"), engine=tiny_engine) as service:
        namespace: dict[str, Any] = {"KEY": service.key}
        example = code.replace("http://127.0.0.1:8000", service.url)
        try:
            await asyncio.to_thread(exec, compile(example, str(CLIENTS), "exec"), namespace)
        finally:
            namespace["c"].close()  # a script's client is closed at its exit
    assert namespace["done"].status == "finished"
    with Image.open(tmp_path / "fox.png") as fox:
        assert fox.size == (1024, 1024) and namespace["image"].seed == 7
