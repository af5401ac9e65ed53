"""The lab's settings: command-line flags first, then UNLEARN_* environment variables, then `.env`
in the working folder. Each default is written here and nowhere else.

Secrets are not settings: HF_TOKEN is read by huggingface_hub from the environment only and
never copied into the store or an export. The app's own settings (its theme) live in
tui/app/settings.py."""
from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class LabSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="UNLEARN_", env_file=".env", extra="ignore")

    storage_url: str = Field("sqlite:///unlearn.db", description="SQLAlchemy URL of the store")
    home: Path = Field(Path.home() / ".cache" / "unlearn-lab", description="caches, logs, exported models")
    heartbeat_timeout: float = Field(60.0, description="seconds without a heartbeat before a run is declared lost")
    node: str = Field(default_factory=lambda: os.uname().nodename,
                      description="the name this node goes by in the store (default: its host name); set it where "
                                  "nodes share one host name, as containers may")

    @field_validator("home", mode="after")
    @classmethod
    def _expand(cls, v: Path) -> Path:
        return v.expanduser()

    @property
    def baseline_cache(self) -> Path:
        return self.home / "baselines"


@lru_cache(maxsize=1)
def lab_settings() -> LabSettings:
    """This process's settings, resolved once (a pool asks on every tick). A command given a flag
    (`--storage`) builds its own LabSettings with it instead (tui/cli/common.py)."""
    return LabSettings()
