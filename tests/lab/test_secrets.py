"""A store password never shows: not in an error message, not in a log, not on any process's
command line (`ps` shows those to every user of the box). The URL reaches the scheduler and the
run processes through their environment, which only their owner can read."""
from __future__ import annotations

import os
import socket
import types
import uuid
from pathlib import Path

import pytest

from studies.lifecycle.study import create_study
from studies.store.db import Store
from tests.studies_helpers import (
    assert_one_line_error,
    cli,
    cli_env,
    kill,
    make_forget_set,
    pid_alive,
    runs_of,
    spawn,
    stop,
    study_state,
    wait_for,
)

SECRET = "Tr0ub4dor-s3cret"


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def environ(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/environ").read_bytes().replace(b"\0", b"\n").decode(errors="replace")
    except OSError:
        return ""


def descendants(pid: int) -> list[int]:
    """Every live process below pid (children, their children, ...)."""
    out, todo = [], [pid]
    while todo:
        parent = todo.pop()
        for d in Path("/proc").iterdir():
            if d.name.isdigit():
                try:
                    if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == parent:
                        out.append(int(d.name))
                        todo.append(int(d.name))
                except (OSError, IndexError, ValueError):
                    pass
    return out


@pytest.fixture
def silent_server():
    """A TCP port that accepts connections and never answers: a database server that hangs, so a
    client waits there (for its connect timeout) long enough to be looked at."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        yield s.getsockname()[1]


def test_a_password_on_the_command_line_is_masked_and_never_printed(tmp_path, silent_server):
    home = tmp_path / "home"
    url = f"postgresql+psycopg2://lab:{SECRET}@127.0.0.1:{silent_server}/unlearn"
    proc = spawn("study", "ls", "--storage", url, home=home)
    try:
        masked = wait_for(lambda: "***" in cmdline(proc.pid) and cmdline(proc.pid), 30, "the process title to be masked",
                          interval=0.02)
        assert SECRET not in masked and "lab:***@127.0.0.1" in masked, masked
        out, errs = proc.communicate(timeout=60)
    finally:
        stop(proc)
    result = types.SimpleNamespace(returncode=proc.returncode, stdout=out.decode(), stderr=errs.decode())
    line = assert_one_line_error(result, "cannot open store", "lab:***@127.0.0.1")
    assert SECRET not in result.stdout + result.stderr, line


def test_a_password_from_the_environment_is_never_printed(tmp_path):
    home = tmp_path / "home"
    env = cli_env(home, UNLEARN_STORAGE_URL=f"postgresql+psycopg2://lab:{SECRET}@127.0.0.1:1/unlearn")
    for args in (["study", "ls"], ["study", "status", "S"], ["forgetset", "ls", "--json"], ["export", "S"]):
        r = cli(*args, home=home, env=env)
        assert_one_line_error(r, "lab:***@127.0.0.1:1")
        assert SECRET not in r.stdout + r.stderr


def _run_detached_and_look(url: str, store: Store, model, home: Path, log_dir: Path, secret: str,
                           fs: str = "fs", study: str = "S", printed_too: bool = True) -> None:
    """Start a study detached, and while its runs go, read every command line of the scheduler and
    the run processes: none holds the URL's secret part; each has the URL in its environment.
    Then neither its logs nor what the CLI prints about it hold the secret."""
    create_study(store, study, str(model), fs, methods=["ga", "ga_gd"], lrs=[1e-3], steps=[2, 4, 50])
    env = cli_env(home, UNLEARN_STORAGE_URL=url)  # as a careful user passes it
    r = cli("study", "run", study, "--detach", "--workers", "2", home=home, env=env)
    assert r.returncode == 0, r.stderr
    assert secret not in r.stdout + r.stderr
    scheduler = int(r.stdout.split("scheduler pid ", 1)[1].split()[0])
    try:
        runs = wait_for(lambda: [x for x in runs_of(store, study) if x.state == "running" and x.pid and pid_alive(x.pid)],
                        180, "a running run process", interval=0.05)
        seen = {pid: cmdline(pid) for pid in [scheduler, *descendants(scheduler)]}
        assert runs[0].pid in seen, (runs[0].pid, seen)
        for pid, line in seen.items():
            assert line and secret not in line, f"pid {pid}: {line}"
            assert f"UNLEARN_STORAGE_URL={url}" in environ(pid).splitlines()
        wait_for(lambda: study_state(store, study) == "done", 300, "the study to finish", interval=0.5)
        wait_for(lambda: not pid_alive(scheduler), 30, "the scheduler to exit")
    finally:
        kill(scheduler)
    if not printed_too:
        return
    logs = list(log_dir.rglob("*.log"))
    assert logs, f"no logs under {log_dir}"
    for f in logs:
        assert secret not in f.read_text(errors="replace"), f
    for args in (["study", "status", study], ["study", "ls", "--json"], ["export", study, "--format", "json"],
                 ["study", "status", "no-such-study"]):
        out = cli(*args, home=home, env=env)
        assert secret not in out.stdout + out.stderr, args


@pytest.mark.slow
def test_workers_get_the_store_through_their_environment(tmp_path, tiny_model_dir, forget_set_files):
    """SQLite: the store's path itself never appears on a scheduler's or run's command line (messages
    may name a path; it is no secret)."""
    path = tmp_path / "lab-with-a-marked-name.db"
    store = Store(f"sqlite:///{path}")
    make_forget_set(store, "fs", forget_set_files)
    _run_detached_and_look(store.url, store, tiny_model_dir, tmp_path / "home", tmp_path / "lab-with-a-marked-name-logs",
                           secret=path.name, printed_too=False)


@pytest.mark.slow
@pytest.mark.xdist_group("postgresql")  # under pytest-xdist: one test at a time makes the server's tables
def test_a_postgresql_password_never_reaches_a_command_line_or_a_log(tmp_path, tiny_model_dir, forget_set_files):
    base = os.environ.get("UNLEARN_TEST_PG_URL")
    if not base:
        pytest.skip("UNLEARN_TEST_PG_URL is not set (.ci/postgres sets it where PostgreSQL can run)")
    # The throwaway server trusts loopback, so it accepts any password: the URL carries one all the same.
    scheme, rest = base.split("://", 1)
    user, host = rest.split("@", 1)
    url = f"{scheme}://{user.split(':')[0]}:{SECRET}@{host}"
    tag = uuid.uuid4().hex[:10]  # the server is shared by the run: names of its own
    store = Store(url)
    make_forget_set(store, f"fs-{tag}", forget_set_files)
    home = tmp_path / "home"
    _run_detached_and_look(url, store, tiny_model_dir, home, home / "logs", SECRET, fs=f"fs-{tag}", study=f"S-{tag}")
