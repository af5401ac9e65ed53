"""Export: per method the best configuration (or its Pareto front of forget_gap × retain_drift),
with the model, the forget set's hash, every hyperparameter, the metrics reached and the exact
`unlearn run ...` command that reproduces the cell.

The command trains to the cell's step count only: by the prefix property (engine/run.py) the run
to `steps` passes through the same model as the study's run that went on to later milestones,
so on CPU it reproduces the cell's score exactly (bitwise, given the same thread count).

Every file is written to a temporary name and renamed into place: nothing is ever half-written.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Callable, Optional

from engine.errors import UnlearnError
from engine.methods.base import parse_variant
from engine.metric_registry import OBJECTIVE, SCORE, every_run, objective, read
from studies.lifecycle.spec import StudySpec, study_spec
from studies.reading.grid import Cell, best_cell, load_cells
from studies.reading.grid import pareto as pareto_front
from studies.store.db import ForgetSet, Store, Study, hostname
from studies.store.states import CellStatus


def hyperparameters(spec: StudySpec, method: str, lr: float, seed: int | None = None) -> dict:
    """The run settings of the cell's run (every RunSettings field; retain_weight None = the method's own)."""
    return spec.run_config(method, lr, seed).settings.to_dict()


def reproduce_command(model: str, fs: ForgetSet, spec: StudySpec, method: str, lr: float, steps: int,
                      seed: int | None = None) -> str:
    """`unlearn run ...` for one cell, every argument shell-quoted. Local sources are the forget set's
    stored absolute paths; `hf:` specs are passed as they are; a question–answer set adds its fields;
    a preset (built from a benchmark's tables) is named with --forget-set, read from the store. The run settings' flags come from
    RunSettings itself, so a new setting is carried without a change here."""
    args = ["unlearn", "run", "--model", model]
    meta = fs.meta or {}
    if meta.get("preset"):  # built from a benchmark's tables, not from sources a run can read again
        args += ["--forget-set", fs.name]
    else:
        for role in ("forget", "retain", "unseen", "general"):
            for src in (fs.sources or {}).get(role) or []:
                args += [f"--{role}", src]
        args += ["--text-field", fs.text_field or "text"]
        if fs.column:
            args += ["--column", fs.column]
        if meta.get("qa"):
            args += ["--prompt-field", meta["qa"]["prompt_field"], "--answer-field", meta["qa"]["answer_field"]]
    base, knobs = parse_variant(method)  # a swept variant: its knobs as the flags that set them
    args += ["--method", base]
    for k, v in knobs.items():
        args += ["--param", f"{k}={v!r}"]
    args += ["--lr", repr(float(lr)), "--steps", str(int(steps))]
    args += spec.run_config(method, lr, seed).settings.to_flags()
    if spec.trust_remote_code:
        args.append("--trust-remote-code")
    args.append("--json")
    return " ".join(shlex.quote(a) for a in args)


def _entry(study: Study, spec: StudySpec, fs: ForgetSet, cell: Cell) -> dict:
    """One exported cell. A mean over seeds also carries which seeds and each figure's 95 % half width
    ("seeds", "spread"); its command and saved model are the first seed's, whose own score
    ("seed_eval_score") a saved model is checked against."""
    s = cell.summary()
    seeded = (cell.metrics or {}).get("seeds")
    seed = seeded["seeds"][0] if seeded else None
    extra = ({"seeds": s["seeds"], "spread": s["spread"], "seed": seed, f"seed_{SCORE}": seeded["scores"][0]}
             if seeded else {})
    return {
        "method": cell.method,
        "lr": cell.lr,
        "steps": cell.steps,
        **{m.path: s[m.path] for m in objective()},
        "success": s["success"],
        "metrics": dict(cell.metrics or {}),
        "model": study.model,
        "forget_set": {"name": fs.name, "hash": fs.hash},
        "hyperparameters": hyperparameters(spec, cell.method, cell.lr, seed),
        "trust_remote_code": bool(spec.trust_remote_code),
        "study": study.name,
        "trial_number": cell.trial_number,
        "command": reproduce_command(study.model, fs, spec, cell.method, cell.lr, cell.steps, seed),
        **extra,
    }


def _load(store: Store, name: str) -> tuple[Study, StudySpec, ForgetSet, list[Cell]]:
    study = store.study(name)
    with store.read() as s:
        fs = s.get(ForgetSet, study.forgetset_id)
    if fs is None:
        raise UnlearnError(f"study {name!r}: its forget set (id {study.forgetset_id}) is missing from the store")
    return study, study_spec(study), fs, load_cells(store, study)


def export_best(store: Store, name: str, method: Optional[str] = None, pareto: bool = False) -> list[dict]:
    """Per method (or only `method`) the best cell, or with pareto=True every cell of its Pareto front
    (each with "pareto": true). Methods with no computed cell yet are left out."""
    study, spec, fs, cells = _load(store, name)
    if method is not None and method not in spec.methods:
        raise UnlearnError(f"study {name!r} has no method {method!r}; its methods: {', '.join(spec.methods)}")
    if not any(c.computed for c in cells):
        raise UnlearnError(f"study {name!r} has no computed cells yet: nothing to export"
                           if not any(c.status == CellStatus.DIVERGED for c in cells)
                           else f"study {name!r}: every computed cell diverged, nothing to export")
    entries = []
    for m in ([method] if method else spec.methods):
        if pareto:
            for c in pareto_front(cells, m, spec.knob_ranges):
                entries.append({**_entry(study, spec, fs, c), "pareto": True})
        else:
            c = best_cell(cells, m, spec.knob_ranges)
            if c is not None:
                entries.append(_entry(study, spec, fs, c))
    if method and not entries:
        raise UnlearnError(f"study {name!r}: method {method!r} has no computed cells yet")
    return entries


# ---------------------------------------------------------------- files

def to_json(entries: list[dict]) -> str:
    return json.dumps(entries, indent=2, allow_nan=False, default=str) + "\n"


def to_yaml(entries: list[dict]) -> str:
    import yaml

    return yaml.safe_dump(json.loads(to_json(entries)), sort_keys=False, allow_unicode=True, width=10_000)


def model_dir_name(entry: dict) -> str:
    if entry.get("pareto"):
        return f"{entry['method']}-lr{entry['lr']!r}-steps{entry['steps']}"
    return entry["method"]


def model_card(entry: dict, reached: dict, result: dict) -> str:
    def num(x):
        return "—" if x is None else (f"{x:.6g}" if isinstance(x, float) else str(x))

    # The objective and success first, then every other figure every cell has.
    others = [m.path for m in every_run() if m.group != OBJECTIVE]
    rows = [(m.path, read(reached, m.path)) for m in objective()] + [("success", reached.get("success"))]
    rows += [(k, read(reached, k)) for k in others]
    base = result.get("baseline") or {}
    hp = entry.get("hyperparameters") or {}
    fs = entry["forget_set"]
    lines = [
        f"# {Path(entry['model']).name or entry['model']} unlearned with {entry['method']}",
        "",
        f"This model is `{entry['model']}` after machine unlearning with unlearn-lab.",
        "",
        f"- base model: `{entry['model']}`",
        f"- method: `{entry['method']}`",
        f"- learning rate: `{entry['lr']!r}`",
        f"- steps: `{entry['steps']}`",
        f"- forget set: `{fs['name']}` (sha256 `{fs['hash']}`)",
        f"- study: `{entry.get('study')}`",
        f"- device: `{result.get('device')}`",
        "- hyperparameters: " + ", ".join(f"{k}={v}" for k, v in hp.items()),
        "",
        "## Metrics reached",
        "",
        "| metric | this model | original | study |",
        "|---|---|---|---|",
    ]
    study_cell = entry.get("metrics") or {}
    for k, v in rows:
        lines.append(f"| {k} | {num(v)} | {num(read(base, k))} | {num(read(study_cell, k))} |")
    lines += [
        "",
        "forget_gap = |ln ppl_forget(θ) − ln ppl_unseen(θ0)|; retain_eval_drift = ln ppl_retain_eval(θ) − "
        "ln ppl_retain_eval(θ0), on retain_eval, which no retain term trains on; "
        "eval_score = forget_gap + max(0, retain_eval_drift), lower is better (the study's objective). "
        "retain_drift and score are the same figures on the retain documents the retain terms train on.",
        "",
        "## Reproduce",
        "",
        "```sh",
        entry["command"],
        "```",
        "",
    ]
    return "\n".join(lines)


# A model folder being written carries who writes it (node, pid): an export killed outright (SIGKILL,
# a crash; SIGTERM is cleaned up by its own process) leaves a multi-GB folder that the next export
# into the same folder removes once that process is gone from this node.
OWNER_FILE = ".unlearn-export-owner"


def remove_abandoned(out_dir: Path) -> list[Path]:
    """Remove the half-written model folders in out_dir whose export process is gone from this
    node (a folder another node writes, or one without its owner file, is left alone)."""
    from studies.running.processes import pid_alive

    removed = []
    for tmp in Path(out_dir).glob(".*.tmp"):
        try:
            node, pid = (tmp / OWNER_FILE).read_text(encoding="utf-8").split()
            mine, alive = node == hostname(), pid_alive(int(pid))
        except (OSError, ValueError):
            continue
        if mine and not alive:
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
    return removed


def save_model(store: Store, entry: dict, out_dir: Path, device: str = "auto",
               on_step: Optional[Callable[[int, float], None]] = None, merge: bool = False) -> dict:
    """Rerun an export entry from the stored forget-set texts and save the unlearned model, its tokenizer
    and a README.md model card to out_dir/<method> (Pareto entries: <method>-lr<lr>-steps<steps>). A
    study run with --lora saves its adapter, or with `merge` the merged model.
    The folder appears whole or not at all. Returns {"path", "metrics", "score", "matches"}."""
    from engine.run import run_unlearning
    from studies.settings import lab_settings
    from studies.store.forgetsets import forget_set_texts

    study = store.study(entry["study"])
    spec = study_spec(study)
    with store.read() as s:
        fs = s.get(ForgetSet, study.forgetset_id)
    if fs is None or fs.hash != entry["forget_set"]["hash"]:
        raise UnlearnError(f"study {study.name!r}: forget set {entry['forget_set']['name']!r} is not in the store as exported")
    texts = forget_set_texts(store, fs)
    cfg = replace(spec.run_config(entry["method"], float(entry["lr"]), entry.get("seed")),
                  milestones=(int(entry["steps"]),))
    out_dir = Path(out_dir).expanduser().resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / model_dir_name(entry)
    remove_abandoned(out_dir)
    # named before it exists, so a SIGTERM at any moment (SystemExit, sigterm_as_exit) removes it
    tmp = out_dir / f".{final.name}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        tmp.mkdir()
        (tmp / OWNER_FILE).write_text(f"{hostname()} {os.getpid()}\n", encoding="utf-8")
        result = run_unlearning(study.model, texts, cfg, device=device, cache_dir=lab_settings().baseline_cache,
                                trust_remote_code=bool(spec.trust_remote_code), on_step=on_step, save_to=tmp,
                                merge_lora=merge)
        reached = result["milestones"][-1]
        (tmp / "README.md").write_text(model_card(entry, reached, result), encoding="utf-8")
        (tmp / "unlearn_export.json").write_text(to_json([{**entry, "reached": reached, "device": result["device"]}]),
                                                 encoding="utf-8")
        old = None
        if final.exists():
            old = out_dir / f".{final.name}.old-{os.getpid()}"
            os.replace(final, old)
        (tmp / OWNER_FILE).unlink()
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    score, want = reached.get(SCORE), entry.get(f"seed_{SCORE}", entry.get(SCORE))  # a seeds mean: its first seed's
    matches = (score is not None and want is not None and abs(score - want) <= 1e-6 * abs(want) + 1e-12)
    return {"path": str(final), "metrics": reached, SCORE: score, "matches": matches, "device": result["device"]}
