"""The app's own settings (UNLEARN_THEME, from the environment or `.env`), beside the lab's
(studies/settings.py: the store, UNLEARN_HOME, the heartbeat timeout), which the app reads too.

Resolved once, in the worker that opens the store: pydantic-settings costs a third of a second
to import, which the first frame does not wait for (tui/app/prefs.py reads the theme the quick way
for it)."""
from __future__ import annotations

from functools import lru_cache
from typing import Optional

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class AppSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="UNLEARN_", env_file=".env", extra="ignore")

    theme: Optional[str] = Field(None, description="the app's theme: textual-dark, textual-light, ansi-dark, ansi-light")


@lru_cache(maxsize=1)
def app_settings() -> AppSettings:
    return AppSettings()
