"""The faces of unlearn-lab: the Typer CLI (and, later, the Textual app)."""
