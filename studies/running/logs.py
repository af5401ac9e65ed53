"""Where the logs of a study live and the last lines of them, for the app's running-runs panel.

The worker pool (studies/running/pool.py) writes each run attempt's stdout+stderr to
`<log dir>/run<ID>-<METHOD>-attempt<N>.log` and a detached pool's own output to
`<log dir>/../<STUDY>-scheduler.log` (the file keeps its name). A log can grow to gigabytes over a long run, so a tail
seeks from the end and reads only the blocks it needs, never the whole file.

Reading never creates anything: a study or run with no log yet has an empty tail.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional

from sqlmodel import select

from studies.store.db import Run, Store, sqlite_path

BLOCK = 64 * 1024
MAX_TAIL_BYTES = 4 * 1024 * 1024  # a log with no newline for megabytes still answers quickly
_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]")


ATTACK_LOG = "best-cell-attacks.log"  # the study's best-cell attack job's output, in its log folder


def log_dir_for(store: Store, study: str, create: bool = True) -> Path:
    """Logs live beside a SQLite store (…/unlearn-logs/STUDY), else under UNLEARN_HOME/logs.
    Readers pass create=False: looking must not make the folder."""
    from studies.settings import lab_settings

    db = sqlite_path(store.url)
    base = db.parent / f"{db.stem}-logs" if db else lab_settings().home / "logs"
    d = base / study
    if create:
        d.mkdir(parents=True, exist_ok=True)
    return d


def log_folder(store: Store, study: str) -> Path:
    """The folder a study's run logs are written to, without creating it."""
    return log_dir_for(store, study, create=False)


def attempt_log_name(run_id: int, method: str, attempt: int | str) -> str:
    """The file one attempt of a run writes its output to, in its study's log folder (attempt "*":
    a glob of them all)."""
    return f"run{run_id}-{method}-attempt{attempt}.log"


def scheduler_log_path(store: Store, study: str) -> Path:
    """The log of the detached scheduler of a study (`unlearn study run --detach`)."""
    return log_folder(store, study).parent / f"{study}-scheduler.log"


def _attempt_of(path: Path) -> int:
    m = re.search(r"-attempt(\d+)\.log$", path.name)
    return int(m.group(1)) if m else -1


def run_log_path(store: Store, study: str, method: str, lr: float) -> Optional[Path]:
    """The log of the run's current attempt; else of its latest attempt that has one; else None."""
    st = store.study(study)
    with store.read() as s:
        runs = list(s.exec(select(Run).where(Run.study_id == st.id, Run.method == method)).all())
    run = next((r for r in runs if r.lr == lr), None) or next(
        (r for r in runs if abs(r.lr - lr) <= 1e-9 * abs(lr)), None)
    if run is None:
        return None
    folder = log_folder(store, study)
    current = folder / attempt_log_name(run.id, run.method, run.attempts)
    if current.is_file():
        return current
    try:
        earlier = [p for p in folder.glob(attempt_log_name(run.id, run.method, "*")) if p.is_file()]
    except OSError:
        return None
    return max(earlier, key=_attempt_of) if earlier else None


def tail_file(path: Path | str, lines: int = 40) -> list[str]:
    """The last `lines` lines of a text file, read backwards in blocks from its end. Carriage-return
    progress bars keep their last state only, and terminal colour codes are dropped."""
    if lines <= 0:
        return []
    try:
        f = open(path, "rb")
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return []
    with f:
        end = f.seek(0, os.SEEK_END)
        pos, chunks, newlines = end, [], 0
        while pos > 0 and newlines <= lines and end - pos < MAX_TAIL_BYTES:
            size = min(BLOCK, pos)
            pos -= size
            f.seek(pos)
            chunk = f.read(size)
            chunks.append(chunk)
            newlines += chunk.count(b"\n")
    data = b"".join(reversed(chunks))
    text = data.decode("utf-8", errors="replace")
    out = text.split("\n")
    if pos > 0:
        out = out[1:]  # the first line is cut: it started before what we read
    if out and out[-1] == "":
        out = out[:-1]  # the file ends with a newline
    out = [_ANSI.sub("", ln.rstrip("\r").rsplit("\r", 1)[-1]) for ln in out]
    return out[-lines:]


def tail(store: Store, study: str, method: str, lr: float, lines: int = 40) -> list[str]:
    """The last lines of a run's log (its current attempt, else its latest one); [] when there is none yet."""
    path = run_log_path(store, study, method, lr)
    return tail_file(path, lines) if path is not None else []


def scheduler_log_tail(store: Store, study: str, lines: int = 40) -> list[str]:
    """The last lines of a study's detached scheduler log; [] when it has none."""
    store.study(study)  # an unknown study is an error, not an empty log
    return tail_file(scheduler_log_path(store, study), lines)


SLURM_FOLDER = "slurm"  # in a study's log folder: submitit's folder per SLURM task (studies/running/slurm.py)


def study_logs(store: Store, study: str, run_id: int | None = None) -> list[dict]:
    """Every log of a study, oldest first: its detached scheduler's, each SLURM task's output and
    errors, its best-cell attack job's and each run attempt's; with `run_id`, that run's attempts
    only. Each: {path, kind (scheduler, slurm, attacks, run), run_id, attempt, slurm_job, bytes}.
    Logs are written on the node that ran the work: read from another node they show here only
    where the log folder is on a shared file system (UNLEARN_HOME, docs/cluster.md)."""
    st = store.study(study)  # an unknown study is an error, not an empty list
    folder = log_folder(store, study)
    if run_id is not None:
        with store.read() as s:
            run = s.get(Run, run_id)
        if run is None or run.study_id != st.id:
            from engine.errors import UnlearnError

            raise UnlearnError(f"study {study} has no run {run_id} (`unlearn study status {study} --json` lists its runs)")
    found: list[dict] = []

    def add(path: Path, kind: str, **extra) -> None:
        try:
            st = path.stat()
        except OSError:
            return
        found.append({"path": str(path), "kind": kind, "run_id": None, "attempt": None, "slurm_job": None,
                      "bytes": st.st_size, **extra, "_mtime": st.st_mtime})

    with_runs = re.compile(r"^run(\d+)-.+-attempt(\d+)\.log$")
    try:
        names = sorted(folder.iterdir()) if folder.is_dir() else []
    except OSError:
        names = []
    if run_id is None:
        add(scheduler_log_path(store, study), "scheduler")
        for task in sorted((folder / SLURM_FOLDER).glob("*/*_log.*")) if (folder / SLURM_FOLDER).is_dir() else []:
            add(task, "slurm", slurm_job=task.parent.name)  # submitit's folder per task: ARRAYJOB_INDEX
        add(folder / ATTACK_LOG, "attacks")
    for path in names:
        m = with_runs.match(path.name)
        if m and (run_id is None or int(m.group(1)) == run_id):
            add(path, "run", run_id=int(m.group(1)), attempt=int(m.group(2)))
    found.sort(key=lambda x: (x["_mtime"], x["path"]))
    for x in found:
        del x["_mtime"]
    return found
