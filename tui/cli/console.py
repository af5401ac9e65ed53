"""What every command shares: the two consoles, JSON output, the step progress bar (values are
parsed in studies/lifecycle/inputs.py, which the app shares).

Kept apart from tui/cli/main.py so command modules import it without a cycle through the app."""
from __future__ import annotations

import json
import sys

from rich.console import Console

err = Console(stderr=True)
out = Console()


def emit_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, allow_nan=False, default=str) + "\n")


class step_progress:
    """A Rich progress bar on stderr fed by the engine's on_step callback."""

    def __init__(self, label: str, total: int):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("loss {task.fields[loss]}"), TimeRemainingColumn(), console=err, transient=True)
        self.label, self.total = label, total

    def __enter__(self):
        self.progress.start()
        task = self.progress.add_task(self.label, total=self.total, loss="—")
        return lambda step, loss: self.progress.update(task, completed=step, loss=f"{loss:.3f}")

    def __exit__(self, *exc):
        self.progress.stop()
