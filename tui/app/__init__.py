"""The terminal app (Textual): the second face of unlearn-lab over the same studies API as the CLI.

Never in this process: training, model loading, evaluation, or an import of torch, transformers,
accelerate, datasets or scikit-learn (tests/test_import_hygiene.py). Work that needs them runs in
a subprocess, through the same code as the matching CLI command."""
