"""A study's workers as one SLURM job array, submitted through submitit: `unlearn study run NAME --slurm`.

Each array task is the worker pool `unlearn worker --study NAME` runs, on the devices SLURM gave the
task (its CUDA_VISIBLE_DEVICES, else one CPU worker with the task's CPUs), claiming runs from the
store until the study has none left. The store stays the one source of truth: nothing the lab
shows is read from `sacct` (a cluster without SLURM's accounting daemon knows no job states).

The store's URL reaches the tasks through their environment, never through submitit's files (a
password would sit in a pickle on a shared file system): sbatch hands the submitting process's
environment to each task.
"""
from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from engine.errors import UnlearnError
from studies.store.db import Event, Store, Study
from studies.store.sqlite_file import is_sqlite

# The study event that records a submission; its message names the array (read back by cancel).
SUBMITTED = "slurm"
SUBMITTED_MESSAGE = "submitted job array {array}: {jobs} worker task(s), logs in {folder}"
_ARRAY = re.compile(r"^submitted job array (\d+):")


@dataclass(frozen=True)
class SlurmOptions:
    jobs: int = 1  # array tasks, each a worker pool
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: str = "24:00:00"  # HH:MM:SS per task
    gpus_per_job: int = 0  # 0: CPU tasks
    cpus_per_gpu: int | None = None  # a CPU task's CPUs when gpus_per_job is 0 (default 1)
    mem_per_gpu: str | None = None  # e.g. 40G (a CPU task: its memory)
    extra: dict = field(default_factory=dict)  # --slurm-opt KEY=VALUE, sbatch's own names
    allow_sqlite: bool = False

    def validate(self) -> "SlurmOptions":
        if self.jobs < 1:
            raise UnlearnError(f"--jobs must be at least 1, not {self.jobs}")
        if self.gpus_per_job < 0:
            raise UnlearnError(f"--gpus-per-job must be 0 or more, not {self.gpus_per_job}")
        parts = self.time.split(":")
        if not (1 <= len(parts) <= 3 and all(p.isdigit() for p in parts)):
            raise UnlearnError(f"--time must be HH:MM:SS (or MM:SS, or minutes), not {self.time!r}")
        return self

    @property
    def minutes(self) -> int:
        parts = [int(p) for p in self.time.split(":")]
        if len(parts) == 1:
            return parts[0]
        h, m, s = ([0] * (3 - len(parts)) + parts)
        return max(1, h * 60 + m + (1 if s else 0))


def parse_slurm_opts(pairs: list[str]) -> dict:
    """--slurm-opt KEY=VALUE (sbatch's option names, without the dashes) into a dict."""
    out = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or not key.strip():
            raise UnlearnError(f"--slurm-opt takes KEY=VALUE (an sbatch option), not {pair!r}")
        out[key.strip().lstrip("-").replace("-", "_")] = value
    return out


def check_shared_store(store: Store, opts: SlurmOptions) -> None:
    """SLURM tasks land on any node: the store must be one every node reaches."""
    if is_sqlite(store.url) and not opts.allow_sqlite:
        raise UnlearnError("--slurm needs a store every node reaches: a PostgreSQL URL (UNLEARN_STORAGE_URL="
                           "postgresql+psycopg2://user@db-host/unlearn); an SQLite file is on one node, and its "
                           "locks do not hold over network file systems (--slurm-allow-sqlite for a one-node allocation)")


def submit(store: Store, name: str, opts: SlurmOptions, folder: Path) -> list[str]:
    """Submit the study's workers as one job array. Returns the tasks' SLURM job ids (ARRAY_INDEX)."""
    import submitit

    opts.validate()
    check_shared_store(store, opts)
    os.environ["UNLEARN_STORAGE_URL"] = store.url  # the tasks' environment (sbatch exports it), no file
    executor = submitit.AutoExecutor(folder=str(folder / "%j"), cluster="slurm")  # a folder per task
    params = {"timeout_min": opts.minutes, "slurm_array_parallelism": opts.jobs, "name": f"unlearn-{name}",
              "slurm_partition": opts.partition, "nodes": 1, "tasks_per_node": 1}
    if opts.gpus_per_job:
        params["gpus_per_node"] = opts.gpus_per_job
        params["cpus_per_task"] = (opts.cpus_per_gpu or 1) * opts.gpus_per_job
        if opts.mem_per_gpu:
            params["slurm_mem_per_gpu"] = opts.mem_per_gpu
    else:
        params["cpus_per_task"] = opts.cpus_per_gpu or 1
        if opts.mem_per_gpu:
            params["slurm_mem"] = opts.mem_per_gpu
    extra = dict(opts.extra)
    for key, value in (("account", opts.account), ("qos", opts.qos)):
        if value:
            extra[key] = value
    if extra:
        params["slurm_additional_parameters"] = extra
    executor.update_parameters(**{k: v for k, v in params.items() if v is not None})
    jobs = executor.map_array(run_task, [name] * opts.jobs)
    ids = [j.job_id for j in jobs]
    array = ids[0].split("_")[0] if ids else "?"
    store.log(SUBMITTED, SUBMITTED_MESSAGE.format(array=array, jobs=opts.jobs, folder=folder), store.study(name).id)
    return ids


def study_arrays(store: Store, study: Study) -> list[str]:
    """The job arrays submitted for a study (its submission events), oldest first."""
    from sqlmodel import select

    with store.read() as s:
        messages = s.exec(select(Event.message).where(Event.study_id == study.id, Event.kind == SUBMITTED)
                          .order_by(Event.id)).all()
    return [m.group(1) for m in map(_ARRAY.match, messages) if m]


def cancel_arrays(store: Store, study: Study) -> list[str]:
    """scancel the study's arrays still queued or running (read from `squeue`, not `sacct`: a cluster
    may have no accounting). Returns the arrays cancelled; [] where SLURM is not installed."""
    arrays = study_arrays(store, study)
    if not arrays:
        return []
    try:
        queued = subprocess.run(["squeue", "-h", "-j", ",".join(arrays), "-o", "%F"], capture_output=True,
                                text=True, timeout=30).stdout.split()
    except (OSError, subprocess.TimeoutExpired):
        return []
    live = [a for a in arrays if a in set(queued)]
    if live:
        subprocess.run(["scancel", *live], capture_output=True, text=True, timeout=30)
        store.log("slurm", f"cancelled job array(s) {', '.join(live)}", study.id)
    return live


def task_slots() -> list[str]:
    """The devices SLURM gave this task: its GPUs (renumbered from 0 by CUDA_VISIBLE_DEVICES), or
    one CPU worker with the task's CPUs as its threads."""
    visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    if visible:
        return [f"cuda:{i}" for i in range(len(visible))]
    cpus = os.environ.get("SLURM_CPUS_PER_TASK", "")
    if cpus.isdigit() and "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = cpus
    return ["cpu"]


def run_task(name: str) -> dict:
    """One array task: a worker pool on this task's devices, serving the study until it has no run
    left. A SIGTERM (scancel, preemption, the time limit) gives its running runs back."""
    from studies.running.pool import WorkerPool
    from studies.settings import lab_settings

    store = Store(lab_settings().storage_url, create=False)
    where = f"array task {os.environ.get('SLURM_ARRAY_TASK_ID', '?')} of job {os.environ.get('SLURM_ARRAY_JOB_ID', '?')}"
    print(f"{where} on {os.uname().nodename}: serving study {name}", flush=True)
    summary = WorkerPool(store, task_slots(), [name]).serve()
    print(f"{where}: done: {summary}", flush=True)
    return summary
