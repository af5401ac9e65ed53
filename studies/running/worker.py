"""One run in its own subprocess: `python -m studies.running.worker --run-id N --device D`, the store's URL in
UNLEARN_STORAGE_URL (never on the command line, where `ps` would show a password to everyone).

A fresh process per run means an out-of-memory error or a crash dies alone. The process
heartbeats from a thread (so a long evaluation or a slow model load is not mistaken for a
dead run), writes each cell the moment its milestone is reached, and leaves the retry decision
to the pool that started it: it only records what happened."""
from __future__ import annotations

import argparse
import os
import sys
import threading
import traceback

from sqlalchemy import update

from studies.running.fence import RunLost, owned_by, owns
from studies.store.db import Run, Store, Study
from studies.store.states import RunState

HEARTBEAT_EVERY_S = 2.0


class Heartbeat(threading.Thread):
    """Writes run.heartbeat and run.step every few seconds until stopped, while its attempt owns the
    run (studies/running/fence.py). A beat that finds the run taken sets `lost` and stops beating:
    the training loop then stops at its next step (`check`)."""

    def __init__(self, store: Store, run_id: int, attempt: int, every_s: float = HEARTBEAT_EVERY_S):
        super().__init__(daemon=True, name=f"heartbeat-{run_id}")
        self.store, self.run_id, self.attempt, self.step, self.every_s = store, run_id, attempt, 0, every_s
        self.lost = False
        self._halt = threading.Event()

    def beat(self) -> None:
        """One beat. It only touches a run its attempt still owns, so a beat that lands after the
        run's final write (stop() waits for the thread, this is the second guard) changes nothing."""
        def write() -> int:
            with self.store.write() as s:
                return s.exec(update(Run).where(*owned_by(self.run_id, self.attempt))
                              .values(heartbeat=self.store.now(s), step=self.step)).rowcount

        if self.store.retry(write) == 0:
            self.lost = True
            self._halt.set()

    def check(self) -> None:
        """Raise RunLost once a beat found the run taken from this attempt."""
        if self.lost:
            raise RunLost(self.run_id, self.attempt, "a heartbeat found it taken")

    def run(self) -> None:
        while not self._halt.wait(self.every_s):
            try:
                self.beat()
            except Exception:  # noqa: BLE001 - a missed beat is not worth killing the run for
                pass

    def stop(self) -> None:
        """Stop beating and wait for a beat in flight to commit, so that it can never land after
        the run's final write and move run.step backwards."""
        self._halt.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join()


def run_one(store: Store, run_id: int, device: str, attempt: int | None = None) -> int:
    """Attempt `attempt` of run `run_id` (None: the attempt the run holds now). Every write it makes
    is fenced by that attempt; a process that finds its run taken stops, writing nothing more
    (exit code 4)."""
    from engine.run import is_main_process, run_unlearning
    from studies.lifecycle.spec import study_spec
    from studies.running.recorder import record_cell
    from studies.settings import lab_settings
    from studies.store.forgetsets import forget_set_texts

    if not is_main_process():
        return _train_only(store, run_id, device)
    with store.write() as s:
        run, study, fs = _run_rows(s, run_id)
        attempt = run.attempts if attempt is None else attempt
        if not owns(run, attempt):  # taken (or settled) before this process got going
            print(f"run {run_id}: attempt {attempt} no longer owns it ({run.state}, attempt {run.attempts}); "
                  "nothing done", flush=True)
            return 4
        run.pid, run.heartbeat = os.getpid(), store.now(s)
        s.add(run)
    spec = study_spec(study)
    cfg = spec.run_config(run.method, run.lr, run.seed)
    memory = _gpu_memory(device)
    gpu_bytes = None if memory is None else memory[0]
    if memory is not None:
        refused, for_good = memory_verdict(spec, cfg, *memory)
        if refused and for_good:  # it would fail the same way at every attempt: failed at once, with the plan's reason
            with store.write() as s:
                s.exec(update(Run).where(*owned_by(run_id, attempt)).values(
                    state=RunState.FAILED, last_error=f"attempt {attempt}: {refused}"[:2000], finished_at=store.now(s)))
            store.log(RunState.FAILED, f"{run.method} lr={run.lr:g}: {refused}", study.id, run_id)
            return 3
        if refused:  # other processes hold the memory it needs: the pool retries it (an attempt)
            with store.write() as s:
                s.exec(update(Run).where(*owned_by(run_id, attempt)).values(last_error=f"attempt {attempt}: {refused}"[:2000]))
            return 1
    heart = Heartbeat(store, run_id, attempt)
    heart.start()
    try:
        texts = forget_set_texts(store, fs)

        def on_step(step: int, loss: float) -> None:
            heart.step = step
            heart.check()

        def on_milestone(cell: dict) -> None:
            record_cell(store, study.name, spec, run, cell, attempt=attempt)

        result = run_unlearning(spec.model, texts, cfg, device=device, cache_dir=lab_settings().baseline_cache,
                                trust_remote_code=spec.trust_remote_code, on_step=on_step, on_milestone=on_milestone)
        heart.stop()
        state = RunState.DIVERGED if result["diverged"] else RunState.DONE
        def finish() -> int:
            with store.write() as s:
                now = store.now(s)
                return s.exec(update(Run).where(*owned_by(run_id, attempt)).values(
                    state=state, step=max(c["step"] for c in result["milestones"]), finished_at=now, heartbeat=now,
                    device=result["device"],
                    result={k: result[k] for k in ("cost", "baseline", "losses", "reason", "device", "diverged")})).rowcount

        written = store.retry(finish)  # a server back from a restart: the result is not thrown away
        if not written:
            raise RunLost(run_id, attempt, "its result was not written")
        store.log(state, f"{run.method} lr={run.lr:g}: {state}" + (f" ({result['reason']})" if result["reason"] else ""),
                  study.id, run_id)
        return 0
    except RunLost as lost:  # another attempt (or a pool's settle) has the run: write nothing more
        heart.stop()
        print(f"{lost}; stopping, nothing more written", flush=True)
        return 4
    except BaseException as exc:  # recorded for the pool, which decides whether to retry
        heart.stop()
        oom = "OutOfMemory" in type(exc).__name__
        kind = "out of memory" if oom else type(exc).__name__
        message = f"{kind}: {str(exc).splitlines()[0] if str(exc) else ''}".strip()
        if oom:  # what the plan expected, and the option set that would fit
            from engine.plan import describe_oom

            message += " — " + describe_oom(spec.model, run.method, cfg, gpu_bytes, trust_remote_code=spec.trust_remote_code)
        traceback.print_exc()
        with store.write() as s:  # for the pool's settle, which reads it: only while this attempt owns the run
            s.exec(update(Run).where(*owned_by(run_id, attempt)).values(last_error=f"attempt {attempt}: {message}"[:2000]))
        return 1


