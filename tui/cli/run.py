"""`unlearn methods` and `unlearn run`."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from tui.cli.common import Json, Storage, lab, run_settings_options
from tui.cli.forgetset import ANSWER_FIELD, PROMPT_FIELD, RETAIN_EVAL, RETAIN_EVAL_SHARE_OPTION


def methods_cmd(as_json: Json = False,
                show_all: bool = typer.Option(False, "--all", help="also the survey's methods this tool cannot run, and why")):
    """List the unlearning methods: forget term + weight × retain term, and the retain source."""
    from rich.table import Table
    from rich.text import Text

    from engine.methods import list_methods
    from engine.methods.not_here import NOT_RUNNABLE
    from tui.cli.console import emit_json, out

    rows = [{**m.describe(), "runnable": True} for m in list_methods()]
    absent = [{"id": i, "name": name, "runnable": False, "why": why} for i, name, why in NOT_RUNNABLE] if show_all else []
    if as_json:
        return emit_json(rows + absent)
    # Two columns, so 80 terminal columns keep each formula readable: the loss, then what it is.
    t = Table(title="unlearning methods", header_style="bold", show_lines=True)
    t.add_column("id", no_wrap=True)
    t.add_column(Text("forget term + weight × retain term [its source] · what it does"))
    for r in rows:
        loss = r["forget_term"] if r["forget_weight"] == 1 else f"{r['forget_weight']:g} × {r['forget_term']}"
        if r["retain_term"]:
            loss += f"  +  {r['retain_weight']:g} × {r['retain_term']}  [{r['retain_source']}]"
        if r.get("update"):  # a method that changes the step itself, not only its loss
            loss += f"\nstep: {r['update']}"
        about = r["description"] + ("" if r["trains"] == "all parameters" else f" Trains: {r['trains']}.")
        t.add_row(r["id"], Text(loss, style="bold") + Text("\n" + about, style="dim"))
    out.print(t)
    if absent:
        t = Table(title="not runnable here", header_style="bold", show_lines=True)
        t.add_column("id", no_wrap=True)
        t.add_column("method · why it cannot be expressed as a forget term, a retain term and trained weights")
        for r in absent:
            t.add_row(r["id"], Text(r["name"], style="bold") + Text("\n" + r["why"], style="dim"))
        out.print(t)


@run_settings_options
def run_cmd(
    ctx: typer.Context,
    model: str = typer.Option(..., "--model", help="local folder or Hugging Face id of a causal LM"),
    forget: Optional[List[str]] = typer.Option(None, "--forget", help="source(s) of the forget set U (repeat the flag)"),
    retain: Optional[List[str]] = typer.Option(None, "--retain", help="in-domain text the model must keep"),
    unseen: Optional[List[str]] = typer.Option(None, "--unseen", help="in-domain text the model never saw (the retraining reference)"),
    general: Optional[List[str]] = typer.Option(None, "--general", help="out-of-domain text (for *_general methods)"),
    retain_eval: Optional[List[str]] = RETAIN_EVAL,
    retain_eval_share: float = RETAIN_EVAL_SHARE_OPTION,
    method: str = typer.Option(..., "--method", help="method id (see `unlearn methods`)"),
    param: Optional[List[str]] = typer.Option(None, "--param", metavar="NAME=VALUE",
                                              help="a method hyperparameter: NAME=VALUE (repeat for "
                                              "several; `unlearn methods --json` lists each method's knobs)"),
    lr: str = typer.Option(..., "--lr", help="learning rate (> 0)"),
    steps: str = typer.Option(..., "--steps", help="milestones, e.g. 5,10,20: trains to the largest, evaluates at each"),
    text_field: str = typer.Option("text", "--text-field", help="field of .jsonl/.json rows"),
    column: Optional[str] = typer.Option(None, "--column", help="column of .csv/.parquet (default: --text-field)"),
    prompt_field: Optional[str] = PROMPT_FIELD,
    answer_field: Optional[str] = ANSWER_FIELD,
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda[:N]"),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="allow the model repo's own Python code"),
    save_model: Optional[Path] = typer.Option(None, "--save-model", help="save the unlearned model here (save_pretrained; "
                                              "with --lora the adapter alone)"),
    merge: bool = typer.Option(False, "--merge", help="with --lora and --save-model: save the merged full model"),
    forget_set: Optional[str] = typer.Option(None, "--forget-set", help="a stored forget set (instead of --forget, "
                                             "--retain, --unseen...; e.g. a preset), read from --storage"),
    storage: Storage = None,
    as_json: Json = False,
    given_settings: dict = None,
):
    """Unlearn with one method at one learning rate; evaluate at every milestone of --steps. The sets
    come from sources (--forget, --retain, --unseen [--general]) or from a stored forget set."""
    from engine.config import RunConfig, RunSettings
    from engine.data import load_forget_set
    from engine.errors import UnlearnError
    from engine.methods.base import parse_variant, variant_id
    from engine.run import is_main_process, run_unlearning
    from studies.lifecycle.inputs import parse_learning_rate, parse_milestones
    from studies.lifecycle.spec import parse_knob_options
    from tui.cli.console import emit_json, out, step_progress

    knobs = parse_knob_options(param) or {}
    if any(isinstance(v, dict) or len(v) != 1 for v in knobs.values()):
        raise UnlearnError("unlearn run takes one value per --param (a study sweeps several: study create --param)")
    base, in_id = parse_variant(method)
    method = variant_id(base, {**in_id, **{k: v[0] for k, v in knobs.items()}})
    cfg = RunConfig.of(method, parse_learning_rate(lr), parse_milestones(steps), RunSettings(**given_settings)).validate()
    if forget_set is not None:
        if forget or retain or unseen or general or retain_eval:
            raise UnlearnError("give --forget-set or the sources (--forget, --retain, --unseen), not both")
        from studies.store.forgetsets import forget_set_texts

        store = lab(ctx).store()
        texts = forget_set_texts(store, store.forget_set(forget_set))
    else:
        missing = [flag for flag, v in (("--forget", forget), ("--retain", retain), ("--unseen", unseen)) if not v]
        if missing:
            raise UnlearnError(f"give {', '.join(missing)} (sources of each set), or --forget-set NAME")
        texts = load_forget_set(forget, retain, unseen, general or [], text_field=text_field, column=column,
                                prompt_field=prompt_field, answer_field=answer_field, retain_eval=retain_eval,
                                retain_eval_share=retain_eval_share)
    with step_progress(f"{method} lr={cfg.lr:g}", cfg.milestones[-1]) as on_step:
        result = run_unlearning(model, texts, cfg, device=device, cache_dir=lab(ctx).settings.baseline_cache,
                                trust_remote_code=trust_remote_code, on_step=on_step, save_to=save_model,
                                merge_lora=merge)
    if not is_main_process():  # `accelerate launch`: one report, from the main process
        return
    if as_json:
        return emit_json(result)
    from tui.render import run_table

    out.print(run_table(result))
    c = result["cost"]
    out.print(f"{c['train_tokens']} train tokens, {c['wall_seconds']:.1f} s on {result['device']}, {c['flops']:.3g} FLOPs"
              + (f"  (diverged: {result['reason']})" if result["diverged"] else ""))
