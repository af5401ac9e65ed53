"""One evaluation, measured: every metric of `engine.evaluate.evaluate` (the perplexity of each set,
the four MIA attacks' AUCs, exact memorization and extraction strength) from one forward pass per
set, against one forward pass per metric, as peer tools compute them (a perplexity script per set,
an attack script per attack, each reading the forget and unseen sets again; open-unlearning's EM and
ES each a metric with its own pass over each set).

    python bench/eval_pass.py [--workspace DIR] [--repeat 5] [--json] [--quick]

Both sides run alternately on the same model and sets, --repeat times; medians are compared. The
per-metric side is checked to give the engine's figures (|Δ| ≤ 1e-5 relative), so the two did the
same work. Target: per-metric / engine ≥ 3×.

Besides, the evaluation's share of a run's wall time at the demo's milestones (5, 10, 20, 40; ga_gd,
batch 8, the demo's lr): the seconds between each milestone's last step and its cell, over the
whole `train_to_milestones`. θ0's baseline is outside it (a study computes it once per model and
forget set). A share over a third would call for a cheaper evaluation.

Default: the quick demo model (built once under the temp folder, about a minute). --quick: a
random-weight Llama of the demo's size (built in seconds) and 3 repeats. With --json the last line
is {"name", "ratio", "target", "pass", ...}; it exits 1 when it does not pass.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import CACHE, alternate, demo_workspace, finish, medians, ratio_pass, spread, timed, tiny_workspace  # noqa: E402

TARGET = 3.0
SHARE_LIMIT = 1 / 3
RTOL = 1e-5


# ---------------------------------------------------------------- one forward pass per metric

def _rows(model, chunks, batch_size: int):
    """One forward pass over `chunks`: per chunk, (index, logits of its predicted positions [T, V]
    in fp32, the tokens they predict [T])."""
    import torch

    with torch.no_grad():
        for start in range(0, len(chunks), batch_size):
            mask = chunks.attention_mask[start:start + batch_size]
            width = int(mask.sum(1).max())
            ids, mask = chunks.input_ids[start:start + batch_size, :width], mask[:, :width]
            logits = model(input_ids=ids, attention_mask=mask).logits
            for r in range(ids.size(0)):
                valid = mask[r, 1:].bool()
                yield start + r, logits[r, :-1][valid].float(), ids[r, 1:][valid]


def peer_ppl(model, chunks, batch_size: int) -> float:
    """A set's perplexity: exp of the mean token NLL, from its own pass."""
    import torch.nn.functional as F

    nll, n = 0.0, 0
    for _, logits, target in _rows(model, chunks, batch_size):
        nll += float(F.cross_entropy(logits, target, reduction="sum").double())
        n += len(target)
    mean = nll / max(1, n)
    return math.exp(mean) if mean < 700 else math.inf


def peer_attack(model, chunks, attack: str, batch_size: int, min_k: float) -> list[float]:
    """One attack's membership score per chunk (higher = more member-like), from its own pass."""
    import torch

    out = []
    for i, logits, target in _rows(model, chunks, batch_size):
        logp = torch.log_softmax(logits, -1)
        tok = logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
        if attack == "min_k_pp":
            p = logp.exp()
            mu = (p * logp).sum(-1)
            sigma = ((p * logp.square()).sum(-1) - mu.square()).clamp(min=1e-12).sqrt()
            tok = (tok - mu) / sigma
        values = tok.double()
        if attack in ("min_k", "min_k_pp"):
            k = max(1, int(len(values) * min_k))
            out.append(float(values.sort().values[:k].mean()))
        elif attack == "loss":
            out.append(float(values.mean()))
        else:  # zlib
            out.append(float(values.mean()) / max(1, len(zlib.compress(chunks.texts[i].encode("utf-8")))))
    return out


