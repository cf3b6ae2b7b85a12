"""The page at `GET /`, clicked through in headless Chromium against a real server.

Chromium is the system's (`apt-get install chromium`), driven by playwright's
Python package; without it the browser tests skip and say how to install it.
Set FLUXSERVE_PAGE_SCREENSHOT=docs/page.png to save the screenshot in docs/clients.md.
"""

from __future__ import annotations

import base64
import io
import os
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from playwright.async_api import Browser, Page, async_playwright, expect

from fluxserve.api.app import create_app
from fluxserve.api.envelope import error_response
from fluxserve.engines.base import Engine
from fluxserve.runtime import Runtime

from conftest import Paused, make_settings, run_service

CHROMIUM = Path("/usr/bin/chromium")
HAVE_CHROMIUM = CHROMIUM.exists()
WAIT_MS = 60_000  # an upper bound for the page to catch up, on a busy machine

expect.set_options(timeout=WAIT_MS)


@pytest.fixture
def held_engine(tiny_engine: Engine) -> Iterator[Paused]:
    """The tiny engine, paused after its first step so the page can be seen mid-task."""
    engine = Paused(tiny_engine)
    yield engine
    engine.go.set()


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    if not HAVE_CHROMIUM:
        pytest.skip(
            f"no Chromium at {CHROMIUM}: install it with `apt-get install -y chromium` "
            "(and the dev extra's playwright) to run the page's tests"
        )
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=str(CHROMIUM))
        try:
            yield launched
        finally:
            await launched.close()


class Watched:
    """What a page did that the user does not see: requests and script errors."""

    def __init__(self, page: Page) -> None:
        self.urls: list[str] = []
        self.errors: list[str] = []
        page.on("request", lambda request: self.urls.append(request.url))
        page.on("pageerror", lambda error: self.errors.append(str(error)))
        page.on(
            "console",
            lambda message: (
                message.type == "error"
                and "Content Security Policy" in message.text
                and self.errors.append(message.text)
            ),
        )


async def open_page(browser: Browser, url: str) -> tuple[Page, Watched]:
    page = await browser.new_page(viewport={"width": 1000, "height": 900})
    page.set_default_timeout(WAIT_MS)
    watched = Watched(page)
    await page.goto(url)
    return page, watched


async def save_key(page: Page, key: str) -> None:
    await page.get_by_label("Key", exact=True).fill(key)
    await page.get_by_role("button", name="Save key").click()


async def image_size(page: Page, selector: str) -> tuple[int, int]:
    await page.wait_for_function(
        "s => { const i = document.querySelector(s); return i?.complete && i.naturalWidth > 0 }",
        arg=selector,
    )
    size = await page.eval_on_selector(selector, "i => [i.naturalWidth, i.naturalHeight]")
    return size[0], size[1]


async def shown_task_id(page: Page) -> str:
    """The id of the task the task panel shows."""
    return (await page.locator("#task-id").text_content() or "").split()[1]


def png_file(folder: Path, name: str, width: int, height: int, color: str) -> Path:
    path = folder / name
    Image.new("RGB", (width, height), color).save(path)
    return path


# --- without a browser ---------------------------------------------------------------


async def test_the_page_and_its_files_are_served_from_the_package(tmp_path: Path) -> None:
    async with run_service(make_settings(tmp_path / "data"), run_worker=False) as service:
        page = await service.client.get("/")
        script = await service.client.get("/page/app.js")
        style = await service.client.get("/page/style.css")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    # The form offers what the API accepts, filled in from its definitions.
    assert '<option value="flux-2-flex-edit">' in page.text
    assert '<option value="16:9">' in page.text and '<option value="webp">' in page.text
    assert "${" not in page.text
    assert script.status_code == 200 and "javascript" in script.headers["content-type"]
    assert style.status_code == 200 and style.headers["content-type"].startswith("text/css")


# --- in Chromium ---------------------------------------------------------------------


