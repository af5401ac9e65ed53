"""CLI command groups, one file per feature."""
