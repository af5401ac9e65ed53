"""bench/quant_attack_device.py (the bitsandbytes quantization attack on CUDA): it skips without CUDA,
and its path runs on the CPU (--cpu) with the verdict it gives a GPU."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "quant_attack_device.py"


def run(*args: str) -> dict:
    p = subprocess.run([sys.executable, str(BENCH), "--json", *args], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_quant_attack_device_skips_without_cuda_and_runs_its_path_on_the_cpu():
    pytest.importorskip("bitsandbytes")
    import torch

    if not torch.cuda.is_available():
        assert run() == {"skipped": "no CUDA device"}
    got = run("--cpu")
    assert got["ok"] and got["device"] == "cpu" and got["layers"] == 14
    assert got["how"] == {"quant4": "bitsandbytes nf4", "quant8": "bitsandbytes llm.int8"}
    assert got["nf4_max_abs_error"] < 1e-5 and got["int8_max_levels_off"] <= 1.001
