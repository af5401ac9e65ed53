"""Messages that travel up from screens and widgets to the app, which owns navigation
(attributes down, messages up: a screen never pushes another screen's sibling itself)."""
from __future__ import annotations

from dataclasses import dataclass

from textual.message import Message


@dataclass(frozen=True)
class CellRef:
    """One cell of a study: (method, lr, steps)."""

    study: str
    method: str
    lr: float
    steps: int


class OpenStudy(Message):
    """Open a study's dashboard."""

    def __init__(self, study: str) -> None:
        super().__init__()
        self.study = study


class OpenTrial(Message):
    """Open the trial detail of one cell."""

    def __init__(self, cell: CellRef) -> None:
        super().__init__()
        self.cell = cell


class CompareCells(Message):
    """Compare two or more cells side by side."""

    def __init__(self, cells: list[CellRef]) -> None:
        super().__init__()
        self.cells = list(cells)


class ExportRequested(Message):
    """Open the export dialog for a study (optionally starting from one cell)."""

    def __init__(self, study: str, cell: CellRef | None = None) -> None:
        super().__init__()
        self.study = study
        self.cell = cell


class StudyAction(Message):
    """pause / resume / cancel / delete a study (the app asks before cancel and delete)."""

    def __init__(self, verb: str, study: str) -> None:
        super().__init__()
        self.verb = verb
        self.study = study
