"""Trials -> lr × steps grids, robustness, best cells and the Pareto front (docs/concepts.md#studies).

A *cell* is one (method, lr, steps) point of a study's search space. A grid study covers every
(method, lr) of its spec × every milestone, so cells not computed yet are listed too (pending,
running or failed) and the cells after a divergence are `diverged`, never missing. A TPE study
covers the (method, lr) runs its sampler has asked for so far (a reservation made while the
sampler is asked is not a run, and never shows).

The best cell of a method is defined once, here (`best_cell`): every table, status and export
that names a best cell uses it.

Everything is read with one query per table (runs, milestones), never one per cell.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Optional

from sqlmodel import select

from engine import metric_registry
from engine.errors import UnlearnError
from engine.metric_registry import FORGET_GAP, SCORE, CellMetrics
from engine.metric_registry import UTILITY_DRIFT as RETAIN_DRIFT  # the Pareto front's utility axis: held out
from studies.lifecycle.spec import StudySpec, study_spec, without_ranged_knobs
from studies.store.db import CellRow, Run, Store, Study
from studies.store.states import REAL_RUN_STATES, CellStatus, RunState

STATUSES = tuple(CellStatus)  # computed (done, diverged) or not yet (pending, running, failed, cancelled)


def check_metric(metric: str) -> str:
    """A metric path a grid can show (engine/metric_registry.py); an unknown one is one line naming the known ones."""
    return metric_registry.get(metric).path


def study_metrics(spec: dict, cells: Iterable["Cell"] = ()) -> tuple[str, ...]:
    """The metric paths a study can show: every cell's, its attacks' recoveries (--attacks), the
    benchmark metrics its cells have (a TOFU/MUSE preset) and downstream.TASK for its --eval-tasks
    (and any task its cells have)."""
    from engine.config import parse_attacks, parse_eval_tasks

    run = spec.get("run") or {}
    try:
        attacks, tasks = parse_attacks(run.get("attacks", "")), list(parse_eval_tasks(run.get("eval_tasks", "")))
    except UnlearnError:  # a spec this version cannot read: the plain metrics
        attacks, tasks = (), []
    bench: set[str] = set()
    for c in cells:
        m = c.metrics or {}
        bench |= {f"{metric_registry.BENCH}.{k}" for k in (m.get(metric_registry.BENCH) or {})}
        tasks += [t for t in (m.get(metric_registry.DOWNSTREAM) or {}) if t not in tasks]
    robust = metric_registry.wants_robustness(attacks) or any(
        metric_registry.ATTACK_ROBUSTNESS in (c.metrics or {}) for c in cells)
    return (metric_registry.every_run_paths() + tuple(metric_registry.recovery(a) for a in attacks)
            + ((metric_registry.ATTACK_ROBUSTNESS,) if robust else ())
            + ((metric_registry.PRIVLEAK,) if run.get("retrained_auc") is not None else ())
            + tuple(b for b in metric_registry.paths(metric_registry.BENCH) if b in bench)
            + tuple(metric_registry.DOWNSTREAM_PREFIX + t for t in tasks))


def _finite(x) -> Optional[float]:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    return float(x) if math.isfinite(x) else None


@dataclass
class Cell:
    method: str
    lr: float
    steps: int
    status: CellStatus
    metrics: Optional[CellMetrics] = None  # the engine's cell (None until computed)
    score: Optional[float] = None
    success: bool = False
    diverged: bool = False
    run_id: Optional[int] = None
    run_state: Optional[str] = None
    trial_number: Optional[int] = None
    at_target: bool = False  # where the run's forget perplexity first reached the target (its own step)

    @property
    def computed(self) -> bool:
        """Evaluated and not diverged: a cell that can win."""
        return self.status == CellStatus.DONE

    def value(self, metric: str) -> Optional[float]:
        """The metric at a dotted path (e.g. mia_auc.min_k); None when missing or not finite."""
        if metric == SCORE and self.score is not None:
            return _finite(self.score)
        return _finite(metric_registry.read(self.metrics, metric))

    def summary(self) -> dict:
        """The numbers an export or a status line shows: the objective and success, then every other
        figure every cell has (flat; a group a cell nests, such as mia_auc, as stored)."""
        m = self.metrics or {}
        out = {"lr": self.lr, "steps": self.steps, **{x.path: self.value(x.path) for x in metric_registry.objective()},
               "success": bool(self.success)}
        for x in metric_registry.every_run():
            if x.group != metric_registry.OBJECTIVE:
                top = x.path.split(".")[0]
                out[top] = dict(m.get(top) or {}) if top != x.path else self.value(x.path)
        out["trial_number"] = self.trial_number
        if "seeds" in m:  # a mean over seeds: which, and each figure's 95 % half width
            out["seeds"] = m["seeds"]["seeds"]
            out["spread"] = dict(m["seeds"]["spread"])
        return out


@dataclass
class Grid:
    """One method: sorted lrs (rows) × steps (columns)."""

    method: str
    lrs: list[float]
    steps: list[int]
    cells: dict[tuple[float, int], Cell] = field(default_factory=dict)

    def cell(self, lr: float, steps: int) -> Optional[Cell]:
        return self.cells.get((lr, steps))

    def value(self, metric: str) -> list[list[Optional[float]]]:
        """Rows (lrs) × columns (steps) of the metric; None where not computed, diverged or not finite."""
        check_metric(metric)
        # The heatmap of a 100,000-cell study calls this on every refresh: one dict lookup a cell,
        # the metric's path split once, no method call per cell (Cell.value gives the same numbers).
        get, steps, done = self.cells.get, self.steps, CellStatus.DONE
        if metric == SCORE:
            def read(c: Cell) -> Optional[float]:
                return _finite(c.score) if c.score is not None else c.value(metric)
        else:
            read = _path_reader(metric)
        return [[(read(c) if (c := get((lr, s))) is not None and c.status == done else None)
                 for s in steps] for lr in self.lrs]

    def status(self) -> list[list[str]]:
        get, steps, pending = self.cells.get, self.steps, str(CellStatus.PENDING)
        names = _STATUS_NAMES
        return [[names[c.status] if (c := get((lr, s))) is not None else pending for s in steps] for lr in self.lrs]

    @property
    def size(self) -> int:
        return len(self.lrs) * len(self.steps)

    @property
    def successes(self) -> int:
        return sum(1 for c in self.cells.values() if c.success and c.computed)

    @property
    def robustness(self) -> float:
        return self.successes / self.size if self.size else 0.0


_STATUS_NAMES = {st: str(st) for st in CellStatus}


def _path_reader(metric: str):
    """A function reading a dotted metric path out of a cell, as Cell.value does."""
    parts = metric.split(".")
    if len(parts) == 1:
        key = parts[0]
        return lambda c: _finite(c.metrics.get(key)) if isinstance(c.metrics, dict) else None
    return lambda c: c.value(metric)


# ---------------------------------------------------------------- loading

def _study_row(store: Store, study) -> Study:
    return store.study(study) if isinstance(study, str) else study


def fetch_rows(store: Store, study_ids: Iterable[int]) -> tuple[list[Run], list[CellRow]]:
    """Every run (a real (method, lr) run: no TPE reservation) and milestone of these studies:
    one query per table."""
    ids = list(study_ids)
    if not ids:
        return [], []
    real = Run.state.in_(REAL_RUN_STATES)
    with store.read() as s:
        runs = list(s.exec(select(Run).where(Run.study_id.in_(ids), real)).all())
        milestones = list(s.exec(select(CellRow).join(Run, CellRow.run_id == Run.id)
                                 .where(Run.study_id.in_(ids), real)).all())
    return runs, milestones


def cells_from_rows(study: Study, runs: list[Run], milestones: list[CellRow]) -> list[Cell]:
    """The cells of one study from its rows (runs and milestones of other studies are ignored)."""
    spec = study_spec(study)
    runs = [r for r in runs if r.study_id == study.id and r.state in REAL_RUN_STATES]
    run_ids = {r.id for r in runs}
    by_cell = {(m.run_id, m.step): m for m in milestones if m.run_id in run_ids and not _off_grid(m, spec)}
    steps = sorted(set(int(s) for s in spec.steps) | {step for _, step in by_cell})
    by_row = runs_by_row(runs)
    cells = []
    for method, lr in sorted(row_keys(spec, by_row), key=row_order(spec)):
        row_runs = by_row.get((method, lr), [])
        for step in steps:
            cells.append(row_cell(method, lr, step, row_runs, lambda run, st: by_cell.get((run.id, st))))
    return cells


def runs_by_row(runs) -> dict[tuple[str, float], list[Run]]:
    """A study's runs by (method, lr) row, each row's in seed order (one run, or one per --seeds)."""
    out: dict[tuple[str, float], list[Run]] = {}
    for r in sorted(runs, key=lambda r: (r.seed or 0, r.id or 0)):
        out.setdefault((r.method, float(r.lr)), []).append(r)
    return out


def row_cell(method: str, lr: float, step: int, runs: list[Run], row_at) -> Cell:
    """The cell at (method, lr, step) of a row's runs; `row_at(run, step)` gives a run's cell row
    (or None). Under several seeds, their mean (studies.reading.seeds)."""
    if len(runs) <= 1:
        run = runs[0] if runs else None
        return cell_at(method, lr, step, run, row_at(run, step) if run is not None else None)
    from studies.reading.seeds import mean_cell

    return mean_cell([cell_at(method, lr, step, r, row_at(r, step)) for r in runs], [r.seed for r in runs])


def _off_grid(row: CellRow, spec: StudySpec) -> bool:
    """An at-target cell at a step that is no milestone: shown in its own column, not the grid's."""
    return bool((row.metrics or {}).get("at_target")) and int(row.step) not in {int(s) for s in spec.steps}


