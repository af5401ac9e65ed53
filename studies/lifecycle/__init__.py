"""A study's lifecycle: its spec (model, forget set, methods, search space, run settings), creating
it, changing its state (pause, resume, cancel, delete) and the demo's ready-made study."""
