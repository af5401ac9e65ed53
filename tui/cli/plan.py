"""`unlearn plan`: the GPU memory a run needs per GPU, from the model's config alone (engine/plan.py).

Exit code 0 whether or not the asked option set fits (scripts read `fits` in --json); bad input is one
line and exit code 2 like every command."""
from __future__ import annotations

from typing import Optional

import typer

from tui.cli.common import Json


def plan_cmd(
    model: str = typer.Option(..., "--model", help="local folder or Hugging Face id of a causal LM (its config.json only)"),
    method: str = typer.Option(..., "--method", help="method id (see `unlearn methods`)"),
    batch_size: int = typer.Option(4, "--batch-size", help="forget (and retain) chunks per optimizer step, per GPU"),
    seq_len: int = typer.Option(512, "--seq-len", help="tokens per chunk"),
    dtype: str = typer.Option("auto", "--dtype", help="weights: bf16, fp32 or auto (bf16: the plan is for CUDA GPUs)"),
    gradient_checkpointing: bool = typer.Option(False, "--gradient-checkpointing", help="recompute each block in backward"),
    optim: str = typer.Option("adamw", "--optim", help="adamw, adamw8bit or paged_adamw8bit"),
    lora: int = typer.Option(0, "--lora", metavar="R", help="train a LoRA adapter of rank R instead of every weight"),
    lora_alpha: Optional[float] = typer.Option(None, "--lora-alpha", help="LoRA scale (no effect on memory)"),
    lora_targets: str = typer.Option("", "--lora-targets", help="linear layers to adapt, comma-separated (default: all of a block's)"),
    gpus: int = typer.Option(1, "--gpus", help="GPUs per run (FSDP full shard when more than 1)"),
    gpu_mem: Optional[float] = typer.Option(None, "--gpu-mem", metavar="GIB",
                                            help="memory of one GPU in GiB (default: CUDA device 0's, when there is one)"),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="allow the model repo's own Python code"),
    as_json: Json = False,
):
    """The memory a run needs per GPU (weights, master copy, gradients, optimizer, reference, activations,
    logits), the option set that fits, and whether the asked one does. Exit 0 either way (`fits` in --json)."""
    from rich.table import Table

    from engine.plan import GIB, ROWS, Options, detect_gpu_bytes, gib, make_plan
    from tui.cli.console import emit_json, out

    targets = tuple(t.strip() for t in lora_targets.split(",") if t.strip())
    gpu_bytes = int(gpu_mem * GIB) if gpu_mem is not None else detect_gpu_bytes()
    plan = make_plan(model, method, Options(dtype, gradient_checkpointing, optim, lora, targets, gpus),
                     batch_size, seq_len, gpu_bytes, trust_remote_code)
    if as_json:
        return emit_json(plan.to_json())
    rec = plan.recommended
    t = Table(title=f"{model} · {plan.method} · {plan.shape.params:,} parameters · batch {batch_size} × {seq_len} "
                    f"tokens · {gpus} GPU{'s' if gpus > 1 else ''}", header_style="bold")
    t.add_column("per GPU")
    t.add_column(f"asked\n{plan.asked.flags()}", justify="right")
    if rec is not None:
        t.add_column(f"recommended\n{rec[0].flags()}", justify="right")
    for row in (*ROWS, "total"):
        values = [plan.asked_bytes] + ([rec[1]] if rec is not None else [])
        t.add_row(row, *(gib(sum(v.values()) if row == "total" else v[row]) for v in values),
                  style="bold" if row == "total" else None)
    out.print(t)
    ladder = Table(title="option sets, least cost to fidelity first", header_style="bold")
    ladder.add_column("options")
    ladder.add_column("per GPU", justify="right")
    ladder.add_column("fits")
    for o, b in plan.ladder:
        total = sum(b.values())
        ladder.add_row(o.flags(), gib(total), "?" if gpu_bytes is None else "yes" if total <= gpu_bytes else "no")
    out.print(ladder)
    out.print(plan.verdict(), markup=False, highlight=False, soft_wrap=True)
