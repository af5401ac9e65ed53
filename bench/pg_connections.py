"""How many workers one PostgreSQL takes: the connections a worker pool and its run processes hold
while a real study runs, and what the server gives idle connections.

  python bench/pg_connections.py [--url URL] [--idle N] [--json]

URL: a PostgreSQL server where this user may create a database (default $UNLEARN_TEST_PG_URL, which
.ci/postgres sets). In a scratch database it
  1. runs a real study (2 methods x 2 learning rates on a tiny Llama) with `unlearn worker --workers 2`
     (a pool process and a process per run: what one array task of `study run --slurm` runs) and
     samples pg_stat_activity every 20 ms: the connections each of our processes holds (they name
     themselves "unlearn-lab pid N"), at its peak and most of the time;
  2. opens up to N idle connections (default: as many as the server allows) and reads what each
     costs the server (private memory of its backend process, where the server runs here).
It prints a task's connections and the number of one-GPU tasks the server's max_connections takes.
The target: each process keeps (median over its life) at most 2 connections; its peak, while a
cell's rows and its Optuna trial are written and the run's heartbeat thread beats, is printed too.
"""
from __future__ import annotations

import argparse
import collections
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from _common import ROOT, finish, tiny_workspace

TARGET_PER_PROCESS = 2


def sample_connections(admin_url: str, db: str, stop: threading.Event, samples: list) -> None:
    """pg_stat_activity every 20 ms: {application_name: connections} of the scratch database."""
    import psycopg2

    con = psycopg2.connect(admin_url)
    con.autocommit = True
    cur = con.cursor()
    while not stop.is_set():
        cur.execute("SELECT application_name, count(*) FROM pg_stat_activity WHERE datname = %s "
                    "AND application_name LIKE 'unlearn-lab pid %%' GROUP BY application_name", (db,))
        samples.append(dict(cur.fetchall()))
        time.sleep(0.02)
    con.close()


