"""studies.reading.views.StudyWatch keeps a study's cells between polls and rebuilds only the runs that moved:
after every poll, what it hands out (cells in order, grids, the picker's metrics, the changed keys)
must equal a rebuild from scratch (load_cells, grids, study_metrics) and a fresh watch's first poll.

Real stores (tests/app/app_stores.py: real SQLite, real Optuna trials through record_cell, synthetic
metrics), changed the way the scheduler and the workers change them: milestones, run states,
attempts, a TPE reservation that becomes a run, a diverged run, a failed run retried, a milestone
off the spec's steps, a run that goes."""
from __future__ import annotations

import copy
import datetime as dt

from sqlmodel import select

from engine.methods.base import variant_id
from studies.lifecycle.spec import StudySpec
from studies.lifecycle.study import create_study, resume_study
from studies.reading.grid import grids, load_cells, study_metrics
from studies.reading.views import StudyWatch, _signature
from studies.running.recorder import record_cell
from studies.store.db import CellRow, Run, Store, Study
from studies.store.states import RunState, StudyState
from tests.app.app_stores import make_study, synthetic_cell
from tests.studies_helpers import runs_of, set_run

MODEL = "test-org/tiny-model"  # a hub-style id: nothing here loads a model


class Checked:
    """A watch whose every poll is compared with a rebuild from scratch."""

    def __init__(self, store: Store, name: str) -> None:
        self.store, self.name = store, name
        self.watch = StudyWatch(store, name)
        self.signatures: dict = {}
        self.handed_out: list[tuple[dict, dict]] = []  # (grids, a deep copy of them when handed out)

    def poll(self):
        poll = self.watch.poll()
        cells = load_cells(self.store, self.name)
        keys = [(c.method, c.lr, c.steps) for c in cells]
        assert [(c.method, c.lr, c.steps) for c in poll.cells] == keys  # the order of cells_from_rows
        assert poll.cells == cells
        expected = grids(cells)
        assert list(poll.grids) == list(expected) and poll.grids == expected
        for method, grid in poll.grids.items():
            assert list(grid.cells) == list(expected[method].cells)
        assert poll.metrics == study_metrics(poll.study.spec, cells)
        assert StudyWatch(self.store, self.name).poll().cells == poll.cells  # a fresh watch agrees
        now = {k: _signature(c) for k, c in zip(keys, cells)}
        assert poll.changed == {k for k, sig in now.items() if self.signatures.get(k) != sig} | (
            self.signatures.keys() - now.keys())
        self.signatures = now
        for handed, snapshot in self.handed_out:  # what was handed out before is never changed
            assert handed == snapshot
        self.handed_out.append((poll.grids, copy.deepcopy(poll.grids)))
        return poll


def set_study_state(store: Store, name: str, state: StudyState) -> None:
    with store.write() as s:
        st = s.exec(select(Study).where(Study.name == name)).one()
        st.state = state
        s.add(st)


def record(store: Store, name: str, run: Run, step: int, diverge_after: int | None = None, **extra) -> None:
    spec = StudySpec.from_dict(store.study(name).spec)
    methods = list(spec.methods)
    base = run.method.split("[")[0]
    cell = {**synthetic_cell(methods.index(base) if base in methods else 0, 1, step, diverge_after), **extra}
    record_cell(store, name, spec, run, cell)


def run_at(store: Store, name: str, method: str, lr: float) -> Run:
    return next(r for r in runs_of(store, name) if r.method == method and r.lr == lr)


