"""What the live app reads, headless (no Textual here: the CLI and tests use it too).

`StudyWatch` follows one study incrementally: each poll reads the study row, its runs (one per
method × lr: a handful) and only the milestones newer than the last one seen, and reports which
cells changed, so a dashboard updates those cells and nothing else. It keeps the cells (and their
grids) between polls and rebuilds only the rows of the runs that moved: at 10,000 trials, a poll
after 100 new cells costs its three queries and those 100 cells, not 10,000.

`trial_page` is the trial table: sorting, filtering and paging happen in SQL, so a study of
10,000 trials never loads more than one page of them.
"""
from __future__ import annotations

import datetime as dt
import threading
from dataclasses import dataclass, field
from typing import Optional

from sqlalchemy import Float, and_, func
from sqlalchemy import cast as sa_cast
from sqlmodel import select

from engine.errors import UnlearnError
from engine.metric_registry import SCORE, every_run_paths
from engine.metric_registry import read as read_metric
from studies.lifecycle.spec import StudySpec, study_spec
from studies.reading.grid import (
    Cell,
    Grid,
    at_target_cells,
    check_metric,
    grids,
    row_cell,
    row_keys,
    row_order,
    runs_by_row,
    study_metrics,
)
from studies.store.clock import age_s
from studies.store.db import CellRow, Run, Store, Study, utcnow
from studies.store.states import REAL_RUN_STATES, RunState, StudyState

CellKey = tuple[str, float, int]  # (method, lr, steps)
RunKey = tuple[str, float]  # (method, lr): one run's row of cells


def _signature(c: Cell) -> tuple:
    """What a dashboard shows of a cell: when this changes, the cell is redrawn."""
    return (str(c.status), c.score, c.success, c.run_state, c.trial_number)


def _has_extra_metrics(c: Cell) -> bool:
    """A cell that adds to study_metrics beyond the spec's own: benchmark or downstream figures."""
    m = c.metrics
    return bool(m) and ("bench" in m or "downstream" in m)


# What a poll reads of a run (what its cells and running_runs show) and of a cell's row.
_RUN_COLUMNS = (Run.id, Run.method, Run.lr, Run.seed, Run.state, Run.step, Run.attempts, Run.device, Run.pid, Run.host,
                Run.heartbeat, Run.slurm_job)
_MILESTONE_COLUMNS = (CellRow.id, CellRow.run_id, CellRow.step, CellRow.metrics, CellRow.score,
                      CellRow.success, CellRow.diverged, CellRow.trial_number)


@dataclass
class Poll:
    study: Study
    cells: list[Cell]  # as load_cells lists them: method (spec order), lr, steps
    changed: set[CellKey]  # cells whose status or values changed since the previous poll, or that are gone
    new_milestones: int  # rows read this poll (0 when nothing new was written)
    running: list[dict]  # the running runs, as study_status(...)["running"] lists them
    state_changed: bool  # the study's state differs from the previous poll's
    finished: bool  # it became done during this watch (not merely done when the watch began)
    scheduler_alive_s_ago: Optional[float] = None
    # grids(cells), kept between polls: a method whose cells did not change keeps the very same Grid
    # object (so a reader may cache what it drew from it); none is changed once handed out.
    grids: dict[str, Grid] = field(default_factory=dict)
    # study_metrics(study.spec, cells): what a picker offers
    metrics: tuple[str, ...] = field(default_factory=every_run_paths)
    # per method and lr, the row's at-target cell (grid.load_at_target's cells), once reached
    at_target: dict[str, dict[float, Cell]] = field(default_factory=dict)


