"""Every key of every screen (also in docs/tui.md)."""
from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Markdown

KEYS = """\
# Keys

**Everywhere**: `?` this help · `ctrl+p` command palette (every action) · `ctrl+t` next theme · `escape` back · `q` quit

**Studies**: `enter` open the dashboard · `n` new study · `f` forget sets · `e` export ·
`p` pause / resume · `c` cancel (asks) · `d` delete a finished study (asks) · `/` filter · `escape` clear the filter

**Dashboard**: arrows walk the heatmap's cells · `tab` next heatmap or panel · `enter` open the cell's trial ·
`space` mark a cell for compare · `C` compare marked cells · `m` next metric · `M` previous metric ·
`s` sort the trial table by the next column · `r` reverse the sort · `o` only successes · `l` log tail of the highlighted run ·
`e` export · `p` pause / resume · `c` cancel

**Trial**: `y` copy the reproduce command · `e` export · `r` reload · `escape` back

**Compare**: `escape` back

**Forget sets**: `enter` on a tree entry fills the source field · `r` next role · `x` remove a source · `ctrl+s` save · `escape` back

**New study**: `enter` in the model field checks it · `ctrl+l` launch · `escape` back

**Export**: `y` / `n` overwrite or keep an existing file · `escape` close

Every action is also a command: `unlearn study ls|status|heatmap|pause|resume|cancel|rm`,
`unlearn forgetset create`, `unlearn study create` + `unlearn study run --detach`, `unlearn export`.
"""


class HelpScreen(ModalScreen):
    DEFAULT_CSS = """
    HelpScreen { align: center middle; }
    HelpScreen > VerticalScroll { width: 90%; max-width: 110; height: 90%; border: thick $primary;
                                  background: $surface; padding: 0 1; }
    """
    BINDINGS = [Binding("escape,q,question_mark", "app.pop_screen", "close")]

    def compose(self) -> ComposeResult:
        with VerticalScroll():
            yield Markdown(KEYS)