def test_grid_study_polls_equal_a_rebuild(store):
    make_study(store, "grid", MODEL, "fs", methods=("ga", "ga_gd"), lrs=(1e-5, 1e-4, 1e-3),
               steps=(5, 10, 20), fill=0.34, running=1)
    w = Checked(store, "grid")
    first = w.poll()
    assert len(first.cells) == 18 and first.changed == set(w.signatures)
    assert not first.state_changed and first.new_milestones > 0

    quiet = w.poll()  # nothing moved: the same cells and grids, nothing changed
    assert quiet.changed == set() and quiet.new_milestones == 0
    assert quiet.cells is first.cells and quiet.grids is first.grids

    live = next(r for r in runs_of(store, "grid") if r.state == RunState.RUNNING)
    record(store, "grid", live, 10)
    poll = w.poll()
    assert poll.changed == {(live.method, live.lr, 10)} and poll.new_milestones == 1
    untouched = next(m for m in poll.grids if m != live.method)
    assert poll.grids[untouched] is first.grids[untouched]  # an unchanged method keeps its Grid

    # a milestone and the run finishing in one poll, while another run starts (attempt 1)
    pending = [r for r in runs_of(store, "grid") if r.state == RunState.PENDING]
    record(store, "grid", live, 20)
    set_run(store, live.id, state=RunState.DONE, step=20)
    set_run(store, pending[0].id, state=RunState.RUNNING, attempts=1, step=0, heartbeat=dt.datetime.now(dt.timezone.utc))
    poll = w.poll()
    assert {(live.method, live.lr, 20), (pending[0].method, pending[0].lr, 5)} <= poll.changed
    assert [r["lr"] for r in poll.running] == [pending[0].lr]

    # only the step (a heartbeat's progress) and the attempts move: the cells stay as they are
    before = w.handed_out[-1][0]
    set_run(store, pending[0].id, step=3, attempts=2)
    poll = w.poll()
    assert poll.changed == set() and poll.grids is before and poll.running[0]["step"] == 3

    # the started run diverges after its first milestone; the next one fails for good
    record(store, "grid", pending[0], 5)
    set_run(store, pending[0].id, state=RunState.DIVERGED, step=7)
    set_run(store, pending[1].id, state=RunState.FAILED, attempts=2)
    poll = w.poll()
    statuses = {(c.lr, c.steps): str(c.status) for c in poll.cells if c.method == pending[0].method}
    assert statuses[(pending[0].lr, 10)] == "diverged" and statuses[(pending[0].lr, 20)] == "diverged"
    assert {str(c.status) for c in poll.cells if (c.method, c.lr) == (pending[1].method, pending[1].lr)} == {"failed"}

    # the failed run is queued again (a resume with --retry-failed)
    resume_study(store, "grid", retry_failed=True)
    poll = w.poll()
    assert {(pending[1].method, pending[1].lr, s) for s in (5, 10, 20)} <= poll.changed

    # a cell with benchmark figures: the picker's metrics grow
    set_run(store, pending[1].id, state=RunState.RUNNING, attempts=1)
    record(store, "grid", pending[1], 5, bench={"tofu_truth_ratio": 0.6}, downstream={"arc_easy": 0.4})
    poll = w.poll()
    assert "bench.tofu_truth_ratio" in poll.metrics and "downstream.arc_easy" in poll.metrics

    # a milestone at a step the spec does not list (its row only: Optuna's steps distribution
    # would refuse the trial): a new column for every row
    with store.write() as s:
        cell = synthetic_cell(1, 1, 15)
        s.add(CellRow(run_id=pending[1].id, step=15, metrics=cell, score=cell["score"], success=cell["success"]))
    poll = w.poll()
    assert sorted({c.steps for c in poll.cells}) == [5, 10, 15, 20] and len(poll.cells) == 24

    # a pending run without milestones goes: its (method, lr) stays in the grid, run-less
    gone = next(r for r in runs_of(store, "grid") if r.state == RunState.PENDING)
    with store.write() as s:
        s.delete(s.get(Run, gone.id))
    poll = w.poll()
    assert all(c.run_id is None for c in poll.cells if (c.method, c.lr) == (gone.method, gone.lr))

    # a milestone seen before record_cell wrote its trial number (it writes the row first, the
    # number a moment later): the next poll shows the number
    live = next(r for r in runs_of(store, "grid") if r.state in (RunState.RUNNING, RunState.PENDING))
    with store.write() as s:
        cell = synthetic_cell(0, 1, 10)
        s.add(CellRow(run_id=live.id, step=10, metrics=cell, score=cell["score"], success=cell["success"]))
    poll = w.poll()
    assert next(c for c in poll.cells if (c.method, c.lr, c.steps) == (live.method, live.lr, 10)).trial_number is None
    with store.write() as s:
        ms = s.exec(select(CellRow).where(CellRow.run_id == live.id, CellRow.step == 10)).one()
        ms.trial_number = 999
        s.add(ms)
    poll = w.poll()
    assert poll.changed == {(live.method, live.lr, 10)} and poll.new_milestones == 0
    assert next(c for c in poll.cells if (c.method, c.lr, c.steps) == (live.method, live.lr, 10)).trial_number == 999

    # every run finishes, then the study: `finished` once
    for r in runs_of(store, "grid"):
        if r.state in (RunState.RUNNING, RunState.PENDING):
            set_run(store, r.id, state=RunState.DONE, step=20)
    set_study_state(store, "grid", StudyState.DONE)
    poll = w.poll()
    assert poll.state_changed and poll.finished
    assert not w.poll().finished


