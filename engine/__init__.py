"""The science of unlearn-lab: data, models, methods, evaluation and one run.

Headless by design: nothing here imports textual, the TUI, or the studies layer
(tests/test_import_hygiene.py proves it), so a run works the same from the CLI,
a worker subprocess, or a notebook.
"""
