"""The tmux harness itself: a real 80×24 terminal running a command, driven by keys and read back."""
from __future__ import annotations

import subprocess
import sys
import time

import pytest

from tests.app.tmux_terminal import TmuxTerminal, tmux_path

pytestmark = pytest.mark.skipif(tmux_path() is None, reason="tmux is not installed (apt-get install tmux)")

ECHO = "import os; print('ready', os.environ.get('PROBE')); line = input(); print('got', line[::-1]); input()"


def test_runs_a_command_at_80x24_and_reads_what_it_prints():
    with TmuxTerminal([sys.executable, "-c", ECHO], env={"PATH": "/usr/bin:/bin", "PROBE": "from-env"}) as term:
        assert term.size() == (80, 24)
        screen = term.wait_for("ready from-env", timeout=15)
        assert screen.splitlines()[0] == "ready from-env"
        term.type("abc xyz")
        term.send_keys("Enter")
        assert "got zyx cba" in term.wait_for("got ", timeout=10)
        assert term.alive()


def test_other_sizes_and_a_dead_command_stays_readable():
    # (it lingers a moment before it exits: tmux may drop what a process printed in its last instant)
    dies = "import shutil, time; print(shutil.get_terminal_size(), flush=True); time.sleep(0.5); raise SystemExit(3)"
    with TmuxTerminal([sys.executable, "-c", dies],
                      width=160, height=48) as term:
        assert term.size() == (160, 48)
        assert "columns=160, lines=48" in term.wait_for("columns=", timeout=15)
        deadline = time.monotonic() + 10
        while term.alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not term.alive()
        assert "columns=160" in term.screen(history=True)  # remain-on-exit: what it printed is still there


def test_wait_for_times_out_with_the_screen_and_the_server_is_gone_after():
    term = TmuxTerminal([sys.executable, "-c", "print('only this'); input()"])
    with term:
        term.wait_for("only this", timeout=15)
        with pytest.raises(TimeoutError, match="only this"):
            term.wait_for("never shown", timeout=0.3)
    ls = subprocess.run(["tmux", "-L", term.socket, "ls"], capture_output=True, text=True)
    assert ls.returncode != 0  # kill-server ran: no session left on that socket
