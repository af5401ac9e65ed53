"""Settings: flags first, then UNLEARN_* environment variables, then `.env` (design §7).

Secrets are not settings: HF_TOKEN is read by huggingface_hub from the environment only and
never copied into the store or an export."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="UNLEARN_", env_file=".env", extra="ignore")

    storage_url: str = Field("sqlite:///unlearn.db", description="SQLAlchemy URL of the store")
    home: Path = Field(Path.home() / ".cache" / "unlearn-lab", description="caches, logs, exported models")
    heartbeat_timeout: float = Field(60.0, description="seconds without a heartbeat before a run is declared lost")
    theme: Optional[str] = Field(None, description="the app's theme: textual-dark, textual-light, ansi-dark, ansi-light")

    @field_validator("home", mode="after")
    @classmethod
    def _expand(cls, v: Path) -> Path:
        return v.expanduser()

    @property
    def baseline_cache(self) -> Path:
        return self.home / "baselines"


def get_settings() -> Settings:
    return Settings()
