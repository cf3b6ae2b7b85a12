"""The first start: `fluxserve serve` on a fresh data directory prints a key inside the
page's URL, once; the page opened there makes an image with nothing else to do; and
`fluxserve generate --server` finds the key by itself."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import socket
import stat
import subprocess
import sys
import time
from contextlib import AsyncExitStack
from pathlib import Path

import httpx
import pytest
from PIL import Image
from playwright.async_api import Browser, expect

from fluxserve.cli_welcome import page_url
from fluxserve.local_key import first_start_key, local_key, new_local_key, saved_key
from fluxserve.store import Store, open_store

from conftest import fresh_postgres_database
from test_page import browser, image_size, open_page  # noqa: F401 (browser: a fixture)
from test_processes import env, fluxserve, server  # noqa: F401 (env: a fixture)

README = Path(__file__).parents[2] / "README.md"
KEY_IN_URL = re.compile(r"(http://127\.0\.0\.1:\d+/)#key=(fsk_[\w-]+)")
PAGE_WITHOUT_KEY = re.compile(r"the page is at (http://127\.0\.0\.1:\d+/)\n")


def welcome(log: Path, start: int) -> str:
    """What the serve process that started at byte `start` of its log printed once it
    listened (it prints after it starts answering, so wait for it)."""
    deadline = time.monotonic() + 60
    while True:
        text = log.read_text()[start:]
        if KEY_IN_URL.search(text) or PAGE_WITHOUT_KEY.search(text):
            return text
        assert time.monotonic() < deadline, text
        time.sleep(0.05)


def every_api_operation(base: str) -> list[tuple[str, str]]:
    """(method, path) of each /api route in the server's own OpenAPI document, its path
    parameters filled with made-up ids."""
    document = httpx.get(base + "/openapi.json").json()
    return [
        (method.upper(), re.sub(r"\{[^}]+\}", "task-unified-1-nosuchtask", path))
        for path, operations in document["paths"].items()
        if path.startswith("/api/")
        for method in operations
    ]


def run_the_quick_start(
    base: str, served: dict[str, str], tmp_path: Path, mp: pytest.MonkeyPatch
) -> None:
    """The README's quick start after the first start, as written (on this server's
    port), from the folder that holds the default data directory, `data`."""
    text = README.read_text()
    start = text.index("## Quick start\n")
    section = text[start : text.index("\n## ", start)]
    [generate, curl] = re.findall(r"```bash\n(.*?)```", section, re.S)[1:3]
    [python] = re.findall(r"```python\n(.*?)```", section, re.S)
    as_run = {
        k: v for k, v in served.items() if k not in ("FLUXSERVE_DATA_DIR", "FLUXSERVE_API_KEY")
    }

    def shell(block: str) -> str:
        command = block.replace("http://127.0.0.1:8000", base)
        command = command.replace(".venv/bin/fluxserve", f"{sys.executable} -m fluxserve")
        done = subprocess.run(
            ["bash", "-euc", command],
            env=as_run,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    assert "file: lighthouse.png" in shell(generate)
    assert image_file_size(tmp_path / "lighthouse.png") == (1024, 1024)
    submitted = json.loads(shell(curl))
    assert submitted["code"] == 200 and submitted["data"]["task_id"].startswith("task-")
    (tmp_path / "lighthouse.png").unlink()
    mp.chdir(tmp_path)
    exec(compile(python.replace("http://127.0.0.1:8000", base), str(README), "exec"), {})
    assert image_file_size(tmp_path / "lighthouse.png") == (1024, 1024)


def image_file_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as image:
        return image.size


@pytest.mark.slow
def test_the_first_start_prints_a_key_that_works_everywhere_and_the_second_none(
    env: dict[str, str],  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    env = {**env, "FLUXSERVE_TINY_STEPS": "1"}
    log = tmp_path / "serve.log"
    with server(env, log):
        first = welcome(log, 0)
        found = KEY_IN_URL.search(first)
        assert found, first
        page, key = found.groups()
        assert page == f"http://127.0.0.1:{env['FLUXSERVE_PORT']}/"
        data = tmp_path / "data"
        assert saved_key(data) == key
        assert stat.S_IMODE((data / "local.key").stat().st_mode) == 0o600
        assert key.encode() not in (data / "fluxserve.db").read_bytes(), "stored hashed"

        operations = every_api_operation(page.rstrip("/"))
        assert len(operations) >= 8, operations
        auth = {"Authorization": f"Bearer {key}"}
        with httpx.Client(base_url=page, timeout=60) as client:
            for method, path in operations:
                anonymous = client.request(method, path, json={})
                keyed = client.request(method, path, json={}, headers=auth)
                assert anonymous.status_code == 401, (method, path, anonymous.text)
                # Past the key's check: the made-up ids and empty bodies get 4xx of their own.
                assert keyed.status_code not in (401, 403, 500), (method, path, keyed.text)

        run_the_quick_start(page.rstrip("/"), env, tmp_path, monkeypatch)

    restarted = len(log.read_text())
    with server(env, log):
        second = welcome(log, restarted)
    assert "#key=" not in second and "fsk_" not in second
    assert PAGE_WITHOUT_KEY.search(second), second
    assert "fluxserve keys create" in second
    listed = fluxserve("keys", "list", env=env).stdout.splitlines()
    assert len(listed) == 1 and "first start" in listed[0], listed

    # Asked for, a start makes a new key for the same account and keeps it instead.
    restarted = len(log.read_text())
    with server(env, log, "serve", "--new-key"):
        found = KEY_IN_URL.search(welcome(log, restarted))
        assert found and found.group(2) != key
        assert saved_key(tmp_path / "data") == found.group(2)
        balance = httpx.get(
            page + "api/user/balance",
            headers={"Authorization": f"Bearer {found.group(2)}"},
        )
    assert balance.status_code == 200, balance.text
    assert len(fluxserve("keys", "list", env=env).stdout.splitlines()) == 2


@pytest.mark.slow
async def test_the_page_at_the_printed_url_makes_an_image_with_nothing_else_to_do(
    env: dict[str, str],  # noqa: F811
    tmp_path: Path,
    browser: Browser,  # noqa: F811
) -> None:
    env = {**env, "FLUXSERVE_TINY_STEPS": "1"}
    log = tmp_path / "serve.log"
    with server(env, log):
        found = KEY_IN_URL.search(await asyncio.to_thread(welcome, log, 0))
        assert found
        page, watched = await open_page(browser, found.group(0))
        await page.get_by_label("Prompt").fill("A lighthouse at dawn, oil painting")
        await page.get_by_role("button", name="Generate").click()
        await expect(page.locator("#task-status")).to_have_text("Finished")
        assert await image_size(page, "#result-image") == (1024, 1024)
        assert page.url == found.group(1)  # the key left the address bar
        await page.close()
    assert watched.errors == []


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
async def test_of_starts_at_once_on_an_empty_database_one_makes_the_key(
    database: str, tmp_path: Path
) -> None:
    async with AsyncExitStack() as stack:
        url = f"sqlite:///{tmp_path / 'store.db'}"
        if database == "postgresql":
            url = await stack.enter_async_context(fresh_postgres_database())
        stores = [open_store(url) for _ in range(4)]
        for store in stores:  # one at a time: each start runs the migrations
            await store.start()
            stack.push_async_callback(store.close)
        await one_makes_the_key(stores, tmp_path)


async def one_makes_the_key(stores: list[Store], tmp_path: Path) -> None:
    made = await asyncio.gather(
        *(first_start_key(store, tmp_path / f"dir{i}") for i, store in enumerate(stores))
    )
    [key] = [k for k in made if k is not None]
    assert saved_key(tmp_path / f"dir{made.index(key)}") == key
    [record] = await stores[0].list_keys()
    assert record.name == "first start" and record.revoked_at is None
    # Later starts make none; --new-key and generate's run add keys to the same account.
    assert await first_start_key(stores[0], tmp_path / "later") is None
    again = await new_local_key(stores[0], tmp_path / "later", "serve --new-key")
    assert await local_key(stores[1], tmp_path / "later", "fluxserve generate") == again
    keys = await stores[0].list_keys()
    assert len(keys) == 2 and len({k.account_id for k in keys}) == 1, keys


@pytest.mark.slow
def test_an_api_process_makes_no_key(
    env: dict[str, str],  # noqa: F811
    tmp_path: Path,
) -> None:
    log = tmp_path / "api.log"
    with server(env, log, command="api") as process:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
    assert "fsk_" not in log.read_text() and "Application startup complete" in log.read_text()
    assert fluxserve("keys", "list", env=env).stdout == ""
    assert saved_key(tmp_path / "data") is None


@pytest.mark.parametrize(
    ("family", "host", "shown"),
    [
        (socket.AF_INET, "127.0.0.1", "http://127.0.0.1:{port}/"),
        (socket.AF_INET, "0.0.0.0", "http://127.0.0.1:{port}/"),
        (socket.AF_INET6, "::", "http://[::1]:{port}/"),
    ],
)
def test_the_page_url_is_one_a_browser_on_this_machine_opens(
    family: socket.AddressFamily, host: str, shown: str
) -> None:
    with socket.socket(family) as listening:
        listening.bind((host, 0))
        port = listening.getsockname()[1]
        assert page_url(listening) == shown.format(port=port)
