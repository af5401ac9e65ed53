"""The app's tests: fixtures they share (the model and forget-set fixtures are in tests/conftest.py)."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def store(sweeps_store):
    """The store the app's screens open: the two sweeps of tests/app/app_stores.py, one per test
    module (tests/conftest.py's sweeps_store). A module that needs another store overrides this."""
    return sweeps_store
