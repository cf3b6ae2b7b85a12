"""One settings object, read from `FLUXSERVE_*` variables and an optional TOML file.

Precedence, highest first: values passed in code (the CLI's flags), environment
variables, the TOML file named by `FLUXSERVE_CONFIG`, the defaults below.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from fluxserve.bfl_models import BFL_PATHS, BflRoute, default_bfl_routes
from fluxserve.checkpoints import ModelRoute, default_routes
from fluxserve.openai_images import OPENAI_IMAGE_MODELS
from fluxserve.store.base import POSTGRES_STATEMENT_TIMEOUT, SqliteSynchronous
from fluxserve.tasks import MODELS

EngineName = Literal["auto", "diffusers", "tiny", "bfl"]


class Settings(BaseSettings):
    """Everything an operator can set; see the README's settings table."""

    model_config = SettingsConfigDict(env_prefix="FLUXSERVE_", extra="forbid")

    data_dir: Path = Field(default=Path("data"), description="SQLite file and result files")
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    access_log: bool = Field(
        default=True, description="Log a line per HTTP request (off behind a proxy that logs)"
    )
    metrics_port: int | None = Field(
        default=None, ge=0, le=65535, description="fluxserve worker: serve /metrics on this port"
    )
    log_format: Literal["text", "json"] = Field(
        default="text", description="text: readable lines; json: one JSON object a line"
    )
    public_url: str | None = Field(
        default=None, description="Base of every file_url; defaults to http://host:port"
    )
    database_url: str | None = Field(
        default=None, description="sqlite:///path; defaults to data_dir/fluxserve.db"
    )
    sqlite_synchronous: SqliteSynchronous = Field(
        default="full",
        description="full: each SQLite commit is on the disk before it is answered; "
        "normal: a power cut can lose the last ones",
    )
    postgres_statement_timeout: float = Field(
        default=POSTGRES_STATEMENT_TIMEOUT,
        gt=0,
        description="Seconds a PostgreSQL statement may take; past it the request is "
        "answered 503 and a background loop tries again",
    )
    engine: EngineName = Field(
        default="auto",
        description="auto: real weights where present, else tiny (loudly); diffusers: never "
        "tiny; bfl: every model upstream at Black Forest Labs' API",
    )
    tiny_steps: int = Field(default=4, ge=1, le=50)
    # Each public model's engine, checkpoint and defaults: see checkpoints.ModelRoute.
    models: dict[str, ModelRoute] = Field(default_factory=default_routes)
    # The fluxserve models each path of Black Forest Labs' wire runs on: docs/bfl-api.md.
    bfl_models: dict[str, BflRoute] = Field(default_factory=default_bfl_routes)
    allow_downloads: bool = Field(
        default=False, description="Download absent checkpoints at load (engine auto/diffusers)"
    )
    max_loaded_pipelines: int = Field(
        default=1, ge=1, description="Checkpoints kept loaded at once; the least recent unloads"
    )
    compile_transformer: bool = Field(
        default=False, description="torch.compile the diffusers transformer (slow first task)"
    )
    prompt_cache_size: int = Field(
        default=32,
        ge=0,
        description="Recent prompts whose embeddings each pipeline keeps on its device; 0: none",
    )
    # LoRAs per task: see docs/lora.md.
    lora_dir: Path | None = Field(
        default=None, description="Folder of the operator's LoRA files; defaults to data_dir/loras"
    )
    max_loras: int = Field(
        default=4, ge=0, le=16, description="LoRAs one task may ask for; 0: none"
    )
    allow_lora_urls: bool = Field(
        default=False, description="Accept LoRAs by URL (fetched by the worker, net guard applies)"
    )
    max_lora_bytes: int = Field(
        default=1024**3, gt=0, description="Largest LoRA file fetched from a URL"
    )
    lora_cache_bytes: int = Field(
        default=20 * 1024**3,
        gt=0,
        description="LoRAs fetched from URLs kept on disk; the least recently used go first",
    )
    lora_memory_bytes: int = Field(
        default=2 * 1024**3,
        gt=0,
        description="LoRA weights kept loaded per pipeline; the least recently used unload",
    )
    lora_hotswap_rank: int = Field(
        default=128,
        ge=1,
        description="compile_transformer: the highest LoRA rank swapped in without recompiling",
    )
    lora_price: int = Field(default=0, ge=0, description="Extra credits per LoRA a task uses")
    task_timeout: float | None = Field(
        default=None, gt=0, description="Seconds a task may denoise before it fails"
    )
    max_batch_size: int = Field(
        default=1,
        ge=1,
        description="Queued tasks of one shape a worker draws in one pipeline call; 1: none",
    )
    allow_private_networks: bool = False

    # Black Forest Labs' API as an engine: see docs/bfl-engine.md.
    bfl_api_key: SecretStr | None = Field(default=None, description="engine bfl: the x-key")
    bfl_base_url: str = Field(
        default="https://api.bfl.ai",
        description="engine bfl: BFL's global endpoint, or a regional one (api.eu.bfl.ai...)",
    )
    bfl_max_in_flight: int = Field(
        default=24, ge=1, description="engine bfl: upstream tasks a worker follows at once"
    )
    bfl_poll_interval: float = Field(
        default=1.0, gt=0, description="engine bfl: seconds between polls of a pending task"
    )
    api_key_cache_ttl: float = Field(
        default=5.0,
        ge=0,
        description="Seconds an API key, once looked up, is reused; a revoke takes this long",
    )
    stream_heartbeat: float = Field(
        default=15.0,
        gt=0,
        description="Seconds between comment lines on an idle progress stream, for proxies",
    )

    callback_timeout: float = Field(default=10.0, gt=0)
    # 1, 2 and 4 s as the hosted API retries, then minutes, then hours: about a
    # day in all, so an event outlasts its receiver's deploy or outage.
    callback_retry_delays: list[float] = Field(
        default=[1, 2, 4, 60, 300, 1800, 3600, 3 * 3600, 6 * 3600, 12 * 3600]
    )
    callback_retry_jitter: float = Field(
        default=0.1, ge=0, le=1, description="Each retry waits up to this fraction longer"
    )
    callback_concurrency: int = Field(default=16, ge=1)
    callback_concurrency_per_receiver: int = Field(
        default=4, ge=1, description="Callbacks in flight to one scheme://host:port at once"
    )
    allow_http_callbacks: bool = Field(
        default=False, description="Accept http:// callback URLs (https only otherwise)"
    )
    webhook_secret_grace: float = Field(
        default=24 * 3600, ge=0, description="Seconds a rotated-out signing secret still signs"
    )

    fetch_timeout: float = Field(default=20.0, gt=0)
    max_reference_bytes: int = Field(default=20 * 1024 * 1024, gt=0)
    max_reference_pixels: int = Field(default=64 * 1024 * 1024, gt=0)

    # Credits per task, by model and resolution, e.g. {"flux-2-pro": {"1K": 5, "2K": 10}}.
    # A model or resolution left out is free; with no prices no balance is needed.
    prices: dict[str, dict[Literal["1K", "2K"], int]] = Field(default_factory=dict)
    rate_limit_per_minute: int | None = Field(
        default=None, ge=1, description="Submits per minute per API key; unset = no limit"
    )
    max_active_tasks: int | None = Field(
        default=None, ge=1, description="Tasks queued or running at once per API key"
    )
    idempotency_ttl: float = Field(
        default=24 * 3600, gt=0, description="Seconds an Idempotency-Key answers its first task"
    )

    lease_seconds: float = Field(default=60.0, gt=0)
    max_attempts: int = Field(default=3, ge=1)
    poll_interval: float = Field(default=2.0, gt=0)
    ready_requires_models: list[str] = Field(
        default_factory=list,
        description="Models that need a live worker somewhere for /ready to answer 200",
    )

    # Where result and uploaded files live; the s3_* settings apply to "s3" only.
    storage: Literal["local", "s3"] = "local"
    s3_bucket: str | None = None
    s3_prefix: str = Field(default="", description="Folder inside the bucket, e.g. fluxserve/")
    s3_endpoint_url: str | None = Field(
        default=None, description="An S3-compatible server (MinIO, R2, ...); AWS when unset"
    )
    s3_region: str | None = None
    s3_access_key_id: str | None = None
    s3_secret_access_key: SecretStr | None = None
    s3_url_lifetime: int = Field(
        default=7 * 24 * 3600,
        ge=1,
        le=7 * 24 * 3600,
        description="Seconds a file_url works; 7 days at most, the SigV4 limit",
    )
    s3_addressing_style: Literal["auto", "path", "virtual"] = "auto"

    max_body_bytes: int = Field(
        default=1024 * 1024,
        gt=0,
        description="Largest request body of a route without a limit of its own; past it, 413",
    )

    # Uploads (POST /api/common/upload/...) and how long files are kept.
    max_base64_upload_bytes: int = Field(
        default=5 * 1024 * 1024, gt=0, description="Largest decoded image of a base64 upload"
    )
    max_stream_upload_bytes: int = Field(
        default=20 * 1024 * 1024, gt=0, description="Largest image of a stream or url upload"
    )
    upload_retention: float = Field(
        default=3 * 24 * 3600, gt=0, description="Seconds an uploaded file is kept"
    )
    result_retention: float | None = Field(
        default=30 * 24 * 3600,
        gt=0,
        description="Seconds a task's result files are kept after it ends; 'forever' keeps them",
    )

    # OpenAI's images API (POST /v1/images/...): see docs/openai-api.md.
    openai_wait: float = Field(
        default=300.0,
        gt=0,
        description="Seconds an OpenAI images request waits for its tasks; past it, 504 "
        "naming them",
    )
    openai_default_model: str = Field(
        default="flux-2-pro", description="The model of an OpenAI images request that names none"
    )
    openai_models: dict[str, str] = Field(
        default_factory=lambda: dict.fromkeys(OPENAI_IMAGE_MODELS, "flux-2-pro"),
        description="OpenAI model names and the fluxserve model each runs on; "
        "fluxserve's own names are accepted as well",
    )

    @field_validator("openai_default_model")
    @classmethod
    def _openai_default_known(cls, value: str) -> str:
        _known_models([value])
        return value

    @field_validator("openai_models")
    @classmethod
    def _openai_models_known(cls, value: dict[str, str]) -> dict[str, str]:
        _known_models(value.values())
        return value

    @field_validator("models", mode="before")
    @classmethod
    def _route_every_model(cls, value: object) -> object:
        # A TOML file that routes one model keeps the defaults of the other three.
        if not isinstance(value, dict):
            return value
        _known_models(value)
        return {**{model: {} for model in MODELS}, **value}

    @field_validator("bfl_models", mode="before")
    @classmethod
    def _route_every_bfl_path(cls, value: object) -> object:
        # A TOML file that maps one path keeps the defaults of the others.
        if not isinstance(value, dict):
            return value
        unknown = sorted(set(value) - set(BFL_PATHS))
        if unknown:
            raise ValueError(
                f"unknown BFL path {unknown[0]!r}; the paths are {', '.join(BFL_PATHS)}"
            )
        return {**default_bfl_routes(), **value}

    @model_validator(mode="after")
    def _bfl_routes_every_model(self) -> Settings:
        # So that each route answers `takes_loras` as this process will run it.
        if self.engine == "bfl":
            upstream = {"engine": "bfl"}
            self.models = {name: r.model_copy(update=upstream) for name, r in self.models.items()}
        return self

    @field_validator("prices")
    @classmethod
    def _price_known_models(cls, value: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
        _known_models(value)
        if any(price < 0 for table in value.values() for price in table.values()):
            raise ValueError("prices must be >= 0 credits")
        return value

    @field_validator("ready_requires_models")
    @classmethod
    def _ready_known_models(cls, value: list[str]) -> list[str]:
        _known_models(value)
        return value

    def price(self, model: str, resolution: str, loras: int = 0) -> int:
        """The credits a task of `model` at `resolution` with `loras` LoRAs costs; 0 where
        no price is set."""
        base: int = self.prices.get(model, {}).get(resolution, 0)  # type: ignore[call-overload]
        return base + loras * self.lora_price

    @field_validator("result_retention", mode="before")
    @classmethod
    def _forever_is_none(cls, value: object) -> object:
        # Environment variables and TOML have no null: they spell it "forever".
        if isinstance(value, str) and value.strip().lower() == "forever":
            return None
        return value

    @field_validator("sqlite_synchronous", mode="before")
    @classmethod
    def _synchronous_any_case(cls, value: object) -> object:
        # SQLite's own documentation spells the modes in capitals.
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("callback_retry_delays")
    @classmethod
    def _delays_non_negative(cls, value: list[float]) -> list[float]:
        if any(delay < 0 for delay in value):
            raise ValueError("retry delays must be >= 0 seconds")
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_file = os.environ.get("FLUXSERVE_CONFIG")
        if config_file:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=Path(config_file)))
        return tuple(sources)

    @property
    def base_url(self) -> str:
        """The public base URL, without a trailing slash."""
        if self.public_url:
            return self.public_url.rstrip("/")
        return f"http://{self.host}:{self.port}"

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'fluxserve.db'}"

    @property
    def files_dir(self) -> Path:
        return self.data_dir / "files"

    @property
    def resolved_lora_dir(self) -> Path:
        return self.lora_dir if self.lora_dir is not None else self.data_dir / "loras"

    @property
    def lora_cache_dir(self) -> Path:
        """Where LoRAs fetched from URLs are kept, by content hash."""
        return self.data_dir / "lora-cache"


def _known_models(names: Iterable[str]) -> None:
    unknown = sorted(set(names) - set(MODELS))
    if unknown:
        raise ValueError(f"unknown model {unknown[0]!r}; the models are {', '.join(MODELS)}")
