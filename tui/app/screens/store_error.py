"""A store that cannot be opened: the one-line reason, and a way to pick another (or, when the
SQLite file does not exist yet, to create it)."""
from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import Screen
from textual.widgets import Button, Footer, Input, Label, Static


class StoreErrorScreen(Screen[tuple[str, bool] | None]):
    """Dismisses with (url, create) to try again, or None to quit."""

    DEFAULT_CSS = """
    StoreErrorScreen { align: center middle; }
    StoreErrorScreen > Vertical { width: 90%; max-width: 100; height: auto; border: thick $error; padding: 1 2; }
    StoreErrorScreen #reason { color: $error; margin-bottom: 1; }
    StoreErrorScreen Horizontal { height: auto; margin-top: 1; }
    StoreErrorScreen Button { margin-right: 2; }
    """
    BINDINGS = [Binding("escape", "quit", "quit")]

    def __init__(self, url: str, reason: str, missing: bool) -> None:
        super().__init__()
        self.url, self.reason, self.missing = url, reason, missing

    def compose(self) -> ComposeResult:
        from studies.store.db import describe_url

        with Vertical():
            yield Static("The store cannot be opened", classes="title")
            yield Label(self.reason, id="reason")
            yield Label("Another store: a SQLAlchemy URL (sqlite:///path.db, postgresql://user@host/db) or a .db path. "
                        "Put a password in UNLEARN_STORAGE_URL or .env rather than here.")
            yield Input(value="" if "@" in self.url else describe_url(self.url), id="url",
                        placeholder="sqlite:///unlearn.db")
            with Horizontal():
                yield Button("Open (enter)", variant="primary", id="open")
                if self.missing:
                    yield Button("Create it", id="create")
                yield Button("Quit (escape)", id="quit")
        yield Footer()

    def _url(self) -> str:
        text = self.query_one("#url", Input).value.strip()
        return text if "://" in text else f"sqlite:///{text}"

    def on_input_submitted(self) -> None:
        self.dismiss((self._url(), False))

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "quit":
            self.dismiss(None)
        else:
            self.dismiss((self._url(), event.button.id == "create"))

    def action_quit(self) -> None:
        self.dismiss(None)
