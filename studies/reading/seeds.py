"""A cell run under several seeds (`study create --seeds 0,1,2`), read as one cell.

Its figures are the means over the seeds, each with the half width of a 95 % Student-t interval
of that mean (`metrics["seeds"]["spread"]`). Its verdict is judged on the intervals, not the
means: the forget part needs the interval of forget_gap inside the forget band (its upper end
≤ band), the utility part the interval of retain_eval_drift's upper end ≤ the utility band, and the
membership part (whose own figure is already an interval, per seed) must hold at every seed. The
bands are the ones each seed's cell was judged against (`metrics["bands"]`; the widest, should they
differ). A seed that diverged makes the cell diverged; the cell is computed only when every seed's
is.
"""
from __future__ import annotations

import math
import statistics
from typing import Optional

from engine.metric_registry import FORGET_GAP, SCORE, UTILITY_DRIFT
from studies.store.states import CellStatus

# The figures a cell stores that are not measurements to average.
_NOT_AVERAGED = frozenset({"step", "verdict", "success", "diverged", "at_target", "bands", "attacks", "seeds"})
# What a cell not computed at every seed shows, the worst first.
_WAITING = (CellStatus.FAILED, CellStatus.CANCELLED, CellStatus.RUNNING, CellStatus.PENDING)


def half_width(values: list[float], level: float = 0.95) -> Optional[float]:
    """Half width of the Student-t interval of the mean of `values` (None for fewer than two)."""
    from scipy.stats import t

    if len(values) < 2:
        return None
    return float(t.ppf(0.5 + level / 2, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values)))


def _numbers(metrics: dict) -> dict[str, float]:
    """Every averaged figure of a cell by dotted path (one level of nesting: mia_auc.loss, bench.x)."""
    out: dict[str, float] = {}
    for key, value in (metrics or {}).items():
        if key in _NOT_AVERAGED:
            continue
        if isinstance(value, dict):
            out.update({f"{key}.{k}": v for k, v in value.items() if _is_number(v)})
        elif _is_number(value):
            out[key] = value
    return out


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _put(metrics: dict, path: str, value) -> None:
    top, _, rest = path.partition(".")
    if rest:
        metrics.setdefault(top, {})[rest] = value
    else:
        metrics[top] = value


def mean_cell(cells: list, seeds: list[int], bands: Optional[dict] = None):
    """One Cell (studies.reading.grid.Cell) from the same cell at each seed, in `seeds`' order.
    `bands` ({"forget", "utility"}) stands in for cells recorded before cells carried their bands."""
    from studies.reading.grid import Cell

    first = cells[0]
    base = dict(method=first.method, lr=first.lr, steps=first.steps, run_id=first.run_id, run_state=first.run_state,
                at_target=first.at_target)
    if any(c.status == CellStatus.DIVERGED for c in cells):
        return Cell(status=CellStatus.DIVERGED, diverged=True, **base)
    if not all(c.status == CellStatus.DONE for c in cells):
        status = next(s for s in _WAITING if any(c.status == s for c in cells))
        return Cell(status=status, **base)
    per_seed = [_numbers(c.metrics) for c in cells]
    paths = [p for p in per_seed[0] if all(p in n for n in per_seed[1:])]
    metrics: dict = {}
    spread: dict[str, Optional[float]] = {}
    for path in paths:
        values = [n[path] for n in per_seed]
        _put(metrics, path, statistics.fmean(values))
        spread[path] = half_width(values)
    scores = [c.score for c in cells]
    score = statistics.fmean(scores) if all(_is_number(s) for s in scores) else None
    if score is not None:
        spread[SCORE] = half_width(scores)
    verdict = _verdict(cells, metrics, spread, bands)
    metrics.update(verdict=verdict, success=all(verdict.values()), diverged=False,
                   seeds={"seeds": list(seeds), "n": len(cells), "spread": spread,
                          "success": [bool(c.success) for c in cells], "scores": scores})
    judged = _bands(cells) or bands
    if judged:
        metrics["bands"] = dict(judged)
    return Cell(status=CellStatus.DONE, metrics=metrics, score=score, success=metrics["success"], **base)


def _bands(cells) -> dict[str, float]:
    found = [(c.metrics or {}).get("bands") or {} for c in cells]
    return {part: max(b[part] for b in found) for part in ("forget", "utility") if all(part in b for b in found)}


def _upper(metrics: dict, spread: dict, path: str) -> Optional[float]:
    mean, hw = metrics.get(path), spread.get(path)
    return mean + hw if _is_number(mean) and hw is not None else None


def _verdict(cells, metrics: dict, spread: dict, given: Optional[dict] = None) -> dict[str, bool]:
    """Each part judged on the seeds' intervals; without the bands (cells made before they were
    stored, and none given) a part holds only where it held at every seed."""
    bands = _bands(cells) or dict(given or {})
    every = {part: all(bool(((c.metrics or {}).get("verdict") or {}).get(part)) for c in cells)
             for part in ("forget", "mia", "utility")}
    out = {"mia": every["mia"]}
    for part, path in (("forget", FORGET_GAP), ("utility", UTILITY_DRIFT)):
        upper = _upper(metrics, spread, path)
        out[part] = (upper is not None and upper <= bands[part]) if part in bands else every[part]
    return {p: out[p] for p in ("forget", "mia", "utility")}


def mean_at_target(cells: list, seeds: list[int], bands: Optional[dict] = None):
    """The at-target cell of one (method, lr) row under several seeds: the mean of the seeds' own
    at-target cells (every seed's, found by the caller), at the step the last seed got there."""
    last = max(c.steps for c in cells)
    for c in cells:
        c.steps = last
    return mean_cell(cells, seeds, bands)