@dataclass
class StudyWatch:
    """Follows one study. The cells are kept between polls, per (method, lr) row: a poll rebuilds
    only the rows of runs with fresh milestones or a changed state, and of runs that appeared or
    went; a new steps column (a milestone off the spec's steps) or a changed spec rebuilds them all.
    A method's Grid is built again only when one of its rows was. What a poll hands out equals
    load_cells / grids / study_metrics read afresh, and is never changed afterwards (a dashboard
    reads it on another thread)."""

    store: Store
    name: str
    _runs: dict[int, Run] = field(default_factory=dict)  # the real runs, as rows of _RUN_COLUMNS
    _last_id: int = 0
    _ms_by_run: dict[int, dict[int, CellRow]] = field(default_factory=dict)  # run id -> step -> newest
    _untold: set[int] = field(default_factory=set)  # ids of milestones seen without a trial number yet
    _runs_seen: dict[int, tuple] = field(default_factory=dict)  # run id -> (state, step, attempts)
    _spec_dict: Optional[dict] = None
    _spec: Optional[StudySpec] = None
    _steps: list[int] = field(default_factory=list)
    _rows: dict[RunKey, list[Cell]] = field(default_factory=dict)  # in cell order
    _cells: dict[CellKey, tuple] = field(default_factory=dict)  # signatures
    _cells_list: Optional[list[Cell]] = None
    _grids: dict[str, Grid] = field(default_factory=dict)
    _metrics: tuple[str, ...] = field(default_factory=every_run_paths)
    _at_rows: dict[int, object] = field(default_factory=dict)  # run id -> its at-target cell row
    _at_target: dict[str, dict[float, Cell]] = field(default_factory=dict)
    _state: Optional[str] = None
    # One poll at a time: a dashboard's tick may start the next before a slow one ended (its
    # worker threads are not stopped), and a poll moves what the watch keeps.
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def poll(self) -> Poll:
        """One refresh: three small queries, the milestone one bounded by the last id seen."""
        with self._lock:
            return self._poll()

    def _poll(self) -> Poll:
        with self.store.read() as s:
            study = s.exec(select(Study).where(Study.name == self.name)).first()
            if study is None:
                raise UnlearnError(f"no study named {self.name!r} (deleted?)")
            # Plain rows of the columns read (not ORM objects: a run's result JSON is never parsed)
            runs = s.exec(select(*_RUN_COLUMNS).where(Run.study_id == study.id, Run.state.in_(REAL_RUN_STATES))).all()
            fresh = s.exec(select(*_MILESTONE_COLUMNS).join(Run, CellRow.run_id == Run.id)
                           .where(Run.study_id == study.id, CellRow.id > self._last_id)
                           .order_by(CellRow.id)).all()
            # record_cell writes a milestone, then its trial number a moment later: a row seen in
            # between is read again (by id) until it has one, or its cell would never show its trial
            told = (s.exec(select(*_MILESTONE_COLUMNS).where(CellRow.id.in_(self._untold)).order_by(CellRow.id)).all()
                    if self._untold else [])
            now = self.store.now(s)  # the clock heartbeats are written on
        old_runs = self._runs
        runs_now = {r.id: (r.state, r.step, r.attempts) for r in runs}
        self._untold &= {m.id for m in told}  # (a row deleted since is not looked for again)
        told = [m for m in told if m.trial_number is not None]
        quiet = (not fresh and not told and runs_now == self._runs_seen and study.spec == self._spec_dict
                 and self._cells_list is not None)
        self._runs = {r.id: r for r in runs}
        # A run's row of cells reads its state (and id) only: a step or an attempt more redraws nothing
        dirty: set[int] = {i for i, (state, _, _) in runs_now.items()
                           if (seen := self._runs_seen.get(i)) is None or seen[0] != state}
        dirty |= {i for i in self._runs_seen if i not in runs_now}  # gone (its rows: run-less, or none)
        self._runs_seen = runs_now
        for m in told:  # now with its trial number (unless a newer row of its (run, step) came since)
            self._untold.discard(m.id)
            by_step = self._ms_by_run.setdefault(m.run_id, {})
            if (held := by_step.get(m.step)) is None or held.id == m.id:
                by_step[m.step] = m
                dirty.add(m.run_id)
        grid_steps = {int(x) for x in study_spec(study).steps} if fresh else set()
        at_moved = False
        for m in fresh:  # in id order: the newest row of a (run, step) wins, as in cells_from_rows
            self._last_id = max(self._last_id, m.id)
            if (m.metrics or {}).get("at_target"):
                self._at_rows[m.run_id], at_moved = m, True  # the "at target" column's (grid.load_at_target)
                if m.step not in grid_steps:
                    continue  # between milestones: no column of the grid
            self._ms_by_run.setdefault(m.run_id, {})[m.step] = m
            if m.trial_number is None:
                self._untold.add(m.id)
            dirty.add(m.run_id)
        if quiet:  # nothing that draws a cell moved: skip rebuilding them (the common tick)
            changed: set[CellKey] = set()
        else:
            changed = self._update(study, old_runs, dirty)
        if at_moved or dirty:
            self._at_target = {}
            for c in at_target_cells(list(self._runs.values()), self._at_rows):
                self._at_target.setdefault(c.method, {})[c.lr] = c
        first = self._state is None
        state_changed = not first and study.state != self._state
        finished = state_changed and study.state == StudyState.DONE
        self._state = study.state
        return Poll(study, self._cells_list, changed, len(fresh), running_runs(study, list(self._runs.values()), now),
                    state_changed, finished, age_s(study.scheduler_heartbeat, now), self._grids, self._metrics,
                    self._at_target)

    # ------------------------------------------------------------ keeping the cells

    def _update(self, study: Study, old_runs: dict[int, Run], dirty: set[int]) -> set[CellKey]:
        """Rebuild the rows of the dirty runs (every row when the spec or the steps changed);
        the cells that changed, by key."""
        if study.spec != self._spec_dict:
            self._spec_dict, self._spec = study.spec, study_spec(study)
            full = True
        else:
            full = self._cells_list is None
        spec = self._spec
        steps = set(int(s) for s in spec.steps)
        for run_id in self._runs:  # a milestone off the spec's steps adds a column (real runs only)
            if (by_step := self._ms_by_run.get(run_id)) is not None and not steps.issuperset(by_step):
                steps.update(by_step)
        steps = sorted(steps)
        if steps != self._steps:
            self._steps, full = steps, True
        runs_by_key = runs_by_row(self._runs.values())
        keys = row_keys(spec, runs_by_key)
        if full:
            todo = keys
        else:
            todo = {(r.method, float(r.lr)) for i in dirty for r in (self._runs.get(i), old_runs.get(i)) if r is not None}
            todo = {k for k in todo if k in keys} | (keys - self._rows.keys())
        gone = self._rows.keys() - keys
        if not (full or todo or gone):  # runs moved, none in a way a cell shows: keep what was handed out
            return set()
        # study_metrics is read again only where a row that goes or is rebuilt had, or has, extra metrics
        extra = full or any(_has_extra_metrics(c) for key in todo | gone for c in self._rows.get(key, ()))
        changed: set[CellKey] = set()
        for key in gone:
            for c in self._rows.pop(key):
                ck = (c.method, c.lr, c.steps)
                changed.add(ck)
                self._cells.pop(ck, None)
        for key in todo:
            method, lr = key
            row_runs = runs_by_key.get(key, [])
            row = [row_cell(method, lr, step, row_runs, lambda run, st: self._ms_by_run.get(run.id, {}).get(st))
                   for step in self._steps]
            self._rows[key] = row
            for c in row:
                ck = (c.method, c.lr, c.steps)
                sig = _signature(c)
                if self._cells.get(ck) != sig:
                    changed.add(ck)
                    self._cells[ck] = sig
                extra = extra or _has_extra_metrics(c)
        if full:  # a column or row of the old grid that is no more
            now = {(m, lr, s) for m, lr in keys for s in self._steps}
            for ck in [k for k in self._cells if k not in now]:
                changed.add(ck)
                del self._cells[ck]
        ordered = sorted(self._rows, key=row_order(spec))
        self._cells_list = [c for k in ordered for c in self._rows[k]]
        touched = {k[0] for k in todo} | {k[0] for k in gone}
        methods = list(dict.fromkeys(k[0] for k in ordered))
        grids_now = {}
        for m in methods:
            g = self._grids.get(m)
            if g is None or m in touched or full:
                g = grids([c for k in ordered if k[0] == m for c in self._rows[k]])[m]
            grids_now[m] = g
        self._grids = grids_now
        if extra:
            try:
                self._metrics = study_metrics(study.spec, self._cells_list)
            except Exception:  # noqa: BLE001 - a spec this version cannot read: the plain metrics
                self._metrics = every_run_paths()
        return changed


