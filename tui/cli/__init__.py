"""The command-line face of unlearn-lab (Typer). The terminal app is the other face, in tui/app/;
both call the same studies API and neither imports the other's framework."""
from tui.cli.main import app, main

__all__ = ["app", "main"]
