"""The app on a study of 10,000 and of 100,000 trials (Textual Pilot, in process: imports done, as
tests/lab/test_scale.py measures it): its first paint, and one refresh of the study's dashboard after
100 new cells.

    python bench/tui_scale.py [--sizes 10000,100000] [--repeat 3] [--workdir DIR] [--json] [--quick]

The stores are bench/store_scale.py's (one grid study, 4 methods × lrs × 25 milestones, made
through the studies API, cells written in bulk, room for 100 more cells), built once and kept under
--workdir (the same folder by default: the two benches share them). Per repetition the app opens a fresh copy: first paint is the time from
creating the app to its studies table filled; then the study's dashboard is opened (reported: to its
heatmaps and first trial page); then 100 new cells are recorded through
`studies.running.recorder.record_cell` (not timed) and one refresh is timed: from the dashboard's poll to
its header counting the new cells. Sizes alternate, --repeat times; medians are compared.

Targets, at 10,000 trials: first paint ≤ 1 s and the refresh ≤ 100 ms (at 100,000, reported).
--quick: 10,000 only, 1 repeat. With --json the last line is {"name", "ratio", "target", "pass",
...}; it exits 1 when a target is missed.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import CACHE, finish, medians, spread  # noqa: E402

PAINT_TARGET_S = 1.0
REFRESH_TARGET_S = 0.1
TARGET_AT = 10_000


def verdict(med: dict[int, dict[str, float]]) -> tuple[bool, list[str]]:
    """Whether the targets hold at 10,000 trials (a bench without that size does not pass)."""
    if TARGET_AT not in med:
        return False, [f"no measurement at {TARGET_AT:,} trials"]
    m, problems = med[TARGET_AT], []
    if m["first paint"] > PAINT_TARGET_S:
        problems.append(f"first paint {m['first paint']:.3f} s > {PAINT_TARGET_S} s")
    if m["refresh (100 new cells)"] > REFRESH_TARGET_S:
        problems.append(f"refresh {m['refresh (100 new cells)'] * 1000:.0f} ms > {REFRESH_TARGET_S * 1000:.0f} ms")
    return not problems, problems


def add_cells(url: str, trials: int) -> None:
    """The next store_scale.ROOM cells of the plan, through record_cell (what a worker does)."""
    from sqlmodel import select

    import store_scale
    from studies.lifecycle.spec import StudySpec
    from studies.running.recorder import record_cell
    from studies.store.db import Run, Store

    store = Store(url, create=False)
    spec = StudySpec.from_dict(store.study(store_scale.STUDY).spec)
    with store.read() as s:
        runs = list(s.exec(select(Run).order_by(Run.id)).all())
    cells = store_scale.planned_cells(runs, trials + store_scale.ROOM, skip=trials)
    for run, cell in cells:
        record_cell(store, store_scale.STUDY, spec, run, cell)
    store_scale.finish_runs(store, cells)


async def measure(url: str, trials: int) -> dict[str, float]:
    from textual.widgets import DataTable, Static

    import store_scale
    from tui.app.app import create_app
    from tui.app.messages import OpenStudy
    from tui.app.screens.dashboard import DashboardScreen
    from tui.app.screens.studies import StudiesScreen
    from tui.app.widgets.heatmap import HeatmapGrid

    async def until(pilot, predicate, timeout=120.0):
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise SystemExit(f"timed out on {trials:,} trials; screen {pilot.app.screen!r}")
            await pilot.pause(0.005)

    def head(app) -> str:
        return str(app.screen.query_one("#dash-head", Static).render())

    t0 = time.perf_counter()
    app = create_app(url, refresh_s=3600.0, read_devices=False)  # no timer tick: the bench polls
    async with app.run_test(size=(120, 40)) as pilot:
        await until(pilot, lambda: isinstance(app.screen, StudiesScreen)
                    and any(t.row_count == 1 for t in app.screen.query("#studies").results(DataTable)))
        first = time.perf_counter() - t0
        t1 = time.perf_counter()
        app.post_message(OpenStudy(store_scale.STUDY))
        await until(pilot, lambda: isinstance(app.screen, DashboardScreen) and len(app.screen.query(HeatmapGrid)) > 0
                    and app.screen.query_one("#trials", DataTable).row_count > 0 and "cells " in head(app))
        dashboard = time.perf_counter() - t1
        await app.screen.workers.wait_for_complete()
        before = head(app)
        await asyncio.to_thread(add_cells, url, trials)
        dash = app.screen
        t2 = time.perf_counter()
        dash.poll_store()
        await until(pilot, lambda: head(app) != before)
        refresh = time.perf_counter() - t2
        await dash.workers.wait_for_complete()
    return {"first paint": first, "dashboard open": dashboard, "refresh (100 new cells)": refresh}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="10000,100000")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--workdir", type=Path, default=CACHE / "store-scale")
    p.add_argument("--quick", action="store_true", help="10,000 trials only, 1 repeat")
    p.add_argument("--json", action="store_true", help="print the result as JSON on the last line")
    a = p.parse_args(argv)
    sizes = [TARGET_AT] if a.quick else sorted({int(s) for s in a.sizes.split(",") if s.strip()})
    repeat = 1 if a.quick else a.repeat
    a.workdir.mkdir(parents=True, exist_ok=True)
    os.environ["UNLEARN_HOME"] = str(a.workdir / "home")
    import store_scale

    stores = {n: store_scale.cached_store(a.workdir, n)[0] for n in sizes}
    work = Path(tempfile.mkdtemp(prefix="bench-tui-scale-"))

    def once(n: int) -> dict[str, float]:
        copy = work / f"{n}.db"
        copy.unlink(missing_ok=True)
        with sqlite3.connect(stores[n]) as src, sqlite3.connect(copy) as dst:
            src.backup(dst)
        return asyncio.run(measure(f"sqlite:///{copy}", n))

    once(sizes[0])  # warm: imports and the file cache, not counted
    times: dict[int, dict[str, list[float]]] = {n: {} for n in sizes}
    for _ in range(repeat):
        for n in sizes:
            for k, v in once(n).items():
                times[n].setdefault(k, []).append(v)
    shutil.rmtree(work, ignore_errors=True)  # the copies (1.5 GB at 100,000 trials)
    med = {n: medians(t) for n, t in times.items()}
    ok, problems = verdict(med)
    for n in sizes:
        print(f"{n:,} trials:")
        for k, v in times[n].items():
            print(spread(k, v))
    for line in problems:
        print(f"  FAIL {line}")
    print("pass" if ok else "MISSED")
    m = med.get(TARGET_AT, {})
    return finish({"name": "tui_scale", "ratio": m.get("first paint"), "target": PAINT_TARGET_S,
                   "target_is": "at 10,000 trials: first paint ≤ 1 s (ratio) and one refresh with 100 new cells ≤ 0.1 s",
                   "refresh_s": m.get("refresh (100 new cells)"), "refresh_target_s": REFRESH_TARGET_S,
                   "pass": ok, "median_s": {str(n): v for n, v in med.items()}, "problems": problems,
                   "sizes": sizes, "repeat": repeat, "quick": a.quick}, a.json)


if __name__ == "__main__":
    sys.exit(main())
