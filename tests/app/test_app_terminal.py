"""`unlearn tui` in a real terminal (tmux, 80×24) on the quick demo's store, with a second study
running under a detached scheduler: what the outside check does by hand. Keys go in with
send-keys, the screen comes back with capture-pane.

Slow: it needs the quick demo (shared with test_cli) and real runs on the CPU."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import pytest

from tests.app.tmux_terminal import TmuxTerminal, tmux_path
from tests.studies_helpers import cli_env, pid_alive, wait_for

# func_only: the test's own 600 s; the quick demo it may build first has its own limit (conftest.py)
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600, func_only=True),
              pytest.mark.skipif(tmux_path() is None, reason="tmux is not installed (.ci/run installs it)")]


def unlearn(*args, env):
    return subprocess.run([sys.executable, "-m", "tui.cli", *args], capture_output=True, text=True, env=env, timeout=120)


def cells_done(url: str, study: str, env) -> int:
    p = unlearn("study", "status", study, "--storage", url, "--json", env=env)
    assert p.returncode == 0, p.stderr
    c = json.loads(p.stdout)["cells"]
    return c["done"] + c["diverged"]


def heatmap_rows(screen: str) -> list[str]:
    """The lines of the screen that hold heatmap values (an lr label first)."""
    return [line for line in screen.splitlines() if re.match(r"\s+\d\.?\d*e-\d\d\s", line)]


@pytest.fixture
def live_study(quick_demo, tmp_path):
    """A study on the demo's model and forget set, run by a detached scheduler with one CPU worker."""
    from studies.store.db import Store
    from studies.store.forgetsets import list_forget_sets

    ws, _, _ = quick_demo
    url = f"sqlite:///{ws / 'unlearn.db'}"
    env = cli_env(tmp_path / "home", UNLEARN_STORAGE_URL=url)
    fs = list_forget_sets(Store(url, create=False))[0].name
    name = f"live-{int(time.time())}"
    p = unlearn("study", "create", name, "--model", str(ws / "model"), "--forget-set", fs, "--methods", "ga_gd",
                "--lr", "1e-4,2e-4,3e-4,4e-4,5e-4", "--steps", "5,10,20,40", env=env)
    assert p.returncode == 0, p.stderr
    p = unlearn("study", "run", name, "--workers", "1", "--detach", env=env)
    assert p.returncode == 0, p.stderr
    yield url, name, env
    unlearn("study", "cancel", name, env=env)
    store = Store(url, create=False)
    pid = store.study(name).scheduler_pid
    wait_for(lambda: pid is None or not pid_alive(pid), 60, "the scheduler to exit after cancel")


def test_the_app_in_tmux_walks_a_demo_study_and_leaves_a_running_one_running(quick_demo, live_study):
    url, live, env = live_study
    app_env = {**env, "TERM": "screen-256color"}
    with TmuxTerminal([sys.executable, "-m", "tui.cli", "tui", "--storage", url], env=app_env) as term:
        assert term.size() == (80, 24)
        screen = term.wait_for(live, timeout=30)
        assert "demo-quick" in screen and "done" in screen  # both studies listed
        # Enter on the first row (the finished demo study): one heatmap per method.
        term.send_keys("Enter")
        screen = term.wait_for("robustness:", timeout=20)
        term.wait_for("lr\\steps", timeout=20)
        for method in ("ga", "random_label", "adversarial", "ga_gd", "ga_kl"):
            assert re.search(rf"\b{method}\b", screen + term.screen()), f"no {method} on the dashboard"
        before = heatmap_rows(term.screen())
        assert before, term.screen()
        # The metric picker changes the values.
        term.send_keys("m")
        term.wait_for("forget_gap", timeout=10)
        deadline = time.monotonic() + 10
        while heatmap_rows(term.screen()) == before and time.monotonic() < deadline:
            time.sleep(0.1)
        assert heatmap_rows(term.screen()) != before, "the values did not change with the metric"
        # Arrow keys move the cursor ([ … ]) from the first cell to the next column.
        first = term.screen()
        term.send_keys("Right")
        deadline = time.monotonic() + 5
        while term.screen() == first and time.monotonic() < deadline:
            time.sleep(0.05)
        moved = heatmap_rows(term.screen())[0]
        assert moved.index("[") > heatmap_rows(first)[0].index("["), (first, moved)
        # Enter opens the cell's trial, with its curves.
        term.send_keys("Enter")
        term.wait_for("perplexity", timeout=20)
        assert "lr 2e-04" in term.screen() or "× 10 steps" in term.screen()
    # The tmux server (and the app with it) is gone; the study keeps running without it.
    done_at_kill = cells_done(url, live, env)
    wait_for(lambda: cells_done(url, live, env) > done_at_kill, 180, "the study to advance with the app closed")
    # Reopened, the app shows it live: its cells count moves on screen.
    with TmuxTerminal([sys.executable, "-m", "tui.cli", "tui", "--storage", url], env=app_env) as term:
        screen = term.wait_for(live, timeout=30)
        row = next(line for line in screen.splitlines() if live in line)
        assert "running" in row, row
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            now = next((line for line in term.screen().splitlines() if live in line), row)
            if now.split()[2] != row.split()[2]:
                break
            time.sleep(0.5)
        assert now.split()[2] != row.split()[2], f"the cells column never moved: {row!r}"
