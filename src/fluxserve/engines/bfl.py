"""Black Forest Labs' API as an engine: create an upstream task, poll it, fetch its sample.

No torch here: httpx and the standard library only (and Pillow, for references).
BFL's answers become three kinds of error, each with a message for the task's owner:
`UpstreamFailed` (the task cannot succeed: it fails), `UpstreamBusy` (429: back
off, keep the task) and `UpstreamUnavailable` (the network or a 5xx: retry with
backoff). What the operator configured (`bfl_base_url`) is trusted, and so are the
polling and sample URLs BFL answers with; the key goes only to BFL's own hosts.
See docs/bfl-engine.md.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import httpx
from PIL import Image

from fluxserve.checkpoints import ModelRoute
from fluxserve.engines.base import GenerationRequest
from fluxserve.errors import EngineUnavailable
from fluxserve.settings import Settings
from fluxserve.tasks import BflOptions

NAME = "bfl"
# BFL's own hosts: polling URLs there get the key, whatever the regional endpoint.
BFL_DOMAINS = (".bfl.ai", ".bfl.ml")
MAX_SAMPLE_BYTES = 64 * 1024 * 1024
# The formats BFL writes; a task asking for another gets a PNG re-encoded here.
UPSTREAM_FORMATS = ("png", "jpeg")
REQUEST_TIMEOUT = 60.0
MODERATED = {
    "Request Moderated": "the prompt or an input image was flagged before generation",
    "Content Moderated": "the generated image was flagged",
}
PENDING = frozenset({"Pending", "Queued", "Processing"})


class UpstreamFailed(Exception):
    """The upstream task cannot succeed; the task fails with this message."""


class UpstreamBusy(Exception):
    """429: too many tasks in flight upstream; try again later."""

    def __init__(self, message: str, retry_after: float | None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class UpstreamUnavailable(Exception):
    """The network or a 5xx: worth retrying."""


@dataclass(frozen=True)
class Polled:
    """One look at an upstream task: still pending (with progress 0 to 1), or ready."""

    progress: float
    sample: str | None = None
    seed: int | None = None


class BflEngine:
    """The client of Black Forest Labs' API that an upstream worker runs tasks on."""

    name = NAME

    def __init__(self, settings: Settings) -> None:
        self.base_url = settings.bfl_base_url.rstrip("/")
        key = settings.bfl_api_key
        self.key = key.get_secret_value() if key is not None else None

    def load(self) -> None:
        """Nothing to load; without a key no task could run, so the worker says so."""
        if not self.key:
            raise EngineUnavailable(
                "engine bfl needs Black Forest Labs' API key: set FLUXSERVE_BFL_API_KEY"
            )

    def client(self) -> httpx.AsyncClient:
        """The client for the configured endpoint and what it answers: not net-guarded."""
        return httpx.AsyncClient(timeout=REQUEST_TIMEOUT, trust_env=False)

    def _headers(self, url: str) -> dict[str, str]:
        host = httpx.URL(url).host
        own = host == httpx.URL(self.base_url).host or host.endswith(BFL_DOMAINS)
        return {"x-key": self.key or "", "accept": "application/json"} if own else {}

    async def create(
        self, client: httpx.AsyncClient, endpoint: str, body: dict[str, Any]
    ) -> dict[str, str]:
        """Create the upstream task (this is what BFL charges for): its id and polling URL."""
        url = self.base_url + endpoint
        answer = _json(await _send(client, "POST", url, self._headers(url), json=body), url)
        upstream_id = answer.get("id")
        if not isinstance(upstream_id, str):
            raise UpstreamFailed(f"Upstream answered {endpoint} with no task id: {answer}")
        polling_url = answer.get("polling_url")
        if not isinstance(polling_url, str):
            polling_url = f"{self.base_url}/v1/get_result?id={upstream_id}"
        return {"id": upstream_id, "polling_url": polling_url}

    async def poll(self, client: httpx.AsyncClient, polling_url: str) -> Polled:
        """The upstream task now; UpstreamFailed when it ended without an image."""
        headers = self._headers(polling_url)
        answer = _json(await _send(client, "GET", polling_url, headers), polling_url)
        status = str(answer.get("status"))
        if status in PENDING:
            return Polled(float(answer.get("progress") or 0.0))
        if status == "Ready":
            result = answer.get("result") or {}
            sample = result.get("sample")
            if not isinstance(sample, str):
                raise UpstreamFailed("Upstream task is Ready but names no sample")
            seed = result.get("seed")
            return Polled(1.0, sample, seed if isinstance(seed, int) else None)
        if status in MODERATED:
            raise UpstreamFailed(
                f"Moderated upstream by Black Forest Labs ({status}): {MODERATED[status]}"
            )
        if status == "Task not found":
            raise UpstreamFailed("Upstream task not found: it expired or never existed")
        details = answer.get("details") or answer.get("result") or ""
        raise UpstreamFailed(f"Upstream task ended with status {status!r} {details}".strip())

    async def sample(self, client: httpx.AsyncClient, url: str) -> bytes:
        """The sample's bytes, read before its URL expires (10 minutes after Ready)."""
        data = bytearray()
        try:
            async with client.stream("GET", url) as response:
                if response.status_code in (403, 404, 410):
                    raise UpstreamFailed(
                        f"Upstream sample expired or missing ({response.status_code}): BFL's "
                        "delivery URLs last 10 minutes after the task is Ready"
                    )
                _raise_for(response, url)
                async for chunk in response.aiter_bytes():
                    data += chunk
                    if len(data) > MAX_SAMPLE_BYTES:
                        raise UpstreamFailed(f"Upstream sample is over {MAX_SAMPLE_BYTES} bytes")
        except httpx.TransportError as exc:
            raise UpstreamUnavailable(f"{type(exc).__name__} reading {url}: {exc}") from exc
        return bytes(data)

    async def credits(self, client: httpx.AsyncClient) -> float:
        """The account's credits: one cheap call that proves the key works."""
        url = self.base_url + "/v1/credits"
        credits = _json(await _send(client, "GET", url, self._headers(url)), url).get("credits")
        if not isinstance(credits, int | float) or isinstance(credits, bool):
            raise UpstreamUnavailable(f"Upstream answered {url} with no number of credits")
        return float(credits)


