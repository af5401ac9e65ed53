"""The lab: the SQLite/SQLAlchemy store beside Optuna's tables, forget sets, study specs, the
worker pool and its workers, grids and export. Never imports textual (a test proves it)."""
