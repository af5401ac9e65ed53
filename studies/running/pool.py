"""The worker pool: claims runs from the store, gives each a fresh subprocess on its own device,
settles what happened, and retries what was killed. `unlearn study run` (one study, on this
box) and `unlearn worker` (join from any node) are this same loop.

All coordination is through the store (studies/running/claim.py), so any number of pools on any
number of nodes hand out each run once. A pool that dies leaves runs whose heartbeat goes stale;
any pool reaps them and retries them (studies/running/settle.py). A TPE study's runs are asked of
its sampler (studies/running/tpe.py); every process the pool starts has its command line built in
studies/running/processes.py.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from optuna.exceptions import StorageInternalError
from sqlalchemy import func
from sqlalchemy.exc import DBAPIError
from sqlmodel import select

from studies.lifecycle.spec import study_spec
from studies.running import processes, tpe
from studies.running.attack_job import attack_job_state, log_attack_event
from studies.running.claim import claim_due_attack_job, claim_pending
from studies.running.logs import ATTACK_LOG, attempt_log_name, log_dir_for, scheduler_log_path
from studies.running.processes import child_env, free_port  # noqa: F401 - the app's screens and the tests import them here
from studies.running.settle import give_back, reap_lost, settle
from studies.store.db import CellRow, Run, Store, Study, first_line, hostname, utcnow
from studies.store.sqlite_file import scrub
from studies.store.states import ACTIVE_RUN_STATES, IDLE_STUDY_STATES, RunState, StudyState

STOP_GRACE_S = 30  # a run process asked to stop (SIGTERM) gets this long before SIGKILL
# An interrupted pool (SIGINT, SIGTERM, SIGHUP: Ctrl-C, a preemption, a closed terminal) gives its
# runs back within this: each run is asked to stop at once, all of them together, then killed.
INTERRUPT_GRACE_S = 10
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
# What one pass of the pool may meet and live through: the database locked past its busy timeout,
# a PostgreSQL restart or a dropped connection, a full disk when a log is opened. It waits (doubling
# up to MAX_BACKOFF_S) and tries again; its runs go on meanwhile.
STORE_ERRORS = (DBAPIError, StorageInternalError, OSError)
MAX_BACKOFF_S = 30.0


@dataclass
class Child:
    proc: subprocess.Popen
    run_id: int | None  # None: the study's best-cell attack job (studies/running/attack.py)
    study_id: int
    slot: str  # the devices it runs on, comma-separated
    attempt: int  # the run's attempt; the attack job's claim
    keys: tuple[str, ...] = ()  # the pool's slot keys it holds (a run of a study with --gpus-per-run N holds N)


class WorkerPool:
    def __init__(self, store: Store, slots: list[str], studies: list[str] | None = None,
                 heartbeat_timeout: float | None = None, poll_s: float = 0.5,
                 on_tick: Callable[[dict], None] | None = None, allow_remote_code: bool = True):
        """`allow_remote_code=False` (`unlearn worker` without --allow-remote-code): studies whose
        spec runs code that came with them (StudySpec.remote_code) are left to other workers."""
        from studies.settings import lab_settings

        self.store, self.slots, self.study_names = store, slots, studies
        self.heartbeat_timeout = heartbeat_timeout or lab_settings().heartbeat_timeout
        self.poll_s, self.on_tick = poll_s, on_tick
        self.allow_remote_code = allow_remote_code
        self._refused: set[int] = set()  # studies this pool said it leaves alone (said once each)
        self._orphans_due: dict[int, float] = {}  # TPE study -> when to look for its orphan trials again
        self.children: dict[str, Child] = {}  # its first slot key -> child
        self.host = hostname()
        self._stopping = False
        self._signals = 0
        self.stop_reason: str | None = None  # what stopped it, for the runs it gives back (their event)
        self.threads = cpu_threads(slots)
        self.summary = {"spawned": 0, "retried": 0, "failed": 0}

    # ------------------------------------------------------------------ the loop
    def serve(self) -> dict:
        """Hand runs out until the studies have none left. The first SIGINT, SIGTERM or SIGHUP stops
        the pool within INTERRUPT_GRACE_S and gives its running runs back, no attempt spent; a
        second one kills them at once."""
        old = {sig: signal.signal(sig, self._on_signal) for sig in STOP_SIGNALS}
        failures = 0
        try:
            while not self._stopping:
                try:
                    if self._iteration():
                        break
                    failures = 0
                    time.sleep(self.poll_s)
                except STORE_ERRORS as exc:  # one bad moment of the database or the disk stops no run
                    failures += 1
                    wait = min(MAX_BACKOFF_S, self.poll_s * 2 ** failures)
                    print(f"{time.strftime('%F %T')} pool: {type(exc).__name__}: "
                          f"{scrub(first_line(exc), self.store.url)}; trying again in {wait:.1f} s",
                          file=sys.stderr, flush=True)
                    time.sleep(wait)
        except BaseException as exc:  # e.g. submitit's SIGUSR2 handler before a SLURM time limit
            self.stop_reason = self.stop_reason or (f"{type(exc).__name__}: {first_line(exc)}" if str(exc) else type(exc).__name__)
            raise
        finally:
            self._shutdown()
            for sig, handler in old.items():
                signal.signal(sig, handler)
        return self.summary

    def _iteration(self) -> bool:
        """One pass: settle, reap, claim and start, beat. True when the pool is finished."""
        self._settle_children()
        self._reap_lost()
        studies = self._studies()
        self._fail_orphan_trials(studies)
        self._stop_cancelled(studies)
        if not self._stopping:
            free = self._free_slots()
            while free:
                run = self._claim(studies, width=len(free))
                if run is not None:
                    width = next(study_spec(st).gpus_per_run for st in studies if st.id == run.study_id)
                    self._spawn(free[:width], run)
                    free = free[width:]
                elif (due := claim_due_attack_job(self.store, studies, self.host, self._attack_jobs(),
                                                  self.heartbeat_timeout)) is not None:
                    self._spawn_attack_job(free[0], *due)
                    free = free[1:]
                else:
                    break
        self._mark_done(studies)
        self._beat(studies)
        if self.on_tick:
            self.on_tick(self._progress(studies))
        if self._stopping and not self.children:
            return True
        return not self.children and not any(self._has_work(st) for st in self._studies())

    def _on_signal(self, signum, frame):
        self._signals += 1
        self._stopping = True
        self.stop_reason = self.stop_reason or signal.Signals(signum).name
        if self._signals > 1:  # asked twice: no more waiting
            for child in self.children.values():
                with contextlib.suppress(OSError):
                    child.proc.kill()

    def _free_slots(self) -> list[str]:
        keys = [f"{i}:{s}" for i, s in enumerate(self.slots)]
        held = {k for c in self.children.values() for k in c.keys}
        return [k for k in keys if k not in held]

    # ------------------------------------------------------------------ studies
    def _studies(self) -> list[Study]:
        """The studies this pool serves: those named, or every running and paused one; without
        allow_remote_code, not those that would run code that came with them."""
        with self.store.read() as s:
            q = select(Study)
            if self.study_names is not None:
                q = q.where(Study.name.in_(self.study_names))
            else:
                q = q.where(Study.state.in_((StudyState.RUNNING, StudyState.PAUSED)))
            studies = list(s.exec(q).all())
        if self.allow_remote_code:
            return studies
        kept = []
        for st in studies:
            why = study_spec(st).remote_code
            if not why:
                kept.append(st)
            elif st.id not in self._refused:
                self._refused.add(st.id)
                print(f"{time.strftime('%F %T')} pool: study {st.name} left alone: it runs {', '.join(why)}; "
                      "a worker started with --allow-remote-code runs it", file=sys.stderr, flush=True)
        return kept

    def _has_work(self, study: Study) -> bool:
        if study.state in IDLE_STUDY_STATES:
            return False
        spec = study_spec(study)
        if spec.gpus_per_run > len(self.slots):  # this pool can never run it (`study run` refuses it up front)
            return False
        with self.store.read() as s:
            active = s.exec(select(func.count()).select_from(Run).where(
                Run.study_id == study.id, Run.state.in_(ACTIVE_RUN_STATES))).one()
            total = s.exec(select(func.count()).select_from(Run).where(Run.study_id == study.id)).one()
        if active > 0 or (spec.sampler == "tpe" and total < spec.total_runs):
            return True
        return spec.wants_best_cell_attacks and attack_job_state(self.store, study.id)[0] not in ("done", "failed")

    def _mark_done(self, studies: list[Study]) -> None:
        for st in studies:
            if st.state == StudyState.RUNNING and not self._has_work(st):
                with self.store.write() as s:
                    row = s.get(Study, st.id)
                    if row.state == StudyState.RUNNING:
                        row.state, row.updated_at = StudyState.DONE, utcnow()
                        s.add(row)
                self.store.log("done", f"study {st.name} finished", st.id)

    def _beat(self, studies: list[Study]) -> None:
        if self.study_names is None:
            return
        for st in studies:
            if st.state == StudyState.RUNNING:
                with self.store.write() as s:
                    row = s.get(Study, st.id)
                    row.scheduler_pid, row.scheduler_host, row.scheduler_heartbeat = os.getpid(), self.host, self.store.now(s)
                    s.add(row)

    def _progress(self, studies: list[Study]) -> dict:
        ids = [st.id for st in studies]
        with self.store.read() as s:
            cells = s.exec(select(func.count()).select_from(CellRow).join(Run, CellRow.run_id == Run.id).where(Run.study_id.in_(ids))).one()
        specs = [study_spec(st) for st in studies]
        total = sum(spec.total_runs * len(spec.steps) for spec in specs)
        return {"cells_done": cells, "cells_total": total, "running": len(self.children),
                "states": {st.name: st.state for st in studies}}

    # ------------------------------------------------------------------ claiming
    def _claim(self, studies: list[Study], width: int = 1) -> Run | None:
        """A run of a running study that needs at most `width` devices, claimed for this pool: a
        pending one, else one a TPE study's sampler asks for."""
        running = [st for st in studies if st.state == StudyState.RUNNING and study_spec(st).gpus_per_run <= width]
        if not running:
            return None
        run = claim_pending(self.store, [st.id for st in running], self.host)
        if run is not None:
            return run
        for st in running:
            spec = study_spec(st)
            if spec.sampler == "tpe":
                run = tpe.ask(self.store, st, spec, self.host)
                if run is not None:
                    return run
        return None

    def _fail_orphan_trials(self, studies: list[Study]) -> None:
        """A TPE study's trials left RUNNING by a pool that died mid-ask, told FAIL (tpe.py): looked
        for when the pool first sees the study, then once per heartbeat timeout."""
        now = time.monotonic()
        for st in studies:
            if st.state != StudyState.RUNNING or study_spec(st).sampler != "tpe" or now < self._orphans_due.get(st.id, 0.0):
                continue
            self._orphans_due[st.id] = now + self.heartbeat_timeout
            told = tpe.fail_orphan_trials(self.store, st)
            if told:
                self.store.log("trials failed", f"trial(s) {', '.join(map(str, told))} left running by a pool that "
                               "died mid-ask, told FAIL", st.id)

    def _attack_jobs(self) -> set[int]:
        """The studies whose best-cell attack job runs in this pool."""
        return {c.study_id for c in self.children.values() if c.run_id is None}

    # ------------------------------------------------------------------ children
    def _threads(self, device: str) -> int:
        """torch CPU threads of a process on `device` (0: torch's default, for a GPU process)."""
        return self.threads if device == "cpu" else 0

    def _spawn(self, keys: list[str], run: Run) -> None:
        """The run's process on its slots: one worker, or with N slots N workers under torchrun, each
        an Accelerator process (data parallel: each trains 1/N of every batch; the main one evaluates
        and writes to the store)."""
        slots = [k.split(":", 1)[1] for k in keys]
        visible, device = processes.devices_of(slots)
        with self.store.read() as s:
            study = s.get(Study, run.study_id)
        log = log_dir_for(self.store, study.name) / attempt_log_name(run.id, run.method, run.attempts)
        command = processes.worker_command(run.id, device, self._threads(device), processes=len(slots),
                                           attempt=run.attempts)
        # its own session: a Ctrl-C in the terminal of a foreground `study run` reaches the pool alone,
        # which gives the run back instead of letting it die as a failed attempt
        proc = processes.start(command, self.store, log, cuda_visible=visible, new_session=True)
        slot = ",".join(slots)
        with self.store.write() as s:
            row = s.get(Run, run.id)
            row.pid, row.device = proc.pid, slot
            s.add(row)
        self.children[keys[0]] = Child(proc, run.id, run.study_id, slot, run.attempts, tuple(keys))
        self.summary["spawned"] += 1
        self.store.log("started", f"{run.method} lr={run.lr:g} attempt {run.attempts} on {slot} (pid {proc.pid})", run.study_id, run.id)

    def _spawn_attack_job(self, key: str, study: Study, claim: int) -> None:
        """The study's attacks at each method's best cell, in its own process on this slot, under
        this pool's claim on the job."""
        slot = key.split(":", 1)[1]
        visible, device = processes.devices_of([slot])
        log_path = log_dir_for(self.store, study.name) / ATTACK_LOG
        proc = processes.start(processes.attack_command(study.name, device, self._threads(device), claim), self.store,
                               log_path, cuda_visible=visible, new_session=True)
        self.children[key] = Child(proc, None, study.id, slot, claim, (key,))
        self.store.log("started", f"best-cell attacks on {slot} (pid {proc.pid}); log {log_path}", study.id)

    def _settle_children(self) -> None:
        if self._stopping:  # asked to stop: a child the same signal ended is given back (_shutdown), not failed
            return
        for key, child in list(self.children.items()):
            rc = child.proc.poll()
            if rc is None:
                continue
            del self.children[key]
            if rc < 0:
                reason = f"killed by {signal.Signals(-rc).name}"
            else:
                reason = f"exited with code {rc}" if rc else ""
            if child.run_id is None:  # the job logged "attacks done" itself when it succeeded
                if rc:  # (only while its claim holds: a job another pool took over ends nothing)
                    log_attack_event(self.store, child.study_id, child.attempt, "attacks failed",
                                     f"best-cell attacks {reason}; see the study's {ATTACK_LOG}, "
                                     "rerun with `unlearn study attack`")
                continue
            self._settle(child.run_id, reason, child.attempt)

    def _settle(self, run_id: int, reason: str, attempt: int) -> None:
        """Attempt `attempt` of a run has no process any more: settle.settle (which leaves the run
        alone when another attempt holds it), counted in this pool's summary."""
        state = settle(self.store, run_id, reason, attempt)
        if state == RunState.PENDING:
            self.summary["retried"] += 1
        elif state == RunState.FAILED:
            self.summary["failed"] += 1

    def _reap_lost(self) -> None:
        reap_lost(self.store, self.host, {c.run_id for c in self.children.values()}, self.heartbeat_timeout,
                  self._settle)

    def _stop_child(self, child: Child) -> None:
        """SIGTERM, then SIGKILL after STOP_GRACE_S: stopping a run never hangs the pool."""
        child.proc.terminate()
        try:
            child.proc.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            child.proc.kill()
            child.proc.wait()

    def _stop_cancelled(self, studies: list[Study]) -> None:
        cancelled = {st.id for st in studies if st.state == StudyState.CANCELLED}
        for key, child in list(self.children.items()):
            if child.study_id in cancelled:
                self._stop_child(child)
                del self.children[key]
                if child.run_id is None:
                    log_attack_event(self.store, child.study_id, child.attempt, "attacks stopped",
                                     "best-cell attacks stopped: the study was cancelled")
                else:
                    self._settle(child.run_id, "the study was cancelled", child.attempt)

    def _shutdown(self) -> None:
        """Interrupted: stop our runs (all together, within INTERRUPT_GRACE_S) and give them back, the
        attempt not counted against them."""
        for child in self.children.values():
            with contextlib.suppress(OSError):
                child.proc.terminate()
        deadline = time.monotonic() + INTERRUPT_GRACE_S
        for child in self.children.values():
            try:
                child.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.proc.kill()
                child.proc.wait()
        for key, child in list(self.children.items()):
            if child.run_id is None:  # due again for the next pool
                log_attack_event(self.store, child.study_id, child.attempt, "attacks stopped",
                                 "best-cell attacks stopped: the pool was interrupted")
            else:
                give_back(self.store, child.run_id, child.attempt, f"its pool ({self.stop_reason or 'stopped'})")
            del self.children[key]


