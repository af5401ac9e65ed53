"""The list of every study, one line each, and a read of it that needs no ORM.

`list_row` turns one study's per-run aggregates into its line; `studies.reading.status.list_studies`
feeds it through SQLAlchemy (any database). `list_studies_sqlite` feeds it the same aggregates
straight from the stdlib `sqlite3`, because importing SQLAlchemy and sqlmodel costs a short
command like `unlearn study ls` about half a second — more than the query on 10,000 trials. It
answers only when the file is a store this version reads as it is; anything else (no file, not a
database, an older or newer schema, a locked file) returns None and the caller opens the real
`Store`, which gives the one-line reason or migrates. A test holds both paths to the same rows.
"""
from __future__ import annotations

import datetime as dt
import json
import sqlite3
from types import SimpleNamespace
from typing import Optional

from studies.store.clock import age_s, aware, utcnow
from studies.store.sqlite_file import SCHEMA_VERSION, SQLITE_BUSY_MS, check_sqlite_file, is_sqlite, sqlite_path
from studies.store.states import REAL_RUN_STATES, RunState


def list_row(st, spec, fs, runs: list, now: dt.datetime) -> dict:
    """One study's line from its per-run aggregates — rows of (study_id, method, state, cells,
    diverged cells, successful cells, best score) — what `cells_from_rows` would count,
    without reading a cell (a test holds the two to the same numbers)."""
    n_steps = len(spec.steps)
    done = diverged = 0
    successes: dict[str, int] = {}
    runs_of: dict[str, int] = {}
    best_score = None
    for _, method, state, n_ms, n_div, n_ok, min_score in runs:
        n_div, n_ok = int(n_div or 0), int(n_ok or 0)
        done += n_ms - n_div
        diverged += n_div + (max(0, n_steps - n_ms) if state == RunState.DIVERGED else 0)
        successes[method] = successes.get(method, 0) + n_ok
        runs_of[method] = runs_of.get(method, 0) + 1
        if min_score is not None and (best_score is None or min_score < best_score):
            best_score = float(min_score)
    lrs_of = ({m: len(spec.lrs) for m in spec.methods} if spec.sampler == "grid" else runs_of)
    total_runs = max(spec.total_runs, len(runs))
    return {"name": st.name, "state": st.state, "model": st.model,
            "forget_set": {"name": fs.name if fs else spec.forget_set, "hash": fs.hash if fs else spec.forget_set_hash},
            "sampler": spec.sampler, "methods": list(spec.methods), "steps": list(spec.steps),
            "cells": {"done": done, "diverged": diverged, "total": total_runs * n_steps},
            "robustness": {m: successes.get(m, 0) / (lrs_of[m] * n_steps) for m in spec.methods if lrs_of.get(m)},
            "best_score": best_score,
            "scheduler_alive_s_ago": age_s(st.scheduler_heartbeat, now),
            "created_at": aware(st.created_at).isoformat() if st.created_at else None}


def fold_at_target(rows: list, steps) -> list[tuple]:
    """Per run, the aggregates `list_row` takes, from rows of (run id, study id, method, state, cells,
    diverged cells, successful cells, best score, at-target step): the query keeps a run's at-target
    cell (where its forget perplexity first reached the target) in a row of its own, with its step.
    At one of the study's steps it is that milestone's cell and counts; between milestones it is no
    cell of the grid (studies.reading.grid leaves it out too) and counts nowhere."""
    grid_steps = {int(x) for x in steps}
    out: dict[int, list] = {}
    for run_id, study_id, method, state, n_ms, n_div, n_ok, best_score, at_step in rows:
        if at_step is not None and int(at_step) not in grid_steps:
            n_ms, n_div, n_ok, best_score = 0, 0, 0, None
        acc = out.setdefault(run_id, [study_id, method, state, 0, 0, 0, None])
        acc[3] += int(n_ms or 0)
        acc[4] += int(n_div or 0)
        acc[5] += int(n_ok or 0)
        if best_score is not None and (acc[6] is None or best_score < acc[6]):
            acc[6] = best_score
    return [tuple(v) for v in out.values()]


# The same aggregates `studies.reading.status.list_studies` asks SQLAlchemy for (booleans are 0/1 in SQLite),
# a run's at-target cell in a row of its own (fold_at_target).
_PER_RUN = """
SELECT r.id, r.study_id, r.method, r.state, COUNT(m.id),
       SUM(CASE WHEN m.diverged = 1 THEN 1 ELSE 0 END),
       SUM(CASE WHEN m.id IS NOT NULL AND m.diverged = 0 AND m.success = 1 THEN 1 ELSE 0 END),
       MIN(CASE WHEN m.id IS NOT NULL AND m.diverged = 0 THEN m.score END),
       CASE WHEN JSON_EXTRACT(m.metrics, '$."at_target"') THEN m.step END AS at_step
FROM ul_run AS r LEFT OUTER JOIN ul_milestone AS m ON m.run_id = r.id
WHERE r.state IN ({states})
GROUP BY r.id, at_step
"""


def _when(text: Optional[str]) -> Optional[dt.datetime]:
    return dt.datetime.fromisoformat(text) if text else None


def list_studies_sqlite(url: str, now: Optional[dt.datetime] = None) -> Optional[list[dict]]:
    """`list_studies` of a SQLite store read with the stdlib driver, or None when this path cannot
    answer exactly (see the module's docstring) and the full store must be opened instead."""
    from studies.lifecycle.spec import StudySpec  # torch-free; after the cheap checks

    path = sqlite_path(url) if is_sqlite(url) else None
    if path is None or "?" in url:  # URL options may change how the file opens: leave them to SQLAlchemy
        return None
    try:
        check_sqlite_file(url, create=False)
    except Exception:  # noqa: BLE001 - the full store gives the reason
        return None
    try:
        # Read-only: this path must never create, migrate or lock anything a writer waits on.
        con = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True, timeout=SQLITE_BUSY_MS / 1000)  # as the store's own connections
    except sqlite3.Error:
        return None
    try:
        version = con.execute("SELECT value FROM ul_meta WHERE key = 'schema_version'").fetchone()
        if version is None or int(version[0]) != SCHEMA_VERSION:
            return None
        studies = con.execute(
            "SELECT id, name, model, forgetset_id, spec, state, scheduler_heartbeat, created_at "
            "FROM ul_study ORDER BY created_at, id").fetchall()
        sets = {i: SimpleNamespace(name=n, hash=h) for i, n, h in con.execute("SELECT id, name, hash FROM ul_forgetset")}
        states = [str(s) for s in REAL_RUN_STATES]
        per_run = con.execute(_PER_RUN.format(states=", ".join("?" * len(states))), states).fetchall()
    except (sqlite3.Error, ValueError):
        return None
    finally:
        con.close()
    by_study: dict[int, list] = {}
    for row in per_run:
        by_study.setdefault(row[1], []).append(row)
    now = now or utcnow()
    rows = []
    for sid, name, model, fs_id, spec, state, heartbeat, created in studies:
        st = SimpleNamespace(name=name, model=model, state=state,
                             scheduler_heartbeat=_when(heartbeat), created_at=_when(created))
        spec = StudySpec.from_dict(json.loads(spec) if spec else {})
        if spec.seeds:  # its cells are means over seeds: the Store's path reads them (status.seeded_list_row)
            return None
        rows.append(list_row(st, spec, sets.get(fs_id), fold_at_target(by_study.get(sid, []), spec.steps), now))
    return rows
