"""`unlearn`: the command line. Every command that reports takes --json (stdout then holds only JSON);
progress goes to stderr; bad input is one line on stderr and exit code 2."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import List, Optional

import click
import typer

try:  # typer ≥ 0.16 vendors its own click; catch the usage errors of both
    from typer._click import exceptions as _tclick
except ImportError:  # pragma: no cover
    _tclick = click.exceptions
USAGE_ERRORS = (click.exceptions.UsageError, _tclick.UsageError)
ABORTS = (click.exceptions.Abort, typer.Abort)
EXITS = (click.exceptions.Exit, typer.Exit)
from engine.errors import UnlearnError
from tui.console import emit_json, err, out, parse_lr, parse_steps, step_progress  # noqa: F401 (re-exported)

app = typer.Typer(
    name="unlearn",
    help="unlearn-lab: machine unlearning of pre-trained LLMs — methods, runs, studies over lr × steps.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
@app.command("methods")
def methods_cmd(as_json: bool = typer.Option(False, "--json", help="print a JSON list instead of a table")):
    """List the unlearning methods: forget term + weight × retain term, and the retain source."""
    from rich.table import Table

    from engine.methods import list_methods

    rows = [m.describe() for m in list_methods()]
    if as_json:
        return emit_json(rows)
    t = Table(title="unlearning methods", header_style="bold")
    for col in ("id", "forget term", "retain term", "retain source", "description"):
        t.add_column(col)
    for r in rows:
        t.add_row(r["id"], r["forget_term"], r["retain_term"] or "—", r["retain_source"] or "—", r["description"])
    out.print(t)


@app.command("run")
def run_cmd(
    model: str = typer.Option(..., "--model", help="local folder or Hugging Face id of a causal LM"),
    forget: List[str] = typer.Option(..., "--forget", help="source(s) of the forget set U (repeat the flag)"),
    retain: List[str] = typer.Option(..., "--retain", help="in-domain text the model must keep"),
    unseen: List[str] = typer.Option(..., "--unseen", help="in-domain text the model never saw (the retraining reference)"),
    general: Optional[List[str]] = typer.Option(None, "--general", help="out-of-domain text (for *_general methods)"),
    method: str = typer.Option(..., "--method", help="method id (see `unlearn methods`)"),
    lr: str = typer.Option(..., "--lr", help="learning rate (> 0)"),
    steps: str = typer.Option(..., "--steps", help="milestones, e.g. 5,10,20: trains to the largest, evaluates at each"),
    batch_size: int = typer.Option(4, "--batch-size", help="forget (and retain) chunks per step"),
    seq_len: int = typer.Option(512, "--seq-len", help="tokens per chunk"),
    seed: int = typer.Option(0, "--seed"),
    warmup: int = typer.Option(0, "--warmup", help="linear warm-up steps, then constant (keeps prefix sharing)"),
    retain_weight: Optional[float] = typer.Option(None, "--retain-weight", help="weight of the retain term (default: the method's)"),
    eval_batch_size: int = typer.Option(8, "--eval-batch-size"),
    min_k: float = typer.Option(0.2, "--min-k", help="k of the Min-K% and Min-K%++ attacks"),
    tol_forget: float = typer.Option(0.10, "--tol-forget", help="success: forget_gap ≤ ln(1+tol)"),
    tol_retain: float = typer.Option(0.05, "--tol-retain", help="success: retain_drift ≤ ln(1+tol)"),
    text_field: str = typer.Option("text", "--text-field", help="field of .jsonl/.json rows"),
    column: Optional[str] = typer.Option(None, "--column", help="column of .csv/.parquet (default: --text-field)"),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda[:N]"),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="allow the model repo's own Python code"),
    save_model: Optional[Path] = typer.Option(None, "--save-model", help="save the unlearned model here (save_pretrained)"),
    as_json: bool = typer.Option(False, "--json", help="print the result as JSON on stdout"),
):
    """Unlearn with one method at one learning rate; evaluate at every milestone of --steps."""
    from engine.data import load_forget_set
    from engine.run import RunConfig, run_unlearning
    from engine.settings import get_settings

    cfg = RunConfig(method=method, lr=parse_lr(lr), milestones=parse_steps(steps), batch_size=batch_size, seq_len=seq_len,
                    seed=seed, warmup_steps=warmup, retain_weight=retain_weight, eval_batch_size=eval_batch_size,
                    min_k=min_k, tol_forget=tol_forget, tol_retain=tol_retain)
    cfg.validate()
    texts = load_forget_set(forget, retain, unseen, general or [], text_field=text_field, column=column)
    with step_progress(f"{method} lr={cfg.lr:g}", cfg.milestones[-1]) as on_step:
        result = run_unlearning(model, texts, cfg, device=device, cache_dir=get_settings().baseline_cache,
                                trust_remote_code=trust_remote_code, on_step=on_step, save_to=save_model)
    if int(os.environ.get("RANK", "0")) != 0:  # `accelerate launch`: one report, from the main process
        return
    if as_json:
        return emit_json(result)
    from tui.render import run_table

    out.print(run_table(result))
    c = result["cost"]
    out.print(f"{c['train_tokens']} train tokens, {c['wall_seconds']:.1f} s on {result['device']}, {c['flops']:.3g} FLOPs"
              + (f"  (diverged: {result['reason']})" if result["diverged"] else ""))


from tui.commands.forgetset import forgetset_app  # noqa: E402
from tui.commands.report import export_cmd, heatmap_cmd, ls_cmd, status_cmd  # noqa: E402
from tui.commands.study import study_app, worker_cmd  # noqa: E402
from tui.demo_cmd import demo_cmd  # noqa: E402

app.command("demo")(demo_cmd)
app.add_typer(forgetset_app, name="forgetset")
study_app.command("ls")(ls_cmd)
study_app.command("status")(status_cmd)
study_app.command("heatmap")(heatmap_cmd)
app.add_typer(study_app, name="study")
app.command("worker")(worker_cmd)
app.command("export")(export_cmd)


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors become one line on stderr and exit code 2, never a traceback."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        app(args=argv, standalone_mode=False)
    except UnlearnError as exc:
        err.print(f"error: {exc}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(2)
    except USAGE_ERRORS as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":  # bare `unlearn`: show help, not an error
            out.print(exc.format_message(), markup=False, highlight=False)
            sys.exit(0)
        err.print(f"error: {exc.format_message()}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(2)
    except ABORTS:
        err.print("aborted", markup=False)
        sys.exit(130)
    except EXITS as exc:
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