def slurm_task_of(slurm_job: str | None) -> dict:
    """`ARRAYJOB_INDEX` (ul_run.slurm_job) as status shows it: the task's job id, its array's job id
    and its index (all None for a run no SLURM task claimed; a plain job has no index)."""
    array, _, index = (slurm_job or "").partition("_")
    return {"slurm_job": slurm_job, "slurm_array": array or None, "array_index": int(index) if index.isdigit() else None}


def running_runs(study: Study, runs: list[Run], now: Optional[dt.datetime] = None) -> list[dict]:
    """The running runs of a study in spec order (the same dicts as study_status's "running")."""
    methods = list(study_spec(study).methods)
    now = now or utcnow()
    return [{"run_id": r.id, "method": r.method, "lr": r.lr, "step": r.step, "device": r.device, "pid": r.pid, "host": r.host,
             "node": r.host, **slurm_task_of(r.slurm_job),
             "heartbeat_age_s": age_s(r.heartbeat, now), "attempts": r.attempts}
            for r in sorted(runs, key=lambda r: (methods.index(r.method) if r.method in methods else 99, r.lr))
            if r.state == RunState.RUNNING]


# ---------------------------------------------------------------- the trial table

def trial_columns() -> tuple[str, ...]:
    """What a trial row holds and can be sorted by: the run's keys and every metric every cell has."""
    return ("method", "lr", "steps", "trial") + every_run_paths() + ("success",)