def at_target_from_rows(study: Study, runs: list[Run], milestones: list[CellRow]) -> list[Cell]:
    """Each row's at-target cell (where its forget perplexity first reached the target), at its own step."""
    mine = [r for r in runs if r.study_id == study.id and r.state in REAL_RUN_STATES]
    return at_target_cells(mine, {m.run_id: m for m in milestones if (m.metrics or {}).get("at_target")})


def at_target_cells(runs, at_rows: dict) -> list[Cell]:
    """The at-target cell of each (method, lr) row of these runs, from each run's at-target cell row
    (`at_rows`: run id -> row). Under several seeds, the mean of the seeds' at-target cells, at the
    last seed's step, once every seed reached the target (not before)."""
    from studies.reading.seeds import mean_at_target

    out = []
    for (method, lr), row_runs in runs_by_row(runs).items():
        found = [cell_at(method, lr, at_rows[r.id].step, r, at_rows[r.id]) for r in row_runs if r.id in at_rows]
        if not found or len(found) != len(row_runs):
            continue
        for c in found:
            c.at_target = True
        if len(found) == 1:
            out.append(found[0])
            continue
        out.append(mean_at_target(found, [r.seed for r in row_runs]))
    return out


def load_at_target(store: Store, study) -> list[Cell]:
    """The study's at-target cells, one per run that reached the target."""
    row = _study_row(store, study)
    runs, milestones = fetch_rows(store, [row.id])
    return at_target_from_rows(row, runs, milestones)


