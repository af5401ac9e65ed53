"""`unlearn plan` against the memory a run really takes: an 8B-class model built from its config
(random weights: no download), the plan's recommended options for this GPU, one ga_kl milestone
through the engine, and the peak CUDA memory measured by torch against the plan's total.

    python bench/plan_peak.py [--config tests/fixtures/configs/llama-3-8b] [--method ga_kl]
                              [--batch-size 4] [--seq-len 512] [--json]

The options are the plan's recommendation for the GPU's total memory (or the ones given with
--options "--dtype bf16 --lora 16"). Measured: torch.cuda.max_memory_reserved() over the run
(weights, set-up, the steps and the milestone's evaluation), against the plan's total less its
constant overhead row (the CUDA context and allocator slack, which torch does not count). Target:
within 15 % either way. Without CUDA it prints why and {"pass": null, "skipped": ...}; `--device cpu
--tiny` runs the same code on a tiny config for the tests (its figures mean nothing).
"""
from __future__ import annotations

import argparse
import atexit
import shlex
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, finish  # noqa: E402
from gpu import TINY, random_sets, skip_reason  # noqa: E402

NAME = "plan_peak"
TARGET = 0.15  # |measured / planned − 1|


def settings_of(flags: str) -> dict:
    """'--dtype bf16 --gradient-checkpointing --lora 16' -> RunSettings fields, by the flags and types
    RunSettings declares for itself."""
    from engine.config import settings_fields

    by_flag = {f.metadata["flag"]: f for f in settings_fields()}
    kinds = {"int": int, "bool": bool, "str": str}
    out, args = {}, shlex.split(flags)
    while args:
        f = by_flag[args.pop(0)]
        kind = kinds.get(f.type, float)
        out[f.name] = True if kind is bool else kind(args.pop(0))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "tests" / "fixtures" / "configs" / "llama-3-8b"))
    p.add_argument("--method", default="ga_kl")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--options", default=None, help="the run's memory options (default: the plan's recommendation)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    reason = skip_reason(a.device)
    if reason:
        print(f"{NAME}: skipped: {reason}")
        return finish({"name": NAME, "ratio": None, "target": TARGET, "pass": None, "skipped": reason}, a.json)

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

    from engine.config import RunConfig
    from engine.metric_registry import PPL_FORGET, PPL_RETAIN, PPL_UNSEEN
    from engine.plan import GIB, make_plan, options_from
    from engine.precision import resolve_dtype
    from engine.run import train_to_milestones

    device = torch.device(a.device)
    config = LlamaConfig(**TINY) if a.tiny else AutoConfig.from_pretrained(a.config)
    gpu_bytes = int(torch.cuda.mem_get_info(device)[1]) if device.type == "cuda" else 8 * GIB
    model_ref = a.config
    if a.tiny:  # the plan reads a folder's config.json
        import tempfile

        model_ref = tempfile.mkdtemp(prefix="plan-peak-")
        atexit.register(shutil.rmtree, model_ref, True)  # a bench leaves nothing behind
        config.save_pretrained(model_ref)
    if a.options is None:  # the plan's recommendation for this GPU (config-only, no weights)
        first = make_plan(model_ref, a.method, options_from(RunConfig(method=a.method, lr=1e-5, milestones=(1,))),
                          a.batch_size, a.seq_len, gpu_bytes)
        if first.recommended is None:
            return finish({"name": NAME, "ratio": None, "target": TARGET, "pass": False,
                           "error": f"nothing fits: {first.verdict()}"}, a.json)
        a.options = first.recommended[0].flags()
    cfg = RunConfig(method=a.method, lr=1e-5, milestones=(1,), batch_size=a.batch_size, seq_len=a.seq_len,
                    eval_batch_size=a.batch_size, **settings_of(a.options)).validate()
    plan = make_plan(model_ref, a.method, options_from(cfg), a.batch_size, a.seq_len, gpu_bytes)
    planned = sum(plan.asked_bytes.values()) - plan.asked_bytes.get("overhead", 0)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with device:
        model = AutoModelForCausalLM.from_config(config, dtype=resolve_dtype(cfg.dtype, device))
    sets = random_sets(config.vocab_size, a.seq_len, a.batch_size)
    baseline = dict.fromkeys((PPL_FORGET, PPL_RETAIN, PPL_UNSEEN), 1.0)  # compare() needs one; never read
    out = train_to_milestones(model, None, sets, cfg, baseline)
    measured = torch.cuda.max_memory_reserved(device) if device.type == "cuda" else 0
    ratio = measured / planned if planned else None
    print(f"{NAME}: {a.method} with {a.options} at batch {a.batch_size} x {a.seq_len}: planned "
          f"{planned / GIB:.1f} GiB (without the overhead row), measured peak {measured / GIB:.1f} GiB")
    ok = None if device.type != "cuda" else abs(ratio - 1) <= TARGET
    return finish({"name": NAME, "ratio": ratio, "target": TARGET, "pass": ok, "options": a.options,
                   "planned_bytes": planned, "measured_bytes": measured, "rows": plan.asked_bytes,
                   "params": plan.shape.params, "losses": out.losses}, a.json)


if __name__ == "__main__":
    sys.exit(main())
