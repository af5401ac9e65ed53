"""What the live app reads, headless (no Textual here: the CLI and tests use it too).

`StudyWatch` follows one study incrementally: each poll reads the study row, its runs (one per
method × lr: a handful) and only the milestones newer than the last one seen, and reports which
cells changed, so a dashboard updates those cells and nothing else.

`trial_page` is the trial table: sorting, filtering and paging happen in SQL, so a study of
10,000 trials never loads more than one page of them.
"""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Optional

from sqlalchemy import Float, and_, func
from sqlalchemy import cast as sa_cast
from sqlmodel import select

from engine.errors import UnlearnError
from studies.grid import CELL_METRICS, Cell, cells_from_rows, check_metric
from studies.spec import StudySpec
from studies.states import REAL_RUN_STATES, RunState, StudyState
from studies.clock import age_s
from studies.store import Milestone, Run, Store, Study, utcnow

CellKey = tuple[str, float, int]  # (method, lr, steps)


def _signature(c: Cell) -> tuple:
    """What a dashboard shows of a cell: when this changes, the cell is redrawn."""
    return (str(c.status), c.score, c.success, c.run_state, c.trial_number)


@dataclass
class Poll:
    study: Study
    cells: list[Cell]
    changed: set[CellKey]  # cells whose status or values changed since the previous poll
    new_milestones: int  # rows read this poll (0 when nothing new was written)
    running: list[dict]  # the running runs, as study_status(...)["running"] lists them
    state_changed: bool  # the study's state differs from the previous poll's
    finished: bool  # it became done during this watch (not merely done when the watch began)
    scheduler_alive_s_ago: Optional[float] = None


@dataclass
class StudyWatch:
    store: Store
    name: str
    _runs: dict[int, Run] = field(default_factory=dict)
    _milestones: dict[int, Milestone] = field(default_factory=dict)
    _last_id: int = 0
    _cells: dict[CellKey, tuple] = field(default_factory=dict)
    _cells_list: Optional[list[Cell]] = None
    _runs_seen: dict[int, tuple] = field(default_factory=dict)
    _state: Optional[str] = None

    def poll(self) -> Poll:
        """One refresh: three small queries, the milestone one bounded by the last id seen."""
        with self.store.read() as s:
            study = s.exec(select(Study).where(Study.name == self.name)).first()
            if study is None:
                raise UnlearnError(f"no study named {self.name!r} (deleted?)")
            runs = s.exec(select(Run).where(Run.study_id == study.id, Run.state.in_(REAL_RUN_STATES))).all()
            fresh = s.exec(select(Milestone).join(Run, Milestone.run_id == Run.id)
                           .where(Run.study_id == study.id, Milestone.id > self._last_id)
                           .order_by(Milestone.id)).all()
        runs_now = {r.id: (r.state, r.step, r.attempts) for r in runs}
        quiet = not fresh and runs_now == self._runs_seen and self._cells_list is not None
        self._runs, self._runs_seen = {r.id: r for r in runs}, runs_now
        for m in fresh:
            self._milestones[m.id] = m
            self._last_id = max(self._last_id, m.id)
        if quiet:  # nothing that draws a cell moved: skip rebuilding them (the common tick)
            cells, changed = self._cells_list, set()
        else:
            cells = cells_from_rows(study, list(self._runs.values()), list(self._milestones.values()))
            signatures = {(c.method, c.lr, c.steps): _signature(c) for c in cells}
            changed = {k for k, sig in signatures.items() if self._cells.get(k) != sig}
            self._cells, self._cells_list = signatures, cells
        first = self._state is None
        state_changed = not first and study.state != self._state
        finished = state_changed and study.state == StudyState.DONE
        self._state = study.state
        return Poll(study, cells, changed, len(fresh), running_runs(study, list(self._runs.values())),
                    state_changed, finished, age_s(study.scheduler_heartbeat))


def running_runs(study: Study, runs: list[Run], now: Optional[dt.datetime] = None) -> list[dict]:
    """The running runs of a study in spec order (the same dicts as study_status's "running")."""
    methods = list(StudySpec.from_dict(study.spec).methods)
    now = now or utcnow()
    return [{"method": r.method, "lr": r.lr, "step": r.step, "device": r.device, "pid": r.pid, "host": r.host,
             "heartbeat_age_s": age_s(r.heartbeat, now), "attempts": r.attempts}
            for r in sorted(runs, key=lambda r: (methods.index(r.method) if r.method in methods else 99, r.lr))
            if r.state == RunState.RUNNING]


# ---------------------------------------------------------------- the trial table

TRIAL_COLUMNS = ("method", "lr", "steps", "trial") + CELL_METRICS + ("success",)


_PLAIN_COLUMNS = {"method": Run.method, "lr": Run.lr, "steps": Milestone.step, "trial": Milestone.trial_number,
                  "success": Milestone.success, "score": Milestone.score}


def _order_column(sort: str):
    """A column of our tables, or a metric read out of the milestone's JSON by the database."""
    if sort in _PLAIN_COLUMNS:
        return _PLAIN_COLUMNS[sort]
    check_metric(sort)
    path = tuple(sort.split("."))
    return sa_cast(Milestone.metrics[path if len(path) > 1 else path[0]].as_float(), Float)


@dataclass
class TrialPage:
    rows: list[dict]
    total: int  # rows that pass the filter (the page holds at most `limit` of them)
    offset: int


def trial_page(store: Store, study: str, sort: str = "score", descending: bool = False,
               method: Optional[str] = None, success_only: bool = False, include_diverged: bool = True,
               limit: int = 200, offset: int = 0) -> TrialPage:
    """One page of a study's trials (one per computed cell), sorted and filtered by the database.
    Missing values sort last either way."""
    if sort not in TRIAL_COLUMNS:
        raise UnlearnError(f"cannot sort by {sort!r}; one of: {', '.join(TRIAL_COLUMNS)}")
    if limit <= 0:
        raise UnlearnError("limit must be positive")
    st = store.study(study)
    where = [Run.study_id == st.id, Run.state.in_(REAL_RUN_STATES)]
    if method:
        where.append(Run.method == method)
    if success_only:
        where.append(Milestone.success.is_(True))
    if not include_diverged:
        where.append(Milestone.diverged.is_(False))
    col = _order_column(sort)
    order = [col.is_(None), col.desc() if descending else col.asc(), Run.method, Run.lr, Milestone.step]
    with store.read() as s:
        total = s.exec(select(func.count(Milestone.id)).join(Run, Milestone.run_id == Run.id)
                       .where(and_(*where))).one()
        found = s.exec(select(Milestone, Run.method, Run.lr).join(Run, Milestone.run_id == Run.id)
                       .where(and_(*where)).order_by(*order).offset(offset).limit(limit)).all()
    rows = []
    for ms, m, lr in found:
        metrics = dict(ms.metrics or {})
        row = {"id": ms.id, "method": m, "lr": lr, "steps": ms.step, "trial": ms.trial_number,
               "success": bool(ms.success), "diverged": bool(ms.diverged), "score": ms.score}
        for name in CELL_METRICS[1:]:
            node = metrics
            for part in name.split("."):
                node = node.get(part) if isinstance(node, dict) else None
            row[name] = node if isinstance(node, (int, float)) and not isinstance(node, bool) else None
        rows.append(row)
    return TrialPage(rows, int(total or 0), offset)
