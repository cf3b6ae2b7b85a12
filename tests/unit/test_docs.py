"""The documentation against the code: every setting in the README's settings table,
every route in docs/, and every link between the documents leading somewhere."""

from __future__ import annotations

import importlib
import pkgutil
import re
from pathlib import Path

import pytest
from fastapi import APIRouter
from fastapi.routing import APIRoute

import fluxserve.api
from fluxserve.settings import Settings

ROOT = Path(__file__).parents[2]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^()\s]+)\)")


def prose(text: str) -> str:
    """`text` without its fenced code blocks."""
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def section(text: str, heading: str) -> str:
    start = text.index(f"\n{heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start : None if end < 0 else end]


def anchor(heading: str) -> str:
    """The id GitHub gives a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(document: Path) -> set[str]:
    headings = re.findall(r"^#+ (.+)$", prose(document.read_text()), re.M)
    return {anchor(heading) for heading in headings}


def api_paths() -> set[str]:
    """The path of every documented route of every router in fluxserve.api."""
    paths = set()
    for module in pkgutil.iter_modules(fluxserve.api.__path__):
        namespace = vars(importlib.import_module(f"fluxserve.api.{module.name}"))
        for router in [value for value in namespace.values() if isinstance(value, APIRouter)]:
            paths |= {
                route.path.replace(":path}", "}")
                for route in router.routes
                if isinstance(route, APIRoute) and route.include_in_schema
            }
    return paths


def test_every_setting_is_in_the_readme_settings_table() -> None:
    table = section((ROOT / "README.md").read_text(), "## Settings")
    first_cells = re.findall(r"^\| (.+?) \|", table, re.M)
    documented = {name for cell in first_cells for name in re.findall(r"`(\w+)`", cell)}
    assert set(Settings.model_fields) - documented == set()


def test_every_route_is_in_the_documentation() -> None:
    """The hosted API's routes in docs/api.md, the other doors' in their own documents."""
    document = "\n".join(path.read_text() for path in (ROOT / "docs").glob("*.md"))
    paths = api_paths()
    assert "/api/generate/submit" in paths and "/health" in paths
    assert {path for path in paths if path not in document} == set()


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda path: path.name)
def test_every_link_between_the_documents_leads_somewhere(document: Path) -> None:
    broken = []
    for target in LINK.findall(prose(document.read_text())):
        if re.match(r"[a-z]+:", target):  # https:, mailto: and the like
            continue
        file, _, fragment = target.partition("#")
        linked = (document.parent / file).resolve() if file else document
        if not linked.exists() or (fragment and fragment not in anchors(linked)):
            broken.append(target)
    assert broken == []
