"""One settings object, read from `FLUXSERVE_*` variables and an optional TOML file.

Precedence, highest first: values passed in code (the CLI's flags), environment
variables, the TOML file named by `FLUXSERVE_CONFIG`, the defaults below.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

EngineName = Literal["tiny"]


class Settings(BaseSettings):
    """Everything an operator can set; see the README's settings table."""

    model_config = SettingsConfigDict(env_prefix="FLUXSERVE_", extra="forbid")

    data_dir: Path = Field(default=Path("data"), description="SQLite file and result files")
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    public_url: str | None = Field(
        default=None, description="Base of every file_url; defaults to http://host:port"
    )
    database_url: str | None = Field(
        default=None, description="sqlite:///path; defaults to data_dir/fluxserve.db"
    )
    engine: EngineName = "tiny"
    tiny_steps: int = Field(default=4, ge=1, le=50)
    allow_private_networks: bool = False

    callback_timeout: float = Field(default=10.0, gt=0)
    callback_retry_delays: list[float] = Field(default=[1.0, 2.0, 4.0])
    callback_concurrency: int = Field(default=16, ge=1)

    fetch_timeout: float = Field(default=20.0, gt=0)
    max_reference_bytes: int = Field(default=20 * 1024 * 1024, gt=0)
    max_reference_pixels: int = Field(default=64 * 1024 * 1024, gt=0)

    lease_seconds: float = Field(default=60.0, gt=0)
    max_attempts: int = Field(default=3, ge=1)
    poll_interval: float = Field(default=2.0, gt=0)

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