async def test_a_key_from_the_link_a_prompt_its_progress_and_the_image(
    tmp_path: Path, browser: Browser, held_engine: Paused
) -> None:
    async with run_service(make_settings(tmp_path / "data"), engine=held_engine) as service:
        page, watched = await open_page(browser, f"{service.url}/#key={service.key}")
        # The key is kept and taken out of the address bar.
        await expect(page.get_by_label("Key", exact=True)).to_have_value(service.key)
        assert page.url == f"{service.url}/"
        assert await page.evaluate("localStorage.getItem('fluxserve.key')") == service.key

        await page.get_by_label("Prompt").fill("A lighthouse at dawn, oil painting")
        # A flex model, for its steps: the fewer, the quicker the test.
        await page.get_by_label("Model").select_option("flux-2-flex")
        await page.get_by_label("Steps").fill("2")
        await page.get_by_label("Size").select_option("16:9")
        await page.get_by_label("Resolution").select_option("1K")
        await page.get_by_label("Seed").fill("7")
        await page.get_by_label("Output format").select_option("webp")
        await page.get_by_role("button", name="Generate").click()

        # Held at its first step: the bar shows what the status says.
        progress = page.get_by_role("progressbar", name="Progress")
        await page.wait_for_function("() => document.getElementById('task-progress').value > 0")
        task_id = await shown_task_id(page)
        running = (await service.status(task_id)).json()["data"]
        assert running["status"] == "running" and 0 < running["progress"] < 100
        assert await progress.evaluate("bar => bar.value") == running["progress"]
        await expect(page.locator("#task-status")).to_have_text(f"Running: {running['progress']}%")
        await expect(page.get_by_role("button", name="Cancel task")).to_be_visible()

        held_engine.go.set()
        await expect(page.locator("#task-status")).to_have_text("Finished")
        assert await image_size(page, "#result-image") == (1360, 768)
        await expect(page.locator("#result-meta")).to_contain_text("Seed 7")
        await expect(page.get_by_role("button", name="Cancel task")).to_be_hidden()
        done = (await service.status(task_id)).json()["data"]
        assert done["seed"] == 7 and done["files"][0]["content_type"] == "image/webp"
        await expect(page.locator("#result-link")).to_have_attribute(
            "href", done["files"][0]["file_url"]
        )

        # The history lists the task with its thumbnail.
        thumb = page.get_by_role("img", name=f"Image of task {task_id}")
        assert await image_size(page, f"img[alt='Image of task {task_id}']") == (1360, 768)
        await expect(thumb).to_be_visible()
        if target := os.environ.get("FLUXSERVE_PAGE_SCREENSHOT"):
            # 64 colours keep the picture in docs/clients.md small; the tiny engine's noise
            # would take hundreds of KB in full colour.
            shot = Image.open(io.BytesIO(await page.screenshot())).convert("RGB")
            shot.quantize(64).save(target, optimize=True)
        await page.close()

    # Offline: every request went to this server.
    assert watched.urls and all(u.startswith(service.url + "/") for u in watched.urls)
    assert watched.errors == []