def _train_only(store: Store, run_id: int, device: str) -> int:
    """A non-main process of a multi-device run (`accelerate launch`): it trains its slice of every
    batch and writes nothing; the main process heartbeats, records the cells and settles the run."""
    from engine.run import run_unlearning
    from studies.lifecycle.spec import study_spec
    from studies.settings import lab_settings
    from studies.store.forgetsets import forget_set_texts

    with store.read() as s:
        run, study, fs = _run_rows(s, run_id)
    spec = study_spec(study)
    cfg = spec.run_config(run.method, run.lr, run.seed)
    memory = _gpu_memory(device)
    if memory is not None and memory_verdict(spec, cfg, *memory)[0]:
        return 3  # the main process records why; every process stops alike
    try:
        run_unlearning(spec.model, forget_set_texts(store, fs), cfg, device=device,
                       cache_dir=lab_settings().baseline_cache, trust_remote_code=spec.trust_remote_code)
    except BaseException:
        traceback.print_exc()
        return 1
    return 0


def _run_rows(session, run_id: int):
    """The run, its study and its forget set."""
    from studies.store.db import ForgetSet

    run = session.get(Run, run_id)
    study = session.get(Study, run.study_id)
    return run, study, session.get(ForgetSet, study.forgetset_id)


def _gpu_memory(device: str) -> tuple[int, int] | None:
    """(free, total) bytes of this run's GPU before it loads anything (None on CPU)."""
    if not device.startswith("cuda"):
        return None
    import torch

    if not torch.cuda.is_available():
        return None
    free, total = torch.cuda.mem_get_info()
    return int(free), int(total)


def memory_verdict(spec, cfg, free_bytes: int, total_bytes: int) -> tuple[str | None, bool]:
    """(why the run does not fit its GPU, whether for good). For good: the plan does not fit even
    the GPU's whole memory, and every attempt would fail alike. Not for good: it fits the GPU, but
    other processes (another study's runs, someone's notebook) hold too much of it right now: the
    pool retries it. (None, False): it fits."""
    never = _does_not_fit(spec, cfg, total_bytes)
    if never:
        return never, True
    now = _does_not_fit(spec, cfg, free_bytes)
    if now:
        gib = 1024 ** 3
        return (f"{now} — now: {free_bytes / gib:.1f} of the GPU's {total_bytes / gib:.1f} GiB free, the rest held by "
                "other processes; retried"), False
    return None, False


def _does_not_fit(spec, cfg, gpu_bytes: int) -> str | None:
    """`unlearn plan`'s verdict on this run (engine/plan.py), or None when it fits."""
    from engine.errors import UnlearnError
    from engine.plan import make_plan, options_from

    try:
        gpus = spec.gpus_per_run if cfg.fsdp else 1  # data parallel: every GPU holds the whole run
        plan = make_plan(spec.model, cfg.method, options_from(cfg, gpus), cfg.batch_size, cfg.seq_len, gpu_bytes,
                         bool(spec.trust_remote_code))
    except UnlearnError:  # no plan for this model (its config cannot be read here): the run itself will say
        return None
    return plan.refusal()


def main(argv: list[str] | None = None) -> int:
    from studies.settings import lab_settings

    p = argparse.ArgumentParser(description="Run one unlearn-lab run (started by a worker pool); "
                                            "the store's URL comes from UNLEARN_STORAGE_URL.")
    p.add_argument("--run-id", type=int, required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--attempt", type=int, default=None, help="the attempt this process is (its pool's claim)")
    a = p.parse_args(argv)
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    return run_one(Store(lab_settings().storage_url, create=False), a.run_id, a.device, a.attempt)


if __name__ == "__main__":
    sys.exit(main())