def cpu_threads(slots: list[str]) -> int:
    """torch threads per CPU run: the cores shared among the CPU slots, at most OMP_NUM_THREADS where
    it is set (a batch system sets it to a job's CPUs; more threads than cores only spin). 0: no CPU slot."""
    n_cpu = sum(1 for s in slots if s == "cpu")
    if not n_cpu:
        return 0
    threads = max(1, (os.cpu_count() or 1) // n_cpu)
    cap = os.environ.get("OMP_NUM_THREADS", "")
    return min(threads, int(cap)) if cap.isdigit() and int(cap) > 0 else threads


def detach(store: Store, name: str, slots: list[str]) -> tuple[int, Path]:
    """Start the scheduler in a new session so it outlives this terminal and its SSH session."""
    log_dir_for(store, name)  # the study's log folder, made now: the scheduler's log sits beside it
    log = scheduler_log_path(store, name)
    proc = processes.start(processes.pool_command(name, slots), store, log, new_session=True)
    return proc.pid, log


def main(argv: list[str] | None = None) -> int:
    from studies.settings import lab_settings

    p = argparse.ArgumentParser(description="unlearn-lab scheduler (started by `unlearn study run --detach`); "
                                            "the store's URL comes from UNLEARN_STORAGE_URL.")
    p.add_argument("--study", action="append")
    p.add_argument("--slots", required=True)
    a = p.parse_args(argv)
    store = Store(lab_settings().storage_url, create=False)
    print(f"{time.strftime('%F %T')} scheduler pid {os.getpid()} serving {a.study} on {a.slots}", flush=True)
    summary = WorkerPool(store, a.slots.split(","), a.study).serve()
    print(f"{time.strftime('%F %T')} scheduler done: {summary}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
