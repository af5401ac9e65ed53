"""PostgreSQL races in the run lifecycle (READ COMMITTED lets two transactions read the same
thing and both act on it): a TPE study's budget is counted and reserved under the study row's
lock, so pools asking at once fill it exactly. Without the lock every pool counted the same runs:
each reserved a slot past the budget's count, and (the sampler seeded by that count) all sampled the
same cell, so all but one were dropped as repeats: budgets overshot or asks wasted, by timing."""
from __future__ import annotations

import threading

import pytest
from sqlmodel import select

from studies.lifecycle.spec import study_spec
from studies.lifecycle.study import create_study
from studies.running import tpe
from studies.store.db import Run, Store
from tests.studies_helpers import HUB_MODEL, make_forget_set

POOLS, BUDGET = 8, 3

pytestmark = pytest.mark.xdist_group("postgresql")


def ask_at_once(url: str, study, spec) -> list[str]:
    """POOLS pools (each its own Store, as on its own node) ask the study's sampler at the same
    moment; the errors they met."""
    stores = [Store(url, create=False) for _ in range(POOLS)]
    start, errors = threading.Barrier(POOLS), []

    def pool(i: int) -> None:
        start.wait()
        try:
            tpe.ask(stores[i], study, spec, f"node-{i}")
        except Exception as exc:  # noqa: BLE001 - every pool's failure is reported
            errors.append(f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=pool, args=(i,)) for i in range(POOLS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    for st in stores:
        st.engine.dispose()
    return errors


def test_pools_asking_a_tpe_study_at_once_fill_its_budget_exactly(pg_database, forget_set_files):
    url, _ = pg_database
    store = Store(url)
    make_forget_set(store, "fs", forget_set_files)
    study = create_study(store, "T", HUB_MODEL, "fs", methods=["ga", "npo"], lr_range=(1e-5, 1e-2), steps=[2],
                         sampler="tpe", trials=BUDGET)
    spec = study_spec(study)
    off_budget = []
    for _ in range(3):  # the race needs the transactions to overlap: try a few times
        assert ask_at_once(url, study, spec) == []
        with store.write() as s:
            runs = s.exec(select(Run).where(Run.study_id == study.id)).all()
            off_budget.append(len(runs) - BUDGET)
            for run in runs:  # the budget back, for the next try
                s.delete(run)
    store.engine.dispose()
    assert off_budget == [0, 0, 0]
