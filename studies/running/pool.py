"""The worker pool: claims runs from the store, gives each a fresh subprocess on its own device,
settles what happened, and retries what was killed. `unlearn study run` (one study, on this
box) and `unlearn worker` (join from any node) are this same loop.

All coordination is through the store: a claim is one IMMEDIATE transaction (SQLite) or
SELECT ... FOR UPDATE SKIP LOCKED (PostgreSQL), so any number of pools on any number of
nodes hand out each run once. A pool that dies leaves runs whose heartbeat goes stale;
any pool reaps them and retries them.
"""
from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from sqlalchemy import func
from sqlmodel import select

from studies.running.attack import attack_job_state, claim_attack_job
from studies.lifecycle.spec import StudySpec, study_spec
from studies.store.states import ACTIVE_RUN_STATES, IDLE_STUDY_STATES, RunState, StudyState
from studies.store.clock import age_s
from studies.store.db import Milestone, Run, Store, Study, hostname, sqlite_path, utcnow

STOP_GRACE_S = 30  # a run process asked to stop (SIGTERM) gets this long before SIGKILL


@dataclass
class Child:
    proc: subprocess.Popen
    run_id: int | None  # None: the study's best-cell attack job (studies/running/attack.py)
    study_id: int
    slot: str  # the devices it runs on, comma-separated
    attempt: int
    keys: tuple[str, ...] = ()  # the pool's slot keys it holds (a run of a study with --gpus-per-run N holds N)


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


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (dead, never reaped: PID 1 of many containers does not wait) is gone too
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _age_s(when) -> float:
    """Seconds since a heartbeat; a run that never beat is infinitely old."""
    return float("inf") if when is None else age_s(when)