async def test_an_edit_with_a_picked_and_a_dropped_reference(
    tmp_path: Path, browser: Browser, tiny_engine: Engine
) -> None:
    wide = png_file(tmp_path, "wide.png", 320, 180, "red")  # 16:9
    square = png_file(tmp_path, "square.png", 300, 300, "blue")
    async with run_service(make_settings(tmp_path / "data"), engine=tiny_engine) as service:
        page, watched = await open_page(browser, f"{service.url}/#key={service.key}")
        await page.get_by_label("Model").select_option("flux-2-flex-edit")
        await page.get_by_label("Steps").fill("1")
        await page.get_by_label("Size").select_option("auto")
        await page.get_by_label("Prompt").fill("The same scene at night")

        await page.locator("#reference-files").set_input_files(wide)
        dropped = await page.evaluate_handle(
            """b64 => {
                const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
                const transfer = new DataTransfer();
                transfer.items.add(new File([bytes], "square.png", {type: "image/png"}));
                return transfer;
            }""",
            base64.b64encode(square.read_bytes()).decode(),
        )
        await page.dispatch_event("#drop-zone", "drop", {"dataTransfer": dropped})
        items = page.locator("#reference-list li")
        await expect(items).to_have_text(
            ["wide.png: uploaded Remove", "square.png: uploaded Remove"], use_inner_text=True
        )
        uploaded = [await item.get_attribute("data-file-url") for item in await items.all()]

        await page.get_by_role("button", name="Generate").click()
        await expect(page.locator("#task-status")).to_have_text("Finished")
        # `auto` takes the first reference's ratio: 16:9.
        assert await image_size(page, "#result-image") == (1360, 768)
        task_id = await shown_task_id(page)
        await page.close()
        task = await service.runtime.store.get_task(task_id)
    assert task is not None and list(task.input.image_urls) == uploaded
    assert all(url and url.startswith(f"{service.url}/files/uploads/") for url in uploaded)
    assert watched.errors == []


async def test_cancel_a_running_task(tmp_path: Path, browser: Browser, held_engine: Paused) -> None:
    async with run_service(make_settings(tmp_path / "data"), engine=held_engine) as service:
        page, _ = await open_page(browser, f"{service.url}/#key={service.key}")
        await page.get_by_label("Prompt").fill("A paper boat on a pond")
        await page.get_by_role("button", name="Generate").click()
        await page.wait_for_function("() => document.getElementById('task-progress').value > 0")

        await page.get_by_role("button", name="Cancel task").click()
        await expect(page.locator("#task-status")).to_have_text("Stopping…")
        await expect(page.get_by_role("button", name="Cancel task")).to_be_disabled()
        held_engine.go.set()
        await expect(page.locator("#task-status")).to_have_text("Cancelled")
        await expect(page.get_by_role("button", name="Cancel task")).to_be_hidden()
        task_id = await shown_task_id(page)
        data = (await service.status(task_id)).json()["data"]
        assert data["status"] == "failed" and data["cancelled"] is True
        await expect(page.locator("#history li").first).to_contain_text("Cancelled")
        await page.close()


async def test_a_bad_key_shows_the_apis_own_message(tmp_path: Path, browser: Browser) -> None:
    async with run_service(make_settings(tmp_path / "data"), run_worker=False) as service:
        answer = await service.client.get(
            "/api/generate/tasks", headers={"Authorization": "Bearer fsk_not-a-key"}
        )
        message = answer.json()["error"]["message"]
        page, _ = await open_page(browser, service.url + "/")
        await save_key(page, "fsk_not-a-key")
        await expect(page.get_by_role("alert")).to_have_text(message)

        await page.get_by_label("Prompt").fill("A red fox in snow")
        await page.get_by_role("button", name="Generate").click()
        await expect(page.get_by_role("alert")).to_have_text(message)
        assert answer.status_code == 401
        # A rule the API enforces is worded by the API too.
        await save_key(page, service.key)
        await page.get_by_label("Prompt").fill("ab")
        await page.get_by_role("button", name="Generate").click()
        refused = await service.submit({"model": "flux-2-pro", "input": {"prompt": "ab"}})
        await expect(page.get_by_role("alert")).to_have_text(refused.json()["error"]["message"])
        await page.close()


SSE_TEXT = (
    ": heartbeat\r\nevent: status\r\nid: 1\r\n"
    'data: {"a":\r\ndata:  1}\r\n\r\n'
    "event: progress\nid: 2\ndata\n\n"
    "retry: 5\rdata: last\r\r"
    ": bye\ndata: never ended\n"
)


