"""`unlearn tui` (and bare `unlearn` in a terminal): open the terminal app."""
from __future__ import annotations

from typing import Optional

import typer

from tui.cli.common import Storage, lab


def tui_cmd(
    ctx: typer.Context,
    storage: Storage = None,
    refresh: float = typer.Option(1.0, "--refresh", min=0.2, max=2.0, help="seconds between live refreshes (0.2–2)"),
    theme: Optional[str] = typer.Option(None, "--theme", help="textual-dark, textual-light, ansi-dark or ansi-light "
                                                                 "(default: the one chosen in settings)"),
):
    """Open the app: studies, live heatmaps, trials, forget sets, new studies, export.
    Closing it (or losing the SSH session) never stops a study."""
    from engine.errors import UnlearnError
    from tui.app.app import THEMES, UnlearnApp

    if theme is not None and theme not in THEMES:
        raise UnlearnError(f"unknown theme {theme!r}; one of: {', '.join(THEMES)}")
    # The settings (and the store) are resolved by the app after its first frame.
    UnlearnApp(lab(ctx).storage_flag, refresh_s=refresh, theme=theme).run()