def peer_memorization(model, chunks, figure: str, batch_size: int) -> float | None:
    """Exact memorization or extraction strength of a set of plain chunks (each chunk's second half
    is its answer), from its own pass; extraction strength by its definition, trying every prefix."""
    values = []
    for _, logits, target in _rows(model, chunks, batch_size):
        half = len(target) // 2
        hits = (logits.argmax(-1) == target)[half:]
        if not len(hits):
            continue
        if figure == "exact":
            values.append(float(hits.double().mean()))
        else:
            k = next(k for k in range(len(hits) + 1) if bool(hits[k:].all()))
            values.append(1.0 - k / len(hits))
    return sum(values) / len(values) if values else None


def per_metric(model, sets, batch_size: int = 8, min_k: float = 0.2) -> dict:
    """The metrics of `evaluate`, one forward pass per metric (and per set an attack compares): the
    perplexity of every role (retain_eval too), the attacks' AUCs, and the loss AUC's bootstrap
    interval (a statistic of the loss attack's scores, no pass of its own)."""
    import numpy as np

    from engine.data import ROLES
    from engine.evaluate import ATTACKS, roc_auc
    from engine.metric_registry import EXACT_MEMORIZATION, EXTRACTION_STRENGTH, MEMORIZATION_ROLES
    from engine.verdict import auc_interval

    model.eval()
    out = {f"ppl_{role}": (None if getattr(sets, role) is None else peer_ppl(model, getattr(sets, role), batch_size))
           for role in ROLES}
    out = {k: (v if v is None or math.isfinite(v) else None) for k, v in out.items()}
    scores = {a: (np.array(peer_attack(model, sets.forget, a, batch_size, min_k)),
                  np.array(peer_attack(model, sets.unseen, a, batch_size, min_k))) for a in ATTACKS}
    out["mia_auc"] = {a: roc_auc(*scores[a]) for a in ATTACKS}
    out["mia_auc_lo"], out["mia_auc_hi"] = auc_interval(*scores["loss"])
    for path, figure in ((EXACT_MEMORIZATION, "exact"), (EXTRACTION_STRENGTH, "extraction")):
        out[path] = {role: None if getattr(sets, role) is None else
                     peer_memorization(model, getattr(sets, role), figure, batch_size) for role in MEMORIZATION_ROLES}
    return out


def flat(metrics: dict) -> dict[str, float | None]:
    """Nested figures (mia_auc.loss, exact_memorization.forget) as dotted paths."""
    out = {}
    for k, v in metrics.items():
        if isinstance(v, dict):
            out.update({f"{k}.{kk}": vv for kk, vv in v.items()})
        else:
            out[k] = v
    return out


def differences(a: dict, b: dict, rtol: float = RTOL) -> tuple[list[str], float]:
    """The figures where two sets of metrics disagree (|Δ| > rtol × max(1, |x|), or one missing) and
    the largest relative |Δ| of the rest."""
    fa, fb = flat(a), flat(b)
    problems, worst = [], 0.0
    for key in sorted(set(fa) | set(fb)):
        x, y = fa.get(key), fb.get(key)
        if x is None or y is None:
            if x is not y:
                problems.append(f"{key}: {x!r} vs {y!r}")
            continue
        d = abs(x - y) / max(1.0, abs(x))
        worst = max(worst, d)
        if d > rtol:
            problems.append(f"{key}: {x!r} vs {y!r}")
    return problems, worst


def passes(ratio: float, problems: list[str]) -> bool:
    return not problems and ratio_pass(ratio, TARGET, at_most=False)


# ---------------------------------------------------------------- the evaluation's share of a run

