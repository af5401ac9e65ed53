#!/usr/bin/env bash
# The checks only a CUDA GPU can run, as one short script for a lent GPU machine (a bare box with
# PyTorch, transformers, accelerate and peft, and nothing to download from):
#
#     bash bench/device_checks.sh          # results printed, and kept under $OUT (default ./device-results)
#
# 1. bench/plan_peak.py: an 8B-class model (Llama-3-8B's config, random weights built on the GPU)
#    runs a ga_kl milestone with the options `unlearn plan` recommends for this GPU; its measured peak
#    must be within 15 % of the plan. The recommendation for an 80-141 GiB GPU needs bitsandbytes
#    (8-bit AdamW); without it the script says so and measures the next option sets instead (LoRA).
# 2. bench/gpu.py: a ~1B model in bf16, the engine against the Trainer: tokens/s, MFU, peak memory.
# 3. bench/quant_attack_device.py: the quantization attack through bitsandbytes on CUDA (NF4 and
#    LLM.int8 against float64 references of the formats; the attack reports which ran). Needs bitsandbytes.
#
# bitsandbytes (and any other missing package) can travel as wheels in .whl/ (see the device
# tool's README: pip download ... -d .whl bitsandbytes==VERSION); they are installed into
# /tmp/site first. Each step has its own time limit so one slow step cannot eat the others'.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-device-results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/gpu.txt"
$PY -c "import torch, transformers, accelerate, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'cuda', torch.cuda.is_available())" 2>&1 | tee -a "$OUT/gpu.txt"

step() {  # step NAME SECONDS COMMAND...: runs it under a time limit, its output kept in $OUT/NAME.log
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s): $*"
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  echo "== $name: exit ${PIPESTATUS[0]}"
}

if $PY -c "import bitsandbytes" 2>/dev/null; then
  step plan_peak 240 $PY bench/plan_peak.py --json
else
  echo "bitsandbytes is not installed here: the plan's own recommendation (8-bit AdamW) cannot run;"
  echo "measuring the LoRA option sets against the plan instead"
  step plan_peak_lora 180 $PY bench/plan_peak.py --options "--dtype bf16 --lora 16" --json
  step plan_peak_lora_ckpt 180 $PY bench/plan_peak.py --options "--dtype bf16 --gradient-checkpointing --lora 16" --json
fi
step gpu 240 $PY bench/gpu.py --json
if $PY -c "import bitsandbytes" 2>/dev/null; then
  step quant_attack 120 $PY bench/quant_attack_device.py --json
else
  echo "bitsandbytes is not installed here: the quantization attack's bitsandbytes path is not checked"
fi
