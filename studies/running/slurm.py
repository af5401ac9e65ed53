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
from pathlib import Path

from engine.errors import UnlearnError
from studies.running.slurm_options import MAX_TIME_LIMIT_REQUEUES, SlurmOptions
from studies.store.db import Event, Store, Study
from studies.store.sqlite_file import is_sqlite

# The study event that records a submission; its message names the array (read back by cancel).
SUBMITTED = "slurm"
SUBMITTED_MESSAGE = "submitted job array {array}: {jobs} worker task(s), logs in {folder}"
_ARRAY = re.compile(r"^submitted job array (\d+):")


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
    # a folder per task; with --requeue, submitit requeues a task at most this many times at its time limit
    executor = submitit.AutoExecutor(folder=str(folder / "%j"), cluster="slurm",
                                     slurm_max_num_timeout=MAX_TIME_LIMIT_REQUEUES if opts.requeue else 0)
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
    if opts.requeue:
        extra["requeue"] = True  # preemptible partitions put the task back in the queue rather than end it
    # SLURM sends SIGUSR2 this long before the time limit: submitit requeues the task (--requeue) or
    # ends it; either way the pool gives its runs back first (INTERRUPT_GRACE_S, then the store).
    # submitit's 90 s, or all but the first 10 s of a limit shorter than 100 s
    params["slurm_signal_delay_s"] = max(10, min(90, opts.minutes * 60 - 10))
    executor.update_parameters(**{k: v for k, v in params.items() if v is not None})
    jobs = executor.map_array((RequeueingArrayTask if opts.requeue else ArrayTask)(), [name] * opts.jobs)
    ids = [j.job_id for j in jobs]
    array = ids[0].split("_")[0] if ids else "?"
    store.log(SUBMITTED, SUBMITTED_MESSAGE.format(array=array, jobs=opts.jobs, folder=folder), store.study(name).id)
    return ids


def launch_on_slurm(store: Store, name: str, opts: SlurmOptions, retry_failed: bool = True) -> tuple[str, str | None]:
    """What `unlearn study run NAME --slurm` does, and the app's Launch with SLURM chosen: hand the
    study's runs out again, then submit its workers as one job array. Returns (one line for the
    user, the array's job id, None when there was nothing to run). Refused on a store the nodes
    cannot share, or while another scheduler runs the study."""
    from studies.lifecycle.spec import study_spec
    from studies.lifecycle.study import resume_study
    from studies.running.launch import check_no_live_scheduler
    from studies.running.logs import log_dir_for

    check_shared_store(store, opts)
    width = study_spec(store.study(name)).gpus_per_run
    if width > max(1, opts.gpus_per_job):  # a task's pool could never start one of its runs
        raise UnlearnError(f"study {name} runs each run on {width} GPUs; give --gpus-per-job {width} or more "
                           f"(now {opts.gpus_per_job})")
    check_no_live_scheduler(store, name)
    resumed = resume_study(store, name, retry_failed=retry_failed)
    if not resumed.running:
        return resumed.message, None
    folder = log_dir_for(store, name) / "slurm"
    try:
        ids = submit(store, name, opts, folder)
    except UnlearnError:
        raise
    except Exception as exc:  # no sbatch here, the cluster refused the job: nothing serves the study, say so
        from studies.lifecycle.study import set_state
        from studies.store.db import first_line
        from studies.store.sqlite_file import scrub
        from studies.store.states import StudyState

        set_state(store, name, StudyState.PAUSED)
        raise UnlearnError(f"the job array was not submitted ({type(exc).__name__}: {scrub(first_line(exc), store.url)}); "
                           f"study {name} is paused: `unlearn study run {name} --slurm` submits again") from None
    array = ids[0].split("_")[0]
    return (f"study {name}: SLURM job array {array} ({len(ids)} worker task(s)); logs in {folder}. "
            f"Follow it: unlearn study status {name}"), array


def study_arrays(store: Store, study: Study) -> list[str]:
    """The job arrays submitted for a study (its submission events), oldest first."""
    from sqlmodel import select

    with store.read() as s:
        messages = s.exec(select(Event.message).where(Event.study_id == study.id, Event.kind == SUBMITTED)
                          .order_by(Event.id)).all()
    return [m.group(1) for m in map(_ARRAY.match, messages) if m]


def array_queue(arrays: list[str]) -> dict[str, list[dict] | None]:
    """What `squeue` says of these arrays' tasks, per array: [{task, state, reason, node}] ([] once
    none is queued or running; None where squeue could not be read). `sacct` is never asked: a
    cluster without accounting knows no state of a finished job."""
    if not arrays:
        return {}
    try:
        r = subprocess.run(["squeue", "-h", "-r", "-j", ",".join(arrays), "-o", "%F|%i|%T|%r|%N"],
                           capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return {a: None for a in arrays}
    if r.returncode and "Invalid job id" not in r.stderr:  # every array long gone is no error
        return {a: None for a in arrays}
    out: dict[str, list[dict] | None] = {a: [] for a in arrays}
    for line in r.stdout.splitlines():
        parts = line.strip().split("|")
        if len(parts) == 5 and parts[0] in out:
            out[parts[0]].append({"task": parts[1], "state": parts[2], "reason": parts[3], "node": parts[4] or None})
    return out


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
    left. A SIGTERM (scancel, preemption, the time limit) gives its running runs back; so does the
    SIGUSR2 SLURM sends before the time limit, through submitit's handler: its exception (or its
    SystemExit, once it requeued the task) unwinds the pool, whose shutdown gives them back."""
    from studies.running.pool import WorkerPool
    from studies.settings import lab_settings

    store = Store(lab_settings().storage_url, create=False)
    from studies.running.claim import slurm_job_here

    where = f"SLURM task {slurm_job_here()} (start {int(os.environ.get('SLURM_RESTART_COUNT') or 0) + 1})"
    print(f"{where} on {os.uname().nodename}: serving study {name}", flush=True)
    global _POOL
    _POOL = WorkerPool(store, task_slots(), [name])
    summary = _POOL.serve()
    print(f"{where}: done: {summary}", flush=True)
    return summary


_POOL = None  # the pool this task serves with (what checkpoint tells why it stops)


class ArrayTask:
    """What each array task calls (a picklable callable: submitit pickles it for the task)."""

    def __call__(self, name: str) -> dict:
        return run_task(name)


class RequeueingArrayTask(ArrayTask):
    """--requeue: submitit requeues a task it is signalled to stop (the time limit, a preemption)
    when its callable has `checkpoint`, and runs what that returns when the task starts again: the
    same call. Nothing else needs saving: the store holds the study's state, and the runs this task
    held are given back as its pool unwinds."""

    def checkpoint(self, name: str):
        import submitit

        print(f"requeueing: the task goes back in the queue and serves study {name} again", flush=True)
        if _POOL is not None:  # what the runs it gives back say stopped them
            _POOL.stop_reason = "SLURM's stop signal: the task is requeued"
        return submitit.helpers.DelayedSubmission(self, name)
