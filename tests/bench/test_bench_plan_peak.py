"""bench/plan_peak.py (the plan against a GPU's measured peak): it skips without CUDA, and its code
path (plan → options → a model from a config → one milestone) runs on a tiny config on the CPU."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "plan_peak.py"


def last_json(*args: str) -> dict:
    p = subprocess.run([sys.executable, str(BENCH), *args, "--json"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_plan_peak_skips_without_cuda_and_runs_its_path_on_a_tiny_cpu_model():
    import torch

    if not torch.cuda.is_available():
        assert last_json()["skipped"].startswith("no CUDA device")
    tiny = last_json("--device", "cpu", "--tiny", "--options", "--dtype bf16 --gradient-checkpointing")
    assert tiny["options"] == "--dtype bf16 --gradient-checkpointing" and tiny["pass"] is None
    assert tiny["rows"]["master"] > 0 and len(tiny["losses"]) == 1  # bf16 trains through the master copy
