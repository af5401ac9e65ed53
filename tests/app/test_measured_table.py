"""A row drawn before the table measured it is drawn again at its measured width."""
from __future__ import annotations

import asyncio

from textual.app import App, ComposeResult

from tui.app.widgets.table import MeasuredTable


class OneTable(App):
    # a fixed size, as in the app's screens: a table that grew with its rows would be resized, and
    # a resize alone draws it again
    CSS = "MeasuredTable { width: 100%; height: 100%; }"

    def compose(self) -> ComposeResult:
        yield MeasuredTable(id="t")


def _line(table, y: int) -> str:
    return table.render_line(y).text


def test_a_row_drawn_before_it_was_measured_shows_its_full_width():
    async def go():
        app = OneTable()
        async with app.run_test(size=(40, 5)) as pilot:
            table = app.query_one(MeasuredTable)
            table.add_column("lr", key="lr")
            table.add_row("1e-03", key="a")
            early = _line(table, 1)  # a frame that lands before the idle pass measures the row
            await pilot.pause(0.2)
            await pilot.pause()
            return early, _line(table, 1)

    early, late = asyncio.run(go())
    assert "1e-03" not in early  # drawn at the label's width: the situation this table repairs
    assert "1e-03" in late