_PLAIN_COLUMNS = {"method": Run.method, "lr": Run.lr, "steps": CellRow.step, "trial": CellRow.trial_number,
                  "success": CellRow.success, SCORE: CellRow.score}


def _order_column(sort: str):
    """A column of our tables, or a metric read out of the milestone's JSON by the database."""
    if sort in _PLAIN_COLUMNS:
        return _PLAIN_COLUMNS[sort]
    check_metric(sort)
    path = tuple(sort.split("."))
    return sa_cast(CellRow.metrics[path if len(path) > 1 else path[0]].as_float(), Float)


@dataclass
class TrialPage:
    rows: list[dict]
    total: int  # rows that pass the filter (the page holds at most `limit` of them)
    offset: int


def trial_page(store: Store, study: str, sort: str = SCORE, descending: bool = False,
               method: Optional[str] = None, success_only: bool = False, include_diverged: bool = True,
               limit: int = 200, offset: int = 0) -> TrialPage:
    """One page of a study's trials (one per computed cell), sorted and filtered by the database.
    Missing values sort last either way."""
    columns = trial_columns()
    if sort not in columns:
        raise UnlearnError(f"cannot sort by {sort!r}; one of: {', '.join(columns)}")
    if limit <= 0:
        raise UnlearnError("limit must be positive")
    st = store.study(study)
    where = [Run.study_id == st.id, Run.state.in_(REAL_RUN_STATES)]
    if method:
        where.append(Run.method == method)
    if success_only:
        where.append(CellRow.success.is_(True))
    if not include_diverged:
        where.append(CellRow.diverged.is_(False))
    col = _order_column(sort)
    order = [col.is_(None), col.desc() if descending else col.asc(), Run.method, Run.lr, CellRow.step]
    with store.read() as s:
        total = s.exec(select(func.count(CellRow.id)).join(Run, CellRow.run_id == Run.id)
                       .where(and_(*where))).one()
        found = s.exec(select(CellRow, Run.method, Run.lr).join(Run, CellRow.run_id == Run.id)
                       .where(and_(*where)).order_by(*order).offset(offset).limit(limit)).all()
    rows = []
    for ms, m, lr in found:
        values = dict(ms.metrics or {})
        row = {"id": ms.id, "method": m, "lr": lr, "steps": ms.step, "trial": ms.trial_number,
               "success": bool(ms.success), "diverged": bool(ms.diverged), SCORE: ms.score}
        for name in every_run_paths():
            if name == SCORE:  # a column of its own (CellRow.score)
                continue
            node = read_metric(values, name)
            row[name] = node if isinstance(node, (int, float)) and not isinstance(node, bool) else None
        rows.append(row)
    return TrialPage(rows, int(total or 0), offset)
