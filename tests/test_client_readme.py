"""The README's examples of the client, run as they are written there."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

README = Path(__file__).parents[1] / "README.md"


def readme_block(heading: str) -> str:
    """The first python block under `heading` in the README."""
    text = README.read_text()
    section = text[text.index(heading) :]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, f"no python block under {heading}"
    return match.group(1)


async def test_the_asgi_transport_example_runs_as_written(tmp_path: Path) -> None:
    namespace: dict[str, Any] = {}
    exec(compile(readme_block("### Testing your own code"), str(README), "exec"), namespace)
    await namespace["test_my_code_makes_an_image"](tmp_path)
