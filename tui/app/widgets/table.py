"""A DataTable whose rows are drawn again once their columns have been measured.

Textual's DataTable measures new rows and changed cells when it is next idle, but it caches each
row's drawing under a key that holds no column width. A row drawn between `add_row` and that idle
pass (likely on a busy machine, where a frame lands first) keeps its label-wide columns — `lr`
cut to "1e" — until something else invalidates the cache. After the idle pass this table drops
its drawings when any column's width changed, so what is shown is what was measured."""
from __future__ import annotations

from textual import events
from textual.widgets import DataTable


class MeasuredTable(DataTable):
    def _widths(self) -> list[int]:
        return [column.get_render_width(self) for column in self.ordered_columns]

    async def _on_idle(self, event: events.Idle) -> None:
        before = self._widths()
        await super()._on_idle(event)
        if self._widths() != before:
            self._clear_caches()  # DataTable's own invalidation (private: no public one exists)