def request_body(
    route: ModelRoute,
    model: str,
    request: GenerationRequest,
    output_format: str,
    options: BflOptions | None = None,
) -> dict[str, Any]:
    """BFL's request for `request`: references as base64, flex's steps and guidance,
    and what a task submitted through BFL's own wire asked of BFL's moderation and
    prompt upsampling."""
    body: dict[str, Any] = {
        "prompt": request.prompt,
        "seed": request.seed,
        "width": request.width,
        "height": request.height,
        "output_format": output_format if output_format in UPSTREAM_FORMATS else "png",
    }
    if route.upstream_endpoint(model).endswith("flex"):
        body["steps"] = request.steps or route.steps
        guidance = request.guidance if request.guidance is not None else route.guidance
        if guidance is not None:
            body["guidance"] = guidance
    if options is not None:
        body["safety_tolerance"] = options.safety_tolerance
        body["prompt_upsampling"] = options.prompt_upsampling
    body.update(_input_images(request.images))
    return body


def _input_images(images: Sequence[Image.Image]) -> dict[str, str]:
    """`input_image`, `input_image_2`, ...: each reference as a base64 PNG."""
    fields = {}
    for index, image in enumerate(images):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        name = "input_image" if index == 0 else f"input_image_{index + 1}"
        fields[name] = base64.b64encode(buffer.getvalue()).decode()
    return fields


async def _send(
    client: httpx.AsyncClient, method: str, url: str, headers: dict[str, str], **kwargs: Any
) -> httpx.Response:
    try:
        response = await client.request(method, url, headers=headers, **kwargs)
    except httpx.TransportError as exc:
        raise UpstreamUnavailable(f"{type(exc).__name__} reaching {url}: {exc}") from exc
    _raise_for(response, url)
    return response


def _raise_for(response: httpx.Response, url: str) -> None:
    """BFL's HTTP errors as the three kinds above."""
    code = response.status_code
    if code < 400:
        return
    if code == 429:
        retry_after = response.headers.get("retry-after", "")
        seconds = float(retry_after) if retry_after.replace(".", "", 1).isdigit() else None
        raise UpstreamBusy("Upstream is busy (429): too many tasks in flight", seconds)
    if code >= 500:
        raise UpstreamUnavailable(f"Upstream answered {code} at {url}")
    if code == 402:
        raise UpstreamFailed("Upstream credits exhausted (402): add credits to the BFL account")
    if code in (401, 403):
        raise UpstreamFailed(f"Upstream refused fluxserve's BFL API key ({code})")
    if code == 404:
        raise UpstreamFailed("Upstream task not found (404): it expired or never existed")
    raise UpstreamFailed(f"Upstream refused the request ({code}): {response.text[:500]}")


def _json(response: httpx.Response, url: str) -> dict[str, Any]:
    try:
        answer = response.json()
    except ValueError as exc:
        raise UpstreamUnavailable(f"Upstream answered {url} with no JSON") from exc
    if not isinstance(answer, dict):
        raise UpstreamUnavailable(f"Upstream answered {url} with {type(answer).__name__}")
    return answer
