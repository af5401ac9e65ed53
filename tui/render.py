"""Rich renderables shared by the CLI and (later) the app: result tables."""
from __future__ import annotations

from rich.table import Table

from engine.metric_registry import (
    FORGET_GAP,
    MIA_LOSS,
    PPL_FORGET,
    PPL_RETAIN_EVAL,
    PPL_UNSEEN,
    SCORE,
    UTILITY_DRIFT,
    read,
)
from engine.metric_registry import get as get_metric


def fmt(x, digits: int = 3) -> str:
    if x is None:
        return "—"
    if isinstance(x, bool):
        return "✔" if x else "✘"
    if isinstance(x, float):
        if abs(x) >= 1e5:
            return f"{x:.0e}"
        return f"{x:.0f}" if abs(x) >= 1e3 else f"{x:.{digits}g}"
    return str(x)


# The figures after lr and step, each (metric, significant digits). Headers are the metrics' short
# labels, except the one AUC shown: "AUC" (the caption names its attack). "exact" follows the gap.
_FIGURES = ((PPL_FORGET, 3), (PPL_RETAIN_EVAL, 3), (PPL_UNSEEN, 3), (MIA_LOSS, 2), (FORGET_GAP, 2), (UTILITY_DRIFT, 2),
            (SCORE, 3))


def _header(path: str) -> str:
    return "AUC" if path == MIA_LOSS else get_metric(path).label


def metrics_table(title: str, rows: list[tuple[str, str, str, dict]], exact_forget_ppl: float | None = None) -> Table:
    """rows: (label, lr, steps, cell): a cell, or θ0's metrics (no objective, no success).
    Compact headers so the table fits 80 columns (a legend goes in the caption)."""
    import math

    t = Table(title=title, header_style="bold underline", box=None, padding=(0, 1, 0, 0), pad_edge=False,
              caption="forget/retain_eval/unseen: perplexity · AUC: loss-attack MIA, forget vs unseen (1 = remembered, "
                      "0.5 = looks unseen) · gap: forget_gap · exact: gap to the retrained twin · drift: "
                      "retain_eval_drift (held-out utility) · ok: the verdict (gap, MIA interval, utility)",
              caption_justify="left")
    t.add_column("method", no_wrap=True, max_width=13, overflow="ellipsis")
    headers = [_header(path) for path, _ in _FIGURES]
    headers.insert(headers.index(_header(FORGET_GAP)) + 1, "exact")
    for col in ("lr", "step", *headers):
        t.add_column(col, justify="right", no_wrap=True)
    t.add_column("ok", justify="center", no_wrap=True)
    for label, lr, steps, c in rows:
        exact = None
        if exact_forget_ppl and c.get(PPL_FORGET):
            exact = abs(math.log(c[PPL_FORGET]) - math.log(exact_forget_ppl))
        figures = [fmt(read(c, path), digits) for path, digits in _FIGURES]
        figures.insert(headers.index("exact"), fmt(exact, 2))
        t.add_row(label, lr, steps, *figures, fmt(c.get("success")) if "success" in c else "")
    return t


def run_table(result: dict) -> Table:
    rows = [("original θ0", "", "0", result["baseline"])]
    cells = result["milestones"] + ([result["at_target"]] if result.get("at_target") and not any(
        c["step"] == result["at_target"]["step"] for c in result["milestones"]) else [])
    rows += [(result["method"], f"{result['lr']:g}", f"{c['step']}{'@' if c.get('at_target') else ''}", c)
             for c in sorted(cells, key=lambda c: c["step"])]
    return metrics_table(f"{result['method']} on {result['model']}  (forget set {result['forget_set']['hash'][:12]})", rows)
