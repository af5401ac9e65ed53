"""`unlearn forgetset create|preset|ls|show`."""
from __future__ import annotations

from typing import List, Optional

import typer

from tui.cli.common import Json, Storage, lab

# A question–answer source: both fields or neither (engine.data.check_qa_fields says so in one line).
PROMPT_FIELD = typer.Option(None, "--prompt-field", help="field of the prompt (question) in .jsonl/.json/.csv/.parquet "
                            "rows: the set is question–answer pairs, scored on the answers only (with --answer-field)")
ANSWER_FIELD = typer.Option(None, "--answer-field", help="field of the answer (with --prompt-field)")
# Utility is measured on retain_eval, which no retain term trains on (engine.data.hold_out_retain_eval).
RETAIN_EVAL = typer.Option(None, "--retain-eval", help="in-domain text the model was trained on, held out from every "
                           "retain term: utility is measured here (default: a seeded share of --retain)")
RETAIN_EVAL_SHARE_OPTION = typer.Option(0.2, "--retain-eval-share", help="without --retain-eval: the share of the "
                                        "retain documents held out as retain_eval (seeded, part of the set's hash)")


def create_cmd(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="unique name"),
    forget: List[str] = typer.Option(..., "--forget", help="source(s) of U: files, folders, globs, hf:NAME[:CONFIG]/SPLIT[#col]"),
    retain: List[str] = typer.Option(..., "--retain", help="in-domain text the model must keep"),
    unseen: List[str] = typer.Option(..., "--unseen", help="in-domain text the model never saw"),
    general: Optional[List[str]] = typer.Option(None, "--general", help="out-of-domain text (optional)"),
    retain_eval: Optional[List[str]] = RETAIN_EVAL,
    retain_eval_share: float = RETAIN_EVAL_SHARE_OPTION,
    seq_len: int = typer.Option(512, "--seq-len", help="tokens per chunk for runs on this set"),
    tokenizer: Optional[str] = typer.Option(None, "--tokenizer", help="model/tokenizer to count chunks with"),
    text_field: str = typer.Option("text", "--text-field", help="field of .jsonl/.json rows"),
    column: Optional[str] = typer.Option(None, "--column", help="column of .csv/.parquet (default: --text-field)"),
    prompt_field: Optional[str] = PROMPT_FIELD,
    answer_field: Optional[str] = ANSWER_FIELD,
    storage: Storage = None,
    as_json: Json = False,
):
    """Read the sources, hash the texts and store them (the set never changes after)."""
    from studies.store.forgetsets import create_forget_set

    fs = create_forget_set(lab(ctx).store(create=True), name, forget, retain, unseen, general, text_field, column,
                           seq_len, tokenizer, prompt_field, answer_field, retain_eval, retain_eval_share)
    _report(fs, as_json)


def preset_cmd(
    ctx: typer.Context,
    preset: str = typer.Argument(..., help="tofu, muse-news, muse-books or yao (Yao et al.'s arXiv/GitHub splits)"),
    split: Optional[str] = typer.Option(None, "--split", help="tofu: forget01, forget05 or forget10 (default); "
                                        "yao: arxiv (default) or github; muse-*: forget"),
    from_dir: Optional[str] = typer.Option(None, "--from", metavar="DIR",
                                           help="a local snapshot of the dataset (huggingface-cli download "
                                           "--repo-type dataset NAME --local-dir DIR), for boxes without internet"),
    name: Optional[str] = typer.Option(None, "--as", metavar="NAME", help="the forget set's name (default: PRESET-SPLIT)"),
    seq_len: int = typer.Option(512, "--seq-len", help="tokens per chunk for runs on this set"),
    tokenizer: Optional[str] = typer.Option(None, "--tokenizer", help="model/tokenizer to count chunks with"),
    storage: Storage = None,
    as_json: Json = False,
):
    """A benchmark's data as a named forget set with the benchmark's own roles (docs/data.md)."""
    from engine.presets import load_preset
    from studies.store.forgetsets import check_new_name, store_forget_set

    store = lab(ctx).store(create=True)
    data = load_preset(preset, split, from_dir)
    name = name or f"{preset}-{data.meta['split']}"
    check_new_name(store, name, seq_len)
    fs = store_forget_set(store, name, data.texts, seq_len=seq_len, tokenizer=tokenizer, meta=data.meta,
                          extras=data.extras)
    _report(fs, as_json)


def _report(fs, as_json: bool) -> None:
    from studies.store.forgetsets import describe
    from tui.cli.console import emit_json, out

    if as_json:
        return emit_json(describe(fs))
    qa = " question–answer" if (fs.meta or {}).get("qa") else ""
    out.print(f"forget set [bold]{fs.name}[/] {fs.hash[:12]}: " + ", ".join(f"{k} {v}" for k, v in fs.counts.items())
              + f"{qa} documents" + (f"; chunks {fs.chunks}" if fs.chunks else "")
              + (f"; extras {(fs.meta or {})['extras']}" if (fs.meta or {}).get("extras") else ""))


def ls_cmd(ctx: typer.Context, storage: Storage = None, as_json: Json = False):
    """List forget sets."""
    from rich.table import Table

    from studies.store.db import StoreMissing
    from studies.store.forgetsets import describe, list_forget_sets
    from tui.cli.console import emit_json, out

    try:
        rows = [describe(fs) for fs in list_forget_sets(lab(ctx).store())]
    except StoreMissing:  # nothing created yet: an empty list, and no file made for it
        rows = []
    if as_json:
        return emit_json(rows)
    t = Table(header_style="bold", box=None)
    for col in ("name", "hash", "forget", "retain", "unseen", "general", "seq_len"):
        t.add_column(col)
    for r in rows:
        d = r["documents"]
        t.add_row(r["name"], r["hash"][:12], *(str(d.get(k, 0)) for k in ("forget", "retain", "unseen", "general")), str(r["seq_len"]))
    out.print(t if rows else "no forget sets yet: unlearn forgetset create NAME --forget ... --retain ... --unseen ...")


def show_cmd(ctx: typer.Context, name: str = typer.Argument(...), storage: Storage = None, as_json: Json = False):
    """Show one forget set: hash, sources, document and chunk counts."""
    from studies.store.forgetsets import describe
    from tui.cli.console import emit_json, out

    info = describe(lab(ctx).store().forget_set(name))
    if as_json:
        return emit_json(info)
    out.print(f"[bold]{info['name']}[/]  sha256 {info['hash']}")
    for role, srcs in info["sources"].items():
        if srcs:
            out.print(f"  {role:8} {info['documents'].get(role, 0):>6} docs"
                      + (f" {info['chunks'].get(role, 0):>6} chunks" if info["chunks"] else "") + "  " + " ".join(srcs))