async def test_the_event_stream_parser(tmp_path: Path, browser: Browser) -> None:
    """Events split anywhere, every line ending, comments, multi-line data, and a
    character split between two chunks."""
    async with run_service(make_settings(tmp_path / "data"), run_worker=False) as service:
        page, _ = await open_page(browser, service.url + "/")
        results: Any = await page.evaluate(
            """async ([text, streamedText]) => {
                const { SseParser, readEventStream } = await import("/page/sse.js");
                const parsed = [];
                for (const size of [1, 2, 3, 7, text.length]) {
                    const events = [];
                    const parser = new SseParser((event) => events.push(event));
                    for (let at = 0; at < text.length; at += size) {
                        parser.feed(text.slice(at, at + size));
                    }
                    parsed.push(events);
                }
                const bytes = new TextEncoder().encode(streamedText);
                const body = new ReadableStream({
                    start(controller) {
                        for (const byte of bytes) controller.enqueue(new Uint8Array([byte]));
                        controller.close();
                    },
                });
                const streamed = [];
                for await (const event of readEventStream(body)) streamed.push(event);
                return { parsed, streamed };
            }""",
            [SSE_TEXT, "event: progress\ndata: café ☕\n\n"],
        )
        await page.close()
    expected = [
        {"event": "status", "data": '{"a":\n 1}', "id": "1"},
        {"event": "progress", "data": "", "id": "2"},
        {"event": "message", "data": "last", "id": "2"},
    ]
    assert results["parsed"] == [expected] * 5
    assert results["streamed"] == [{"event": "progress", "data": "café ☕", "id": ""}]


STREAM_ROUTE = "/api/generate/stream/"


def without_the_stream_route(runtime: Runtime) -> Any:
    """The app as a server without the stream route serves it: a 404 there."""
    app = create_app(runtime)

    async def serve(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"].startswith(STREAM_ROUTE):
            await error_response(404, "Not Found")(scope, receive, send)
        else:
            await app(scope, receive, send)

    return serve


async def test_a_server_without_the_stream_route_is_polled(
    tmp_path: Path, browser: Browser, held_engine: Paused
) -> None:
    settings = make_settings(tmp_path / "data")
    async with run_service(
        settings, engine=held_engine, make_app=without_the_stream_route
    ) as service:
        page, watched = await open_page(browser, f"{service.url}/#key={service.key}")
        await page.get_by_label("Prompt").fill("A red fox in snow")
        await page.get_by_label("Model").select_option("flux-2-flex")
        await page.get_by_label("Steps").fill("2")
        await page.get_by_role("button", name="Generate").click()
        await expect(page.locator("#task-status")).to_have_text(re.compile(r"Running: [1-9]"))
        held_engine.go.set()
        await expect(page.locator("#task-status")).to_have_text("Finished")
        assert await image_size(page, "#result-image") == (1024, 1024)
        task_id = await shown_task_id(page)
        await page.close()
    asked = [url.removeprefix(service.url) for url in watched.urls]
    assert f"{STREAM_ROUTE}{task_id}" in asked
    assert asked.count(f"/api/generate/status/{task_id}") >= 2


async def test_a_task_opened_from_the_history_is_followed_over_its_event_stream(
    tmp_path: Path, browser: Browser, held_engine: Paused
) -> None:
    async with run_service(make_settings(tmp_path / "data"), engine=held_engine) as service:
        body = {"model": "flux-2-flex", "input": {"prompt": "a red fox in snow", "steps": 2}}
        task_id = (await service.submit(body)).json()["data"]["task_id"]
        page, watched = await open_page(browser, f"{service.url}/#key={service.key}")
        await page.get_by_role("button", name=f"Show task {task_id}").click()
        await expect(page.locator("#task-status")).to_have_text(re.compile(r"Running: [1-9]"))
        held_engine.go.set()
        await expect(page.locator("#task-status")).to_have_text("Finished")
        assert await image_size(page, "#result-image") == (1024, 1024)
        await page.close()
    asked = [url.removeprefix(service.url) for url in watched.urls]
    assert f"{STREAM_ROUTE}{task_id}" in asked
    assert f"/api/generate/status/{task_id}" not in asked, "followed by the stream alone"
