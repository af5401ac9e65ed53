"""The app's own preferences (the theme chosen in settings), kept in UNLEARN_HOME/tui.json.
UNLEARN_THEME wins over the saved choice.

Read without the settings machinery (pydantic-settings) so that the first frame does not wait for
it; the store's worker resolves the full settings (.env included) and corrects the theme if .env
names another."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional


def _path(home: Optional[Path] = None) -> Path:
    home = home or Path(os.environ.get("UNLEARN_HOME") or Path.home() / ".cache" / "unlearn-lab").expanduser()
    return home / "tui.json"


def load(home: Optional[Path] = None) -> dict:
    try:
        saved = json.loads(_path(home).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        saved = {}
    theme = os.environ.get("UNLEARN_THEME")
    return {**saved, **({"theme": theme} if theme else {})}


def save(values: dict, home: Optional[Path] = None) -> None:
    from engine.files import write_text_atomic

    path = _path(home)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        old = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
        write_text_atomic(path, json.dumps({**old, **values}, indent=1))
    except (OSError, ValueError):
        pass  # a read-only home only loses the preference, never the app
