"""The web page at `GET /` and its script and style sheet under `/page/`.

The page is plain files in the package (`fluxserve/web`), with no build step;
its form's choices and limits are filled in from the same definitions the API
checks submits against, so the two cannot drift apart.
"""

from __future__ import annotations

import html
from collections.abc import Iterable
from functools import cache
from pathlib import Path
from string import Template

from fastapi import APIRouter, FastAPI
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

from fluxserve.api.schemas import (
    GUIDANCE_RANGE,
    MAX_IMAGES,
    PROMPT_MAX,
    RESOLUTIONS,
    STEPS_RANGE,
)
from fluxserve.sizes import SIZE_CHOICES
from fluxserve.tasks import MODELS, OUTPUT_FORMATS

WEB_DIR = Path(__file__).resolve().parent.parent / "web"
ASSETS_ROUTE = "/page"

# Everything the page loads comes from this server; images may come from an S3
# bucket's signed URLs. The key lives in the page's storage, so no script but
# the page's own may run there.
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self' blob: https: http:; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'"
    ),
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}

router = APIRouter()


def _options(values: Iterable[str], selected: str) -> str:
    return "".join(
        f'<option value="{html.escape(v)}"{" selected" if v == selected else ""}>'
        f"{html.escape(v)}</option>"
        for v in values
    )


@cache
def page_html() -> str:
    """index.html with the API's choices and limits filled in."""
    template = Template((WEB_DIR / "index.html").read_text(encoding="utf-8"))
    return template.substitute(
        model_options=_options(MODELS, MODELS[0]),
        size_options=_options(SIZE_CHOICES, "1:1"),
        resolution_options=_options(RESOLUTIONS, "1K"),
        format_options=_options(OUTPUT_FORMATS, "png"),
        prompt_max=PROMPT_MAX,
        seed_max=2**32 - 1,
        steps_min=STEPS_RANGE[0],
        steps_max=STEPS_RANGE[1],
        guidance_min=GUIDANCE_RANGE[0],
        guidance_max=GUIDANCE_RANGE[1],
        max_images=MAX_IMAGES,
    )


@router.get("/", include_in_schema=False)
async def page() -> HTMLResponse:
    """The page: generate images, watch their progress, browse the account's history."""
    return HTMLResponse(page_html(), headers=PAGE_HEADERS)


def install_page(app: FastAPI) -> None:
    app.include_router(router)
    app.mount(ASSETS_ROUTE, StaticFiles(directory=WEB_DIR), name="page")
