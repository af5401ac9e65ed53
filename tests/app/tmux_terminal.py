"""A real terminal for end-to-end tests of the app: a private tmux server running one command.

A plain module (no fixtures). Each TmuxTerminal starts its own tmux server on a socket of its
own (`tmux -L`) with no user configuration (`-f /dev/null`), so it neither sees nor touches a
tmux the user runs, and killing it on exit leaves nothing behind.

    with TmuxTerminal([sys.executable, "-m", "tui.app"], env=env) as term:
        term.wait_for("studies")
        term.send_keys("j", "Enter")
        print(term.screen())
"""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import time
import uuid
from pathlib import Path
from typing import Mapping, Sequence


def tmux_path() -> str | None:
    """The tmux binary, or None when it is not installed (tests skip then)."""
    return shutil.which("tmux")


class TmuxTerminal:
    """`command` running in a detached tmux session of `width` × `height` cells, with `env` as its
    whole environment (tmux sets TERM to `term`) and `cwd` as its folder."""

    def __init__(self, command: Sequence[str] | str, env: Mapping[str, str] | None = None,
                 width: int = 80, height: int = 24, cwd: str | Path | None = None,
                 term: str = "screen-256color") -> None:
        tmux = tmux_path()
        if tmux is None:
            raise RuntimeError("tmux is not installed")
        self.tmux = tmux
        self.command = command if isinstance(command, str) else shlex.join(command)
        # COLUMNS and LINES would stand in for the pane's size (shutil.get_terminal_size and rich read
        # them first); pytest-xdist's workers run with COLUMNS=80 LINES=24 set
        self.env = {k: v for k, v in (os.environ if env is None else env).items() if k not in ("COLUMNS", "LINES")}
        self.term = term  # the pane's TERM (tmux's default-terminal)
        self.width, self.height = width, height
        self.cwd = str(cwd) if cwd is not None else os.getcwd()
        self.socket = f"unlearn-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.target = "main"
        self._started = False

    # ------------------------------------------------------------------ tmux
    def _tmux(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        # The server inherits this client's environment; a TMUX variable from an outer tmux
        # would make the client refuse to nest, so it is dropped.
        env = {k: v for k, v in self.env.items() if k != "TMUX"}
        return subprocess.run([self.tmux, "-L", self.socket, "-f", "/dev/null", *args], env=env,
                              capture_output=True, text=True, check=check, timeout=30)

    def start(self) -> "TmuxTerminal":
        # One invocation starts the server and sets its options before the command runs:
        # remain-on-exit keeps the pane (and a crash's traceback) readable after the command ends,
        # even when it ends at once. `exec` makes the pane's process the command itself.
        self._tmux("start-server", ";",
                   "set-option", "-g", "remain-on-exit", "on", ";",
                   "set-option", "-g", "status", "off", ";",
                   "set-option", "-g", "default-terminal", self.term, ";",
                   "new-session", "-d", "-s", self.target, "-x", str(self.width), "-y", str(self.height),
                   "-c", self.cwd, f"exec {self.command}")
        self._started = True
        size = self.size()
        if size != (self.width, self.height):
            self.close()
            raise RuntimeError(f"tmux made a {size[0]}x{size[1]} pane, not {self.width}x{self.height}")
        return self

    def size(self) -> tuple[int, int]:
        """The pane's (width, height) as tmux reports it."""
        out = self._tmux("display", "-p", "-t", self.target, "#{pane_width}x#{pane_height}").stdout.strip()
        w, h = out.split("x")
        return int(w), int(h)

    def close(self) -> None:
        if self._started:
            self._tmux("kill-server", check=False)
            self._started = False

    def __enter__(self) -> "TmuxTerminal":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ driving
    def send_keys(self, *keys: str) -> None:
        """tmux key names (`Enter`, `Escape`, `C-c`, `Down`, `Tab`) or plain characters, in order."""
        for key in keys:
            self._tmux("send-keys", "-t", self.target, key)

    def type(self, text: str) -> None:
        """Literal text, each character as typed (no key-name lookup)."""
        self._tmux("send-keys", "-t", self.target, "-l", text)

    def screen(self, history: bool = False) -> str:
        """What the pane shows now, one line per row (trailing blanks trimmed by tmux); with
        `history`, the scrollback above it too (tmux scrolls a dead pane's last screen up to
        write "Pane is dead" below it)."""
        return self._tmux("capture-pane", "-p", "-t", self.target, *(("-S", "-") if history else ())).stdout

    def alive(self) -> bool:
        """Whether the command still runs."""
        out = self._tmux("display", "-p", "-t", self.target, "#{pane_dead}", check=False).stdout.strip()
        return out == "0"

    def wait_for(self, text: str, timeout: float = 10.0, interval: float = 0.05) -> str:
        """Poll the screen until `text` shows; returns that screen. Raises TimeoutError with the
        last screen when it never does."""
        deadline = time.monotonic() + timeout
        screen = ""
        while True:
            screen = self.screen()
            if text in screen:
                return screen
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{text!r} did not show within {timeout} s; the screen:\n{screen}")
            time.sleep(interval)
