"""The app's own preferences (the theme chosen in settings), kept in UNLEARN_HOME/tui.json.
UNLEARN_THEME (or .env) wins over the saved choice."""
from __future__ import annotations

import json


def _path():
    from engine.settings import get_settings

    return get_settings().home / "tui.json"


def load() -> dict:
    from engine.settings import get_settings

    try:
        saved = json.loads(_path().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        saved = {}
    theme = get_settings().theme
    return {**saved, **({"theme": theme} if theme else {})}


def save(values: dict) -> None:
    from engine.files import write_text_atomic

    path = _path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        old = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
        write_text_atomic(path, json.dumps({**old, **values}, indent=1))
    except (OSError, ValueError):
        pass  # a read-only home only loses the preference, never the app