def private_kib(pid: int) -> int | None:
    """A backend's private memory (RssAnon), where the server runs on this machine."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default=os.environ.get("UNLEARN_TEST_PG_URL"))
    p.add_argument("--idle", type=int, default=0, help="idle connections to open (0: up to the server's limit)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if not args.url:
        print("no PostgreSQL: give --url or set UNLEARN_TEST_PG_URL (. .ci/postgres)")
        return finish({"name": "pg_connections", "ratio": None, "target": TARGET_PER_PROCESS, "pass": None,
                       "skipped": "no PostgreSQL"}, args.json)
    import psycopg2
    from sqlalchemy.engine import make_url

    base = make_url(args.url)
    admin = base.set(drivername="postgresql").render_as_string(hide_password=False)
    db = f"unlearn_bench_conn_{os.getpid()}"
    con = psycopg2.connect(admin)
    con.autocommit = True
    con.cursor().execute(f'CREATE DATABASE "{db}"')
    url = base.set(database=db).render_as_string(hide_password=False)
    work = Path(tempfile.mkdtemp(prefix="unlearn-bench-conn-"))
    try:
        from studies.lifecycle.study import create_study
        from studies.store.db import Store
        from studies.store.forgetsets import create_forget_set

        model, _texts, _sets = tiny_workspace(work / "ws", hidden=64, layers=2, heads=2, seq_len=64)
        store = Store(url)
        ws = work / "ws"
        create_forget_set(store, "fs", [str(ws / "forget.jsonl")], [str(ws / "retain.jsonl")],
                          [str(ws / "unseen.jsonl")], [str(ws / "general.jsonl")], seq_len=64)
        create_study(store, "S", str(model), "fs", methods=["ga", "ga_gd"], lrs=[1e-4, 3e-4], steps=[2, 20])
        store.engine.dispose()
        env = {**os.environ, "UNLEARN_STORAGE_URL": url, "UNLEARN_HOME": str(work / "home"), "OMP_NUM_THREADS": "1"}
        samples: list[dict] = []
        stop = threading.Event()
        sampler = threading.Thread(target=sample_connections, args=(admin, db, stop, samples))
        sampler.start()
        t0 = time.monotonic()
        worker = subprocess.Popen([sys.executable, "-m", "tui.cli", "study", "run", "S", "--workers", "2"], env=env,
                                  cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        _, err = worker.communicate(timeout=600)
        stop.set()
        sampler.join()
        if worker.returncode:
            print(f"the study failed: {err.strip().splitlines()[-1:]}")
            return 1
        pool_name = f"unlearn-lab pid {worker.pid}"
        per_process: dict[str, list[int]] = collections.defaultdict(list)
        for s in samples:
            for name, n in s.items():
                per_process[name].append(n)
        runs = {k: v for k, v in per_process.items() if k != pool_name}
        pool = per_process.get(pool_name, [0])
        run_peak = max((max(v) for v in runs.values()), default=0)
        run_typical = statistics.median([statistics.median(v) for v in runs.values()]) if runs else 0
        total_peak = max((sum(s.values()) for s in samples), default=0)
        print(f"a study of 4 runs on `study run --workers 2` ({time.monotonic() - t0:.0f} s, {len(samples)} samples "
              f"of pg_stat_activity):")
        print(f"  the pool process: at most {max(pool)} connection(s), median {statistics.median(pool):.0f}")
        print(f"  each run process ({len(runs)}): at most {run_peak}, median {run_typical:.0f}")
        print(f"  all together: at most {total_peak}")

        # 2. idle connections up to the server's limit, and their cost
        cur = con.cursor()
        cur.execute("SELECT current_setting('max_connections')::int, current_setting('superuser_reserved_connections')::int, "
                    "(SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend')")
        max_conn, reserved, busy = cur.fetchone()
        want = args.idle or max_conn
        opened, refused = [], None
        while len(opened) < want:
            try:
                c = psycopg2.connect(base.set(drivername="postgresql", database=db).render_as_string(hide_password=False),
                                     application_name="unlearn-bench idle")
                c.cursor().execute("SELECT 1")
                opened.append(c)
            except psycopg2.OperationalError as exc:
                refused = str(exc).strip().splitlines()[0]
                break
        cur.execute("SELECT pid FROM pg_stat_activity WHERE application_name = 'unlearn-bench idle'")
        kib = [k for (pid,) in cur.fetchall() if (k := private_kib(pid)) is not None]
        for c in opened:
            c.close()
        per_task = max(pool) + run_peak  # a one-GPU task: its pool and one run
        usable = max_conn - reserved
        print(f"the server: max_connections {max_conn} ({reserved} reserved for superusers, {busy} in use before): "
              f"opened {len(opened)} idle connections" + (f", then refused: {refused}" if refused else ""))
        if kib:
            print(f"  each idle backend's private memory: median {statistics.median(kib) / 1024:.1f} MiB "
                  f"(of {len(kib)} read from /proc)")
        print(f"a one-GPU array task holds at most {per_task} connections (pool {max(pool)} + run {run_peak}): "
              f"max_connections {max_conn} takes {usable // max(per_task, 1)} such tasks at once "
              f"(a G-GPU task: {max(pool)} + G x {run_peak})")
        worst = max(statistics.median(pool), run_typical)  # what a process keeps
        return finish({"name": "pg_connections", "ratio": worst, "target": TARGET_PER_PROCESS,
                       "pass": worst <= TARGET_PER_PROCESS, "pool_peak": max(pool), "run_peak": run_peak,
                       "run_median": run_typical, "total_peak": total_peak, "max_connections": max_conn,
                       "idle_opened": len(opened), "idle_backend_mib": statistics.median(kib) / 1024 if kib else None,
                       "one_gpu_tasks": usable // max(per_task, 1)}, args.json)
    finally:
        import shutil

        cur = con.cursor()
        cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()", (db,))
        cur.execute(f'DROP DATABASE IF EXISTS "{db}"')
        con.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
