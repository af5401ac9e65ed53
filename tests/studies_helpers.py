"""Helpers for the store and study tests (a plain module: the fixtures live in conftest.py).

Everything here drives the real thing: the `unlearn` CLI in a subprocess, the store through
its own sessions, processes through their pids."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from sqlmodel import select

SEQ_LEN = 128  # the tiny model of conftest.py: one record is one chunk
HUB_MODEL = "EleutherAI/pythia-14m"  # a hub id a study may name: stored, never loaded (no network here)


def cli_env(home: Path, **extra: str) -> dict:
    """The environment of a CLI subprocess: its own UNLEARN_HOME, no inherited store URL, one torch
    thread per process (as tests/conftest.py gives the test process: the tiny models gain nothing
    from a second, and beside pytest-xdist's other worker more threads than cores only spin)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("UNLEARN_") or k == "UNLEARN_TEST_PG_URL"}
    env.update(UNLEARN_HOME=str(home), PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(extra)
    return env


def cli_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "tui.cli", *map(str, args)]


def cli(*args: str, home: Path, cwd: Path | None = None, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `unlearn ARGS...` to completion (text stdout/stderr captured)."""
    return subprocess.run(cli_cmd(*args), env=env or cli_env(home), cwd=cwd or home.parent, capture_output=True,
                          text=True, timeout=timeout)


def spawn(*args: str, home: Path, cwd: Path | None = None, env: dict | None = None, log: Path | None = None) -> subprocess.Popen:
    """Start `unlearn ARGS...` in the background; its stdout+stderr go to `log` (or are captured)."""
    out = open(log, "wb") if log else subprocess.PIPE
    try:
        return subprocess.Popen(cli_cmd(*args), env=env or cli_env(home), cwd=cwd or home.parent, stdout=out,
                                stderr=subprocess.STDOUT if log else subprocess.PIPE, stdin=subprocess.DEVNULL)
    finally:
        if log:
            out.close()


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """Bad input, as the one error boundary reports it: exit code 2, exactly one line on stderr,
    `error: ...`, no traceback on either stream, and every needle in that line as written (case
    included). Returns the line. `proc` is a real process's or cli_in_process's."""
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2, f"exit {proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr}"
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{proc.stderr}"
    assert "Traceback" not in proc.stderr + proc.stdout
    line = lines[0]
    assert line.startswith("error: "), line
    for n in needles:
        assert n in line, f"{n!r} not in {line!r}"
    return line


def cli_main(*args) -> int:
    """`unlearn ARGS...` in this process (tui.cli.main), for tests that need no interpreter of their
    own: its exit code. Read what it printed with pytest's capsys."""
    from tui.cli import main

    try:
        main([str(a) for a in args])
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return 0


def cli_in_process(capsys, *args) -> subprocess.CompletedProcess:
    """`unlearn ARGS...` in this process, as a CompletedProcess (returncode, stdout, stderr)."""
    capsys.readouterr()  # what earlier steps printed is not this command's
    code = cli_main(*args)
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(["unlearn", *map(str, args)], code, out, err)


def wait_for(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.1):
    """Poll until predicate() is truthy; returns its value. Fails the test with `what` on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


# ------------------------------------------------------------------ the store

def make_forget_set(store, name: str, files: dict[str, str], general: bool = True, seq_len: int = SEQ_LEN):
    from studies.store.forgetsets import create_forget_set

    return create_forget_set(store, name, [files["forget"]], [files["retain"]], [files["unseen"]],
                             [files["general"]] if general else None, seq_len=seq_len)


def set_run(store, run_id: int, **values) -> None:
    """Write fields of one run, as the pool and the run process do."""
    from studies.store.db import Run

    with store.write() as s:
        run = s.get(Run, run_id)
        for k, v in values.items():
            setattr(run, k, v)
        s.add(run)


def runs_of(store, study: str) -> list:
    from studies.store.db import Run

    st = store.study(study)
    with store.read() as s:
        return list(s.exec(select(Run).where(Run.study_id == st.id).order_by(Run.id)).all())


def milestones_of(store, study: str) -> list:
    from studies.store.db import CellRow, Run

    st = store.study(study)
    with store.read() as s:
        q = (select(CellRow).join(Run, CellRow.run_id == Run.id).where(Run.study_id == st.id)
             .order_by(CellRow.run_id, CellRow.step))
        return list(s.exec(q).all())


def events_of(store, study: str, kind: str | None = None) -> list:
    from studies.store.db import Event

    st = store.study(study)
    with store.read() as s:
        q = select(Event).where(Event.study_id == st.id)
        if kind:
            q = q.where(Event.kind == kind)
        return list(s.exec(q.order_by(Event.id)).all())


def study_state(store, study: str) -> str:
    return store.study(study).state


def optuna_trials(url: str, study: str) -> list:
    """The trials as stock Optuna sees them (a fresh load_study, nothing of ours in between)."""
    import optuna

    return optuna.load_study(study_name=study, storage=url).get_trials(deepcopy=False)


# ------------------------------------------------------------------ processes

def dead_pid() -> int:
    """The pid of a process that has just ended (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def pid_alive(pid: int) -> bool:
    """True for a live process; False for a gone or zombie one."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def children_of(pid: int) -> list[int]:
    """Direct children of a process (from /proc)."""
    kids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            kids.append(int(d.name))
    return kids


def kill(pid: int | None, sig: int = signal.SIGKILL) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, sig)
        return True
    except ProcessLookupError:
        return False


def stop(proc: subprocess.Popen) -> None:
    """End a background process we started, if it is still there."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
