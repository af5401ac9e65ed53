"""Settings: the theme (dark, light, and ansi-dark / ansi-light for 16-colour terminals)."""
from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Label, OptionList


class SettingsScreen(ModalScreen[str | None]):
    DEFAULT_CSS = """
    SettingsScreen { align: center middle; }
    SettingsScreen > Vertical { width: 50; max-width: 100%; height: auto; border: thick $primary;
                                background: $surface; padding: 1 2; }
    SettingsScreen OptionList { height: auto; }
    """
    BINDINGS = [Binding("escape", "dismiss(None)", "close")]

    def __init__(self, current: str, themes: tuple[str, ...]) -> None:
        super().__init__()
        self.current, self.themes = current, themes

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label("Theme (saved for next time; UNLEARN_THEME overrides it)")
            yield OptionList(*self.themes, id="themes")

    def on_mount(self) -> None:
        options = self.query_one("#themes", OptionList)
        options.highlighted = self.themes.index(self.current) if self.current in self.themes else 0
        options.focus()

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(self.themes[event.option_index])
