"""Rich renderables shared by the CLI and (later) the app: result tables."""
from __future__ import annotations

from rich.table import Table


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


def metrics_table(title: str, rows: list[tuple[str, str, str, dict]], exact_forget_ppl: float | None = None) -> Table:
    """rows: (label, lr, steps, cell) where cell has M plus optional forget_gap/retain_drift/score/success.
    Compact headers so the table fits 80 columns (a legend goes in the caption)."""
    import math

    t = Table(title=title, header_style="bold underline", box=None, padding=(0, 1, 0, 0), pad_edge=False,
              caption="forget/retain/unseen: perplexity · AUC: loss-attack MIA, forget vs unseen (1 = remembered, "
                      "0.5 = looks unseen) · gap: forget_gap · exact: gap to the retrained twin · drift: retain_drift",
              caption_justify="left")
    t.add_column("method", no_wrap=True, max_width=13, overflow="ellipsis")
    for col in ("lr", "step", "forget", "retain", "unseen", "AUC", "gap", "exact", "drift", "score"):
        t.add_column(col, justify="right", no_wrap=True)
    t.add_column("ok", justify="center", no_wrap=True)
    for label, lr, steps, c in rows:
        auc = c.get("mia_auc") or {}
        exact = None
        if exact_forget_ppl and c.get("ppl_forget"):
            exact = abs(math.log(c["ppl_forget"]) - math.log(exact_forget_ppl))
        t.add_row(label, lr, steps, fmt(c.get("ppl_forget")), fmt(c.get("ppl_retain")), fmt(c.get("ppl_unseen")),
                  fmt(auc.get("loss"), 2),
                  fmt(c.get("forget_gap"), 2), fmt(exact, 2), fmt(c.get("retain_drift"), 2), fmt(c.get("score"), 3),
                  fmt(c.get("success")) if "success" in c else "")
    return t


def run_table(result: dict) -> Table:
    rows = [("original θ0", "", "0", result["baseline"])]
    rows += [(result["method"], f"{result['lr']:g}", str(c["step"]), c) for c in result["milestones"]]
    return metrics_table(f"{result['method']} on {result['model']}  (forget set {result['forget_set']['hash'][:12]})", rows)
