"""The lab's tests: fixtures they share (the model and forget-set fixtures, and the two sweeps'
store, are in tests/conftest.py)."""
from __future__ import annotations

import pytest


@pytest.fixture
def store(tmp_path, forget_set_files):
    """A fresh SQLite store (lab.db in the test's folder) with the forget set `fs`: the four
    files of tests/conftest.py, at the tiny model's sequence length."""
    from studies.store.db import Store
    from tests.studies_helpers import make_forget_set

    store = Store(f"sqlite:///{tmp_path / 'lab.db'}")
    make_forget_set(store, "fs", forget_set_files)
    return store