def row_keys(spec: StudySpec, run_keys) -> set[tuple[str, float]]:
    """The (method, lr) rows a study shows: every one with a run and, on a grid, every planned one."""
    keys = set(run_keys)
    if spec.sampler == "grid":
        keys |= {(m, float(lr)) for m, lr in spec.grid_runs}
    return keys


def row_order(spec: StudySpec):
    """Sort key of a (method, lr) row: methods in the spec's order (others after, by name), then lr."""
    order = {m: i for i, m in enumerate(spec.methods)}
    return lambda k: (order.get(k[0], len(order)), k[0], k[1])


def cell_at(method: str, lr: float, step: int, run: Optional[Run], ms: Optional[CellRow]) -> Cell:
    """The cell at (method, lr, step) from its run (None: not started) and its milestone row (None: not written)."""
    if ms is not None:
        diverged = bool(ms.diverged or (ms.metrics or {}).get("diverged"))
        score = ms.score if ms.score is not None else (ms.metrics or {}).get(SCORE)
        return Cell(method, lr, step, CellStatus.DIVERGED if diverged else CellStatus.DONE, metrics=dict(ms.metrics or {}),
                    score=None if diverged else _finite(score), success=bool(ms.success) and not diverged,
                    diverged=diverged, run_id=ms.run_id, run_state=run.state if run else None,
                    trial_number=ms.trial_number)
    if run is None:
        return Cell(method, lr, step, CellStatus.PENDING)
    status = _UNWRITTEN.get(run.state, CellStatus.PENDING)
    return Cell(method, lr, step, status, diverged=status == CellStatus.DIVERGED, run_id=run.id, run_state=run.state)


# A cell with no milestone row yet, by the state of its run.
_UNWRITTEN = {
    RunState.DIVERGED: CellStatus.DIVERGED,  # stopped before this milestone: diverged, never missing
    RunState.RUNNING: CellStatus.RUNNING,
    RunState.FAILED: CellStatus.FAILED,
    RunState.DONE: CellStatus.FAILED,  # done without this milestone should not happen: shown as failed
    RunState.CANCELLED: CellStatus.CANCELLED,
}


def load_cells(store: Store, study) -> list[Cell]:
    """One Cell per (method, lr, steps) the study covers, ordered by method (spec order), lr, steps."""
    row = _study_row(store, study)
    runs, milestones = fetch_rows(store, [row.id])
    return cells_from_rows(row, runs, milestones)


# ---------------------------------------------------------------- queries over cells

def methods_of(cells: list[Cell]) -> list[str]:
    seen: dict[str, None] = {}
    for c in cells:
        seen.setdefault(c.method, None)
    return list(seen)


