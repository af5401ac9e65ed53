"""The engine's tests: fixtures they share (the model and forget-set fixtures are in tests/conftest.py)."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def baseline(tiny_model_dir, tiny_sets):
    """θ0's metrics on the four sets (engine.evaluate.evaluate of the tiny model as saved): the
    baseline a run is scored against. Read only."""
    from engine.evaluate import evaluate
    from engine.models import load_model

    return evaluate(load_model(str(tiny_model_dir)), tiny_sets)[0]
