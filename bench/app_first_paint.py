"""The app's first paint on a store of 10,000 trials, measured in a real terminal, against a bare
interpreter and `unlearn study ls` on the same store.

    python bench/app_first_paint.py [--storage URL] [--repeat 5] [--json]

Without --storage it unpacks the test suite's 10,250-trial store (tests/fixtures/scale-store.db.xz:
22 grid studies made through the studies API, every cell with its Optuna trial). `unlearn tui`
runs under a private tmux server at 80×24; first paint is the time from starting the command to
the app's first frame on screen (its header: interpreter start and imports included), and to the
first study row (opening the store and the first read as well), polled every 10 ms. The three commands run alternately, `--repeat` times each, and the
medians are compared. Target: first paint (the first frame) ≤ 1 s; the first row is reported beside it. With --json the last line is
{"name", "ratio", "target", "pass", ...}; it exits 1 when the target is missed.
"""
from __future__ import annotations

import argparse
import json
import lzma
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "fixtures" / "scale-store.db.xz"
TARGET_S = 1.0


def unpack_fixture(work: Path) -> str:
    db = work / "scale.db"
    with lzma.open(FIXTURE) as src, open(db, "wb") as out:
        shutil.copyfileobj(src, out)
    return f"sqlite:///{db}"


def timed(cmd: list[str], cwd: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def first_paint(cmd: list[str], needles: tuple[str, ...], cwd: Path, timeout: float = 30.0) -> list[float]:
    """Seconds from starting `cmd` in a fresh 80×24 tmux pane to each of `needles` on its screen
    (in order: the first frame, then the first study row)."""
    sock = f"bench-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    tmux = ["tmux", "-L", sock, "-f", "/dev/null"]
    env = {k: v for k, v in os.environ.items() if k != "TMUX"}
    env["TERM"] = "screen-256color"
    try:
        t0 = time.perf_counter()
        subprocess.run([*tmux, "new-session", "-d", "-x", "80", "-y", "24", "-c", str(cwd),
                        shlex.join(cmd)], check=True, env=env)
        seen: list[float] = []
        screen = ""
        while time.perf_counter() - t0 < timeout:
            screen = subprocess.run([*tmux, "capture-pane", "-p"], capture_output=True, text=True, env=env).stdout
            while len(seen) < len(needles) and needles[len(seen)] in screen:
                seen.append(time.perf_counter() - t0)
            if len(seen) == len(needles):
                return seen
            time.sleep(0.01)
        raise SystemExit(f"{needles[len(seen)]!r} never showed within {timeout} s; the screen:\n{screen}")
    finally:
        subprocess.run([*tmux, "kill-server"], capture_output=True, env=env)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--storage", help="a store URL (default: the 10,250-trial test store, unpacked)")
    p.add_argument("--needle", default="scale-000", help="text that marks the first study row")
    p.add_argument("--frame-needle", default="unlearn-lab", help="text that marks the app's first frame (its header)")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--json", action="store_true", help="print the result as JSON on the last line")
    a = p.parse_args(argv)
    if shutil.which("tmux") is None:
        raise SystemExit("tmux is needed: the first paint is read off a real terminal")
    work = Path(tempfile.mkdtemp(prefix="bench-first-paint-"))
    url = a.storage or unpack_fixture(work)
    script = Path(sys.executable).parent / "unlearn"
    unlearn = [str(script)] if script.is_file() else [sys.executable, "-m", "tui.cli"]
    env_cmd = ["env", f"UNLEARN_HOME={work / 'home'}"]
    tui = [*env_cmd, *unlearn, "tui", "--storage", url]
    runs = {"python -c pass": lambda: [timed([sys.executable, "-c", "pass"], work)],
            "unlearn study ls": lambda: [timed([*env_cmd, *unlearn, "study", "ls", "--storage", url], work)],
            "unlearn tui": lambda: first_paint(tui, (a.frame_needle, a.needle), work)}
    for run in runs.values():  # warm the file cache once; not counted
        run()
    times: dict[str, list[float]] = {"python -c pass": [], "unlearn study ls": [],
                                     "unlearn tui (first paint)": [], "unlearn tui (first study row)": []}
    for _ in range(a.repeat):  # alternating, so a busy moment of the machine hits every command alike
        times["python -c pass"] += runs["python -c pass"]()
        times["unlearn study ls"] += runs["unlearn study ls"]()
        frame, row = runs["unlearn tui"]()
        times["unlearn tui (first paint)"].append(frame)
        times["unlearn tui (first study row)"].append(row)
    med = {k: statistics.median(v) for k, v in times.items()}
    paint = med["unlearn tui (first paint)"]
    ok = paint <= TARGET_S
    print(f"store: {url}")
    for name, m in med.items():
        print(f"  {name:<30} median {m:6.3f} s  (min {min(times[name]):.3f}, max {max(times[name]):.3f}, n={a.repeat})")
    print(f"  first paint {paint:.3f} s (target ≤ {TARGET_S} s): {'pass' if ok else 'MISSED'}; the first study row "
          f"{med['unlearn tui (first study row)']:.3f} s; `study ls` {med['unlearn study ls']:.3f} s")
    if a.json:
        print(json.dumps({"name": "app_first_paint", "ratio": paint / med["unlearn study ls"], "target": TARGET_S,
                          "target_is": "seconds from `unlearn tui` to its first frame on a 10,000-trial store (the first study row is reported beside it)",
                          "pass": ok, "median_s": med, "repeat": a.repeat}))
    shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