def test_tpe_study_polls_equal_a_rebuild(store):
    create_study(store, "tpe", MODEL, "fs", methods=["ga", "npo"], steps=[5, 10], lr_range=(1e-5, 1e-2),
                 sampler="tpe", trials=6, knobs={"beta": {"low": 0.05, "high": 0.5, "log": True}})
    set_study_state(store, "tpe", StudyState.RUNNING)
    study_id = store.study("tpe").id
    w = Checked(store, "tpe")
    assert w.poll().cells == []

    # a reservation while the sampler is asked is not a run: it never shows
    with store.write() as s:
        slot = Run(study_id=study_id, method="", lr=-0.5, state=RunState.ASKING, host="h", pid=1)
        s.add(slot)
        s.flush()
        slot_id = slot.id
    poll = w.poll()
    assert poll.cells == [] and poll.changed == set()

    # ... until the sampler names it: a new run, running
    set_run(store, slot_id, method="ga", lr=1e-3, state=RunState.RUNNING, attempts=1, step=0)
    poll = w.poll()
    assert [(c.lr, c.steps, str(c.status)) for c in poll.cells] == [(1e-3, 5, "running"), (1e-3, 10, "running")]
    record(store, "tpe", run_at(store, "tpe", "ga", 1e-3), 5)
    w.poll()

    # two more runs in one poll: a variant sampled from the knob range (not a spec method: last),
    # and a lower lr of a method already there (a row before the first one)
    npo = variant_id("npo", {"beta": 0.2})
    with store.write() as s:
        s.add(Run(study_id=study_id, method=npo, lr=5e-4, state=RunState.RUNNING, attempts=1))
        s.add(Run(study_id=study_id, method="ga", lr=2e-5, state=RunState.PENDING))
    poll = w.poll()
    assert [(c.method, c.lr) for c in poll.cells[::2]] == [("ga", 2e-5), ("ga", 1e-3), (npo, 5e-4)]
    assert list(poll.grids) == ["ga", npo]

    # the variant diverges after its first milestone; the first run finishes
    variant = run_at(store, "tpe", npo, 5e-4)
    record(store, "tpe", variant, 5)
    record(store, "tpe", variant, 10, diverge_after=5)
    set_run(store, variant.id, state=RunState.DIVERGED, step=10)
    record(store, "tpe", run_at(store, "tpe", "ga", 1e-3), 10)
    set_run(store, slot_id, state=RunState.DONE, step=10)
    poll = w.poll()
    assert [str(c.status) for c in poll.cells if c.method == npo] == ["done", "diverged"]
    assert {(npo, 5e-4, 5), (npo, 5e-4, 10), ("ga", 1e-3, 10)} <= poll.changed

    # a run that goes (its row deleted): its cells leave the list and are reported changed
    pending = run_at(store, "tpe", "ga", 2e-5)
    with store.write() as s:
        s.delete(s.get(Run, pending.id))
    poll = w.poll()
    assert poll.changed == {("ga", 2e-5, 5), ("ga", 2e-5, 10)} and len(poll.cells) == 4