def eval_share(model_dir: Path, sets, milestones: tuple[int, ...], lr: float, batch_size: int) -> dict:
    """One ga_gd run to the last milestone: its wall time and the part spent evaluating milestones
    (the run does not watch for its at-target cell: that cell and the watch's forward passes are no
    milestone's evaluation, and between milestones the watch's time would count as training here)."""
    from engine.config import RunConfig
    from engine.evaluate import evaluate
    from engine.models import load_model, load_tokenizer
    from engine.run import train_to_milestones

    model, tok = load_model(str(model_dir), "cpu"), load_tokenizer(str(model_dir))
    baseline, _ = evaluate(model, sets)
    last = [0.0]
    spent = [0.0]

    def on_step(step, loss):
        last[0] = time.perf_counter()

    def on_milestone(cell):
        spent[0] += time.perf_counter() - last[0]

    cfg = RunConfig(method="ga_gd", lr=lr, milestones=milestones, batch_size=batch_size,
                    seq_len=sets.forget.input_ids.shape[1], watch_every=0)
    t0 = time.perf_counter()
    train_to_milestones(model, tok, sets, cfg, baseline, on_step, on_milestone)
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "eval_s": spent[0], "share": spent[0] / wall}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workspace", type=Path, help="the quick demo workspace (default: one under the temp folder)")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="a random-weight model of the demo's size, 3 repeats")
    p.add_argument("--json", action="store_true", help="print the result as JSON on the last line")
    a = p.parse_args(argv)
    import statistics

    import torch

    from engine.demo import DEMO_LRS, QUICK
    from engine.evaluate import evaluate
    from engine.models import load_model, quiet_transformers

    quiet_transformers()
    torch.set_num_threads(a.threads)
    if a.quick:
        model_dir, _, sets = tiny_workspace(CACHE / "eval-pass", hidden=QUICK.hidden, layers=QUICK.layers,
                                            heads=QUICK.heads, seq_len=QUICK.seq_len)
        repeat, what = 3, "a random-weight Llama of the quick demo's size"
    else:
        model_dir, _, sets = demo_workspace(a.workspace)
        repeat, what = a.repeat, "the quick demo model"
    model = load_model(str(model_dir), "cpu")
    engine_metrics = evaluate(model, sets)[0]
    peer_metrics = per_metric(model, sets)
    problems, worst = differences(engine_metrics, peer_metrics)
    times = alternate({"engine (one pass per set)": lambda: timed(lambda: evaluate(model, sets)),
                       "one pass per metric": lambda: timed(lambda: per_metric(model, sets))}, repeat)
    med = medians(times)
    ratio = med["one pass per metric"] / med["engine (one pass per set)"]
    shares = [eval_share(model_dir, sets, QUICK.milestones, DEMO_LRS["quick"][-1], QUICK.run_batch_size)
              for _ in range(1 if a.quick else 3)]
    share = statistics.median(s["share"] for s in shares)
    ok = passes(ratio, problems)
    chunks = {role: len(ch) for role, ch in sets.items()}
    print(f"{what}; chunks per set {chunks}; {torch.get_num_threads()} thread(s), CPU")
    for name, values in times.items():
        print(spread(name, values))
    print(f"  per-metric / engine {ratio:.2f}x (target ≥ {TARGET}x); figures agree: {not problems} "
          f"(largest relative |Δ| {worst:.1e})")
    for line in problems:
        print(f"  FAIL {line}")
    print(f"  evaluation's share of a run at milestones {list(QUICK.milestones)}: {share:.1%} "
          f"({'over' if share > SHARE_LIMIT else 'under'} a third; wall {statistics.median(s['wall_s'] for s in shares):.2f} s)")
    print("pass" if ok else "MISSED")
    return finish({"name": "eval_pass", "ratio": ratio, "target": TARGET,
                   "target_is": "seconds of one forward pass per metric over the engine's one pass per set, at least",
                   "pass": ok, "median_s": med, "figures_agree": not problems, "max_rel_diff": worst,
                   "problems": problems, "eval_share_of_run": share, "share_limit": SHARE_LIMIT,
                   "runs": shares, "chunks": chunks, "repeat": repeat, "quick": a.quick}, a.json)


if __name__ == "__main__":
    sys.exit(main())