class WorkerPool:
    def __init__(self, store: Store, slots: list[str], studies: list[str] | None = None,
                 heartbeat_timeout: float | None = None, poll_s: float = 0.5,
                 on_tick: Callable[[dict], None] | None = None):
        from studies.settings import lab_settings

        self.store, self.slots, self.study_names = store, slots, studies
        self.heartbeat_timeout = heartbeat_timeout or lab_settings().heartbeat_timeout
        self.poll_s, self.on_tick = poll_s, on_tick
        self.children: dict[str, Child] = {}  # its first slot key -> child
        self.host = hostname()
        self._stopping = False
        n_cpu = sum(1 for s in slots if s == "cpu")
        self.threads = max(1, (os.cpu_count() or 1) // n_cpu) if n_cpu else 0
        self.summary = {"spawned": 0, "retried": 0, "failed": 0}

    # ------------------------------------------------------------------ the loop
    def serve(self) -> dict:
        old = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            while True:
                self._settle_children()
                self._reap_lost()
                studies = self._studies()
                self._stop_cancelled(studies)
                if not self._stopping:
                    free = self._free_slots()
                    while free:
                        run = self._claim(studies, width=len(free))
                        if run is not None:
                            width = next(study_spec(st).gpus_per_run for st in studies if st.id == run.study_id)
                            self._spawn(free[:width], run)
                            free = free[width:]
                        elif (study := self._claim_attack_job(studies)) is not None:
                            self._spawn_attack_job(free[0], study)
                            free = free[1:]
                        else:
                            break
                self._mark_done(studies)
                self._beat(studies)
                if self.on_tick:
                    self.on_tick(self._progress(studies))
                if self._stopping and not self.children:
                    break
                if not self.children and not any(self._has_work(st) for st in self._studies()):
                    break
                time.sleep(self.poll_s)
        finally:
            self._shutdown()
            for sig, handler in old.items():
                signal.signal(sig, handler)
        return self.summary

    def _on_signal(self, signum, frame):
        self._stopping = True

    def _free_slots(self) -> list[str]:
        keys = [f"{i}:{s}" for i, s in enumerate(self.slots)]
        held = {k for c in self.children.values() for k in c.keys}
        return [k for k in keys if k not in held]

    # ------------------------------------------------------------------ studies
    def _studies(self) -> list[Study]:
        with self.store.read() as s:
            q = select(Study)
            if self.study_names is not None:
                q = q.where(Study.name.in_(self.study_names))
            else:
                q = q.where(Study.state.in_((StudyState.RUNNING, StudyState.PAUSED)))
            return list(s.exec(q).all())

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
                    row.scheduler_pid, row.scheduler_host, row.scheduler_heartbeat = os.getpid(), self.host, utcnow()
                    s.add(row)

    def _progress(self, studies: list[Study]) -> dict:
        ids = [st.id for st in studies]
        with self.store.read() as s:
            cells = s.exec(select(func.count()).select_from(Milestone).join(Run, Milestone.run_id == Run.id).where(Run.study_id.in_(ids))).one()
        specs = [study_spec(st) for st in studies]
        total = sum(spec.total_runs * len(spec.steps) for spec in specs)
        return {"cells_done": cells, "cells_total": total, "running": len(self.children),
                "states": {st.name: st.state for st in studies}}

    # ------------------------------------------------------------------ claiming
    def _claim(self, studies: list[Study], width: int = 1) -> Run | None:
        """A run of a running study that needs at most `width` devices, claimed for this pool."""
        running = [st for st in studies if st.state == StudyState.RUNNING
                   and study_spec(st).gpus_per_run <= width]
        if not running:
            return None

        def claim_pending():
            with self.store.write() as s:
                q = (select(Run).where(Run.study_id.in_([st.id for st in running]), Run.state == RunState.PENDING)
                     .order_by(Run.id).limit(1).with_for_update(skip_locked=True))
                run = s.exec(q).first()
                if run is not None:
                    self._mark_claimed(run)
                    s.add(run)
                return run

        run = self.store.retry(claim_pending)
        if run is not None:
            return run
        for st in running:
            spec = study_spec(st)
            if spec.sampler == "tpe":
                run = self._ask(st, spec)
                if run is not None:
                    return run
        return None

    def _claim_attack_job(self, studies: list[Study]) -> Study | None:
        """A running study whose runs are all over and whose best-cell attacks are due (claimed here)."""
        mine = {c.study_id for c in self.children.values() if c.run_id is None}
        for st in studies:
            spec = study_spec(st)
            if st.state != StudyState.RUNNING or not spec.wants_best_cell_attacks or st.id in mine:
                continue
            with self.store.read() as s:
                runs = list(s.exec(select(Run.state).where(Run.study_id == st.id)).all())
            if any(r in ACTIVE_RUN_STATES for r in runs) or (spec.sampler == "tpe" and len(runs) < spec.total_runs):
                continue
            if claim_attack_job(self.store, st, self._owner_alive):
                return st
        return None

    def _owner_alive(self, started: str) -> bool:
        """Whether the pool named in an "attacks started" event still runs. Only a pool on this host
        can be checked; one elsewhere is taken to be alive (its own host's pools will see it gone)."""
        import re

        m = re.search(r"pid (\d+) on (\S+)", started)
        return m is None or m.group(2) != self.host or _pid_alive(int(m.group(1)))

    def _mark_claimed(self, run: Run) -> None:
        run.state, run.attempts = RunState.RUNNING, run.attempts + 1
        run.host, run.pid, run.heartbeat, run.started_at, run.step = self.host, None, utcnow(), utcnow(), 0

    def _ask(self, study: Study, spec: StudySpec) -> Run | None:
        """TPE: reserve a run slot under the budget, then let the sampler choose (method, lr, steps).

        The reservation is a row in state ASKING (no method, a negative lr to keep the unique
        constraint): every reader leaves such rows out. It carries this pool's pid and host, so a
        pool that dies mid-ask leaves a row the next pool on this host removes at once."""
        import optuna

        with self.store.write() as s:
            n = s.exec(select(func.count()).select_from(Run).where(Run.study_id == study.id)).one()
            if n >= spec.total_runs:
                return None
            placeholder = Run(study_id=study.id, method="", lr=-random.random(), state=RunState.ASKING,
                              heartbeat=utcnow(), host=self.host, pid=os.getpid())
            s.add(placeholder)
            s.flush()
            run_id = placeholder.id
        try:
            sampler = optuna.samplers.TPESampler(seed=spec.run.seed + n)
            ostudy = self.store.retry(lambda: optuna.load_study(study_name=study.name, storage=self.store.optuna, sampler=sampler))
            trial = self.store.retry(lambda: ostudy.ask())
            method = trial.suggest_categorical("method", list(spec.methods))
            lr = trial.suggest_float("lr", spec.lr_range[0], spec.lr_range[1], log=True)
            steps = trial.suggest_categorical("steps", list(spec.steps))
            method = self._sample_knobs(trial, spec, method)
            with self.store.write() as s:
                clash = s.exec(select(Run).where(Run.study_id == study.id, Run.method == method, Run.lr == lr)).first()
                run = s.get(Run, run_id)
                if clash is not None:  # the sampler repeated itself: drop the slot, fail the trial
                    s.delete(run)
                    run = None
                else:
                    run.method, run.lr, run.asked_trial, run.asked_steps = method, lr, trial.number, steps
                    self._mark_claimed(run)
                    s.add(run)
        except BaseException:
            self._drop_reservation(run_id)
            raise
        if run is None:
            self.store.retry(lambda: ostudy.tell(trial.number, state=optuna.trial.TrialState.FAIL))
        return run

    @staticmethod
    def _sample_knobs(trial, spec: StudySpec, method: str) -> str:
        """The variant of `method` with each knob it has that the study samples from a range (a
        conditional param: a method without the knob never draws it)."""
        from engine.methods import get_method
        from engine.methods.base import parse_variant, variant_id

        ranges = {k: r for k, r in (spec.knob_ranges or {}).items() if k in get_method(method).knob_values()}
        if not ranges:
            return method
        base, knobs = parse_variant(method)
        for name, r in sorted(ranges.items()):
            knobs[name] = trial.suggest_float(name, r["low"], r["high"], log=r["log"])
        return variant_id(base, knobs)

    def _drop_reservation(self, run_id: int) -> None:
        with self.store.write() as s:
            row = s.get(Run, run_id)
            if row is not None and row.state == RunState.ASKING:
                s.delete(row)

    # ------------------------------------------------------------------ children
    def _spawn(self, keys: list[str], run: Run) -> None:
        """The run's process on its slots: one worker, or with N slots N workers under torchrun, each
        an Accelerator process (data parallel: each trains 1/N of every batch; the main one evaluates
        and writes to the store)."""
        slots = [k.split(":", 1)[1] for k in keys]
        env = child_env(self.store)
        if slots[0].startswith("cuda"):
            env["CUDA_VISIBLE_DEVICES"], device = ",".join(s.split(":")[1] for s in slots), "cuda"
        else:
            env["CUDA_VISIBLE_DEVICES"], device = "", "cpu"
        with self.store.read() as s:
            study = s.get(Study, run.study_id)
        log = open(log_dir_for(self.store, study.name) / f"run{run.id}-{run.method}-attempt{run.attempts}.log", "ab")
        worker = ["-m", "studies.running.worker", "--run-id", str(run.id),
                  "--device", device, "--threads", str(self.threads if device == "cpu" else 0)]
        if len(slots) > 1:  # torchrun: `accelerate launch --cpu` would start one process, whatever --num_processes says
            worker = ["-m", "torch.distributed.run", "--nproc_per_node", str(len(slots)), "--nnodes", "1",
                      "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *worker]
        proc = subprocess.Popen([sys.executable, *worker], env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
        log.close()
        slot = ",".join(slots)
        with self.store.write() as s:
            row = s.get(Run, run.id)
            row.pid, row.device = proc.pid, slot
            s.add(row)
        self.children[keys[0]] = Child(proc, run.id, run.study_id, slot, run.attempts, tuple(keys))
        self.summary["spawned"] += 1
        self.store.log("started", f"{run.method} lr={run.lr:g} attempt {run.attempts} on {slot} (pid {proc.pid})", run.study_id, run.id)

    def _spawn_attack_job(self, key: str, study: Study) -> None:
        """The study's attacks at each method's best cell, in its own process on this slot."""
        slot = key.split(":", 1)[1]
        env = child_env(self.store)
        env["CUDA_VISIBLE_DEVICES"], device = (slot.split(":")[1], "cuda") if slot.startswith("cuda") else ("", "cpu")
        log_path = log_dir_for(self.store, study.name) / "best-cell-attacks.log"
        cmd = [sys.executable, "-m", "studies.running.attack", "--study", study.name,
               "--device", device, "--threads", str(self.threads if device == "cpu" else 0)]
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.children[key] = Child(proc, None, study.id, slot, 1, (key,))
        self.store.log("started", f"best-cell attacks on {slot} (pid {proc.pid}); log {log_path}", study.id)

    def _settle_children(self) -> None:
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
                if rc:
                    self.store.log("attacks failed", f"best-cell attacks {reason}; see the study's "
                                   f"best-cell-attacks.log, rerun with `unlearn study attack`", child.study_id)
                continue
            self._settle(child.run_id, reason, child.attempt)

    def _settle(self, run_id: int, reason: str, attempt: int | None = None) -> None:
        """A run's process is gone. Finished runs are left alone; the rest are retried or failed."""
        with self.store.write() as s:
            run = s.get(Run, run_id)
            if run is None or run.state != RunState.RUNNING:
                return
            study = s.get(Study, run.study_id)
            spec = study_spec(study)
            n = run.attempts
            own = run.last_error if run.last_error and run.last_error.startswith(f"attempt {n}:") else None
            why = own or f"attempt {n}: {reason or 'ended without a result'}"
            run.last_error, run.pid = why, None
            if study.state == StudyState.CANCELLED:
                run.state = RunState.CANCELLED
            elif n < spec.max_attempts:
                run.state = RunState.PENDING
                self.summary["retried"] += 1
            else:
                run.state = RunState.FAILED
                self.summary["failed"] += 1
            s.add(run)
            state, sid, label = run.state, study.id, f"{run.method} lr={run.lr:g}"
            asked, study_name = run.asked_trial, study.name
        if state in (RunState.FAILED, RunState.CANCELLED) and asked is not None:
            self._fail_asked_trial(study_name, asked)
        self.store.log("retry" if state == RunState.PENDING else state, f"{label}: {why}", sid, run_id)

    def _fail_asked_trial(self, study_name: str, number: int) -> None:
        """TPE: the trial the sampler asked for a run that will not finish is told FAIL, so no
        trial stays RUNNING for ever (a cell already written has told it; then it is left alone)."""
        from optuna.exceptions import UpdateFinishedTrialError
        from optuna.trial import TrialState

        storage = self.store.optuna

        def tell():
            trial_id = storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(study_name), number)
            if storage.get_trial(trial_id).state == TrialState.RUNNING:
                try:
                    storage.set_trial_state_values(trial_id, TrialState.FAIL)
                except UpdateFinishedTrialError:  # told meanwhile
                    pass

        self.store.retry(tell)

    def _reap_lost(self) -> None:
        """Runs marked running whose process no pool watches any more: a stale heartbeat, or a
        pid on this host that is gone. Their written milestones stay; the run is retried. A TPE
        reservation whose pool is gone is removed."""
        mine = {c.run_id for c in self.children.values()}
        with self.store.read() as s:
            rows = list(s.exec(select(Run).where(Run.state.in_((RunState.RUNNING, RunState.ASKING)))).all())
        for run in rows:
            if run.id in mine:
                continue
            age = _age_s(run.heartbeat)
            gone_here = run.host == self.host and run.pid is not None and not _pid_alive(run.pid)
            if run.state == RunState.ASKING:
                if gone_here or age > self.heartbeat_timeout:
                    self._drop_reservation(run.id)
            elif gone_here and age > 2 * 2.0:
                self._settle(run.id, f"process {run.pid} is gone")
            elif age > self.heartbeat_timeout:
                self._settle(run.id, f"heartbeat lost for {age:.0f} s")

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
                    self.store.log("attacks stopped", "best-cell attacks stopped: the study was cancelled", child.study_id)
                else:
                    self._settle(child.run_id, "the study was cancelled", child.attempt)

    def _shutdown(self) -> None:
        """Interrupted: stop our runs and give them back, the attempt not counted against them."""
        for key, child in list(self.children.items()):
            self._stop_child(child)
            if child.run_id is None:  # due again for the next pool
                self.store.log("attacks stopped", "best-cell attacks stopped: the pool was interrupted", child.study_id)
                del self.children[key]
                continue
            with self.store.write() as s:
                run = s.get(Run, child.run_id)
                if run is not None and run.state == RunState.RUNNING:
                    run.state, run.attempts, run.pid = RunState.PENDING, max(0, run.attempts - 1), None
                    s.add(run)
            del self.children[key]


def free_port() -> int:
    """A TCP port free now, for a multi-process run's rendezvous (two such runs on one box must not
    share accelerate's default port)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def child_env(store: Store) -> dict:
    """The environment of a process the pool starts. The store's URL travels here, never on the
    command line: `ps` shows every user of the box a command line (and a password in it), while a
    process's environment is readable by its owner alone."""
    return {**os.environ, "UNLEARN_STORAGE_URL": store.url}


def detach(store: Store, name: str, slots: list[str]) -> tuple[int, Path]:
    """Start the scheduler in a new session so it outlives this terminal and its SSH session."""
    log = log_dir_for(store, name).parent / f"{name}-scheduler.log"
    cmd = [sys.executable, "-m", "studies.running.pool", "--study", name, "--slots", ",".join(slots)]
    with open(log, "ab") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, env=child_env(store))
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
