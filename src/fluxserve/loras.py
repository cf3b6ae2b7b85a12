"""The LoRAs this machine holds: files in the LoRA folder, and LoRA repos in the
Hugging Face cache. Read from the local disk only; nothing here touches the network.

A file `<lora_dir>/<name>.safetensors` is the LoRA `<name>`. A cached Hugging Face
model repo `owner/name` is a LoRA when its snapshot holds a `.safetensors` file
at the top whose tensors are LoRA layers (`lora_A`/`lora_B`, or kohya's
`lora_down`/`lora_up`); `pytorch_lora_weights.safetensors` is preferred.

The base model a LoRA fits is read from its safetensors metadata (`base_model`,
else `modelspec.architecture`, else `ss_base_model_version`), and for a Hugging
Face repo from the `base_model:` line of its model card; None when unstated.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

SUFFIX = ".safetensors"
DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
BASE_MODEL_KEYS = ("base_model", "modelspec.architecture", "ss_base_model_version")
LORA_MARKERS = ("lora_A", "lora_B", "lora_down", "lora_up")
# A safetensors header is JSON; a LoRA's is small, and this bounds what is read.
MAX_HEADER_BYTES = 64 * 1024 * 1024
_CARD_BASE = re.compile(r"^base_model:\s*(?:\n\s*-\s*)?['\"]?([^'\"\n]+?)['\"]?\s*$", re.M)


@dataclass(frozen=True)
class LoraFile:
    """A LoRA available by name on this machine."""

    name: str
    path: Path
    source: Literal["folder", "huggingface"]
    base_model: str | None

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "source": self.source, "base_model": self.base_model}


def safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file (its tensors and `__metadata__`); {} when
    the file is not one."""
    try:
        with path.open("rb") as file:
            (length,) = struct.unpack("<Q", file.read(8))
            if length > MAX_HEADER_BYTES:
                return {}
            header = json.loads(file.read(length))
    except (OSError, struct.error, ValueError):
        return {}
    return header if isinstance(header, dict) else {}


def base_model_of(header: dict[str, Any]) -> str | None:
    """The base model a safetensors header names in its metadata, or None."""
    metadata = header.get("__metadata__")
    if not isinstance(metadata, dict):
        return None
    for key in BASE_MODEL_KEYS:
        value = metadata.get(key)
        if isinstance(value, str) and value.strip():
            return value.strip()
    return None


def is_lora(header: dict[str, Any]) -> bool:
    return any(marker in key for key in header for marker in LORA_MARKERS)


class LoraCatalog:
    """Named LoRAs: the files in `folder`, then the LoRA repos of the Hugging Face cache."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def find(self, name: str) -> LoraFile | None:
        """The LoRA called `name`, or None."""
        if "/" in name:
            return _cached_repo(name)
        path = self.folder / f"{name}{SUFFIX}"
        # A name is a file of the folder itself, never a path out of it.
        if path.parent != self.folder or not path.is_file():
            return None
        return LoraFile(name, path, "folder", base_model_of(safetensors_header(path)))

    def available(self) -> list[LoraFile]:
        """Every named LoRA, the folder's first, each group by name."""
        found = []
        if self.folder.is_dir():
            for path in sorted(self.folder.glob(f"*{SUFFIX}")):
                lora = self.find(path.stem)
                if lora is not None:
                    found.append(lora)
        for repo in _cached_model_repos():
            lora = _cached_repo(repo)
            if lora is not None:
                found.append(lora)
        return found

    def names(self) -> list[str]:
        return [lora.name for lora in self.available()]


def _cached_model_repos() -> list[str]:
    try:
        from huggingface_hub import constants, scan_cache_dir
        from huggingface_hub.errors import CacheNotFound
    except ImportError:
        return []
    try:
        # The folder read now, as snapshot_download reads it: HF_HUB_CACHE as set.
        cache = scan_cache_dir(constants.HF_HUB_CACHE)
    except (CacheNotFound, OSError):
        return []
    return sorted(repo.repo_id for repo in cache.repos if repo.repo_type == "model")


def _cached_repo(repo: str) -> LoraFile | None:
    """The cached repo `repo` as a LoRA, or None when it is absent or holds none."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError:
        return None
    try:
        # local_files_only: answered from the cache folder alone, even online.
        folder = Path(snapshot_download(repo, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):
        return None
    if (folder / "model_index.json").is_file():
        return None  # a whole pipeline, not a LoRA
    candidates = sorted(folder.glob(f"*{SUFFIX}"), key=lambda p: p.name != DIFFUSERS_WEIGHT_NAME)
    for path in candidates:
        header = safetensors_header(path)
        if is_lora(header):
            base = base_model_of(header) or _card_base_model(folder / "README.md")
            return LoraFile(repo, path, "huggingface", base)
    return None


def _card_base_model(card: Path) -> str | None:
    try:
        text = card.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    match = _CARD_BASE.search(text)
    return match.group(1).strip() if match else None