def grids(cells: list[Cell]) -> dict[str, Grid]:
    """Per method, in the cells' order: its lrs × the study's steps."""
    steps = sorted({c.steps for c in cells})
    out: dict[str, Grid] = {}
    for c in cells:
        g = out.get(c.method)
        if g is None:  # not setdefault: that would build a Grid for every cell
            g = out[c.method] = Grid(c.method, [], steps)
        g.cells[(c.lr, c.steps)] = c
    for g in out.values():
        g.lrs = sorted({lr for lr, _ in g.cells})
    return out


def robustness(cells: list[Cell]) -> dict[str, float]:
    """Share of each method's cells (all of its search space: lrs × steps) that are a success."""
    return {m: g.robustness for m, g in grids(cells).items()}


def of_method(cells: list[Cell], method: str, ranges: dict | None = None) -> list[Cell]:
    """A method's cells. In a TPE study that samples knobs from ranges (`ranges`: the spec's
    knob_ranges), a method was run as many variants: their cells are all the method's."""
    if not ranges:
        return [c for c in cells if c.method == method]
    return [c for c in cells if without_ranged_knobs(c.method, ranges) == method]


def best_cell(cells: list[Cell], method: str, ranges: dict | None = None) -> Optional[Cell]:
    """THE best cell of a method: among its computed, non-diverged cells, the lowest score;
    ties go to fewer steps (cheaper), then to the lower lr (gentler). None when it has none."""
    cand = [c for c in of_method(cells, method, ranges) if c.computed and c.value(SCORE) is not None]
    return min(cand, key=lambda c: (c.value(SCORE), c.steps, c.lr)) if cand else None


def best(cells: list[Cell]) -> dict[str, dict]:
    """Per method, the summary of its best cell; methods with none are left out."""
    return {m: c.summary() for m in methods_of(cells) if (c := best_cell(cells, m)) is not None}


def pareto(cells: list[Cell], method: str, ranges: dict | None = None) -> list[Cell]:
    """The method's computed cells not dominated on (forget_gap, retain_eval_drift), both minimized;
    sorted by forget_gap. Cells with equal coordinates are all kept."""
    pts = [c for c in of_method(cells, method, ranges) if c.computed
           and c.value(FORGET_GAP) is not None and c.value(RETAIN_DRIFT) is not None]
    front = []
    for c in pts:
        g, d = c.value(FORGET_GAP), c.value(RETAIN_DRIFT)
        dominated = any(o.value(FORGET_GAP) <= g and o.value(RETAIN_DRIFT) <= d
                        and (o.value(FORGET_GAP) < g or o.value(RETAIN_DRIFT) < d) for o in pts)
        if not dominated:
            front.append(c)
    return sorted(front, key=lambda c: (c.value(FORGET_GAP), c.value(RETAIN_DRIFT), c.steps, c.lr))


def count_status(cells: list[Cell]) -> dict[str, int]:
    counts = {str(s): 0 for s in STATUSES}
    for c in cells:
        counts[str(c.status)] += 1
    return counts


# ---------------------------------------------------------------- θ0, the negative control

def original_baseline(store: Store, study) -> Optional[dict]:
    """θ0's figures and verdict as the study's runs measured them (every run's result carries its
    baseline; the first finished one is read), or None before any run finished."""
    row = _study_row(store, study)
    with store.read() as s:
        for run in s.exec(select(Run).where(Run.study_id == row.id, Run.result.is_not(None)).order_by(Run.id)).all():
            base = (run.result or {}).get("baseline")
            if base and "verdict" in base:
                return base
    return None


def original_note(baseline: Optional[dict]) -> Optional[str]:
    """One line when θ0 itself passes a part of the verdict (that part alone then shows nothing
    here), or when it passes the whole verdict (the study cannot tell unlearning from doing nothing)."""
    if not baseline or "verdict" not in baseline:
        return None
    parts = [p for p in ("forget", "mia") if baseline["verdict"].get(p)]
    if baseline.get("success"):
        return "θ0 itself passes the whole verdict: this study cannot tell unlearning from doing nothing"
    if not parts:
        return None
    band = (baseline.get("target") or {}).get("band")
    said = {"forget": f"forget_gap {baseline.get(FORGET_GAP, 0):.3g} ≤ band {band:.3g}" if band is not None else "forget",
            "mia": f"MIA AUC interval [{baseline.get('mia_auc_lo', 0):.2f}, {baseline.get('mia_auc_hi', 0):.2f}] holds 0.5"}
    return (f"θ0 itself passes the {' and '.join(parts)} part{'s' if len(parts) > 1 else ''} of the verdict "
            f"({'; '.join(said[p] for p in parts)}): {'those parts alone show' if len(parts) > 1 else 'that part alone shows'} nothing here")
