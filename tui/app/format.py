"""How the app writes numbers, ages and robustness (plain strings: no Textual here)."""
from __future__ import annotations

from typing import Optional

from tui.numbers import fmt_lr, fmt_value

BARS = "▁▂▃▄▅▆▇█"

__all__ = ["age", "fmt_lr", "fmt_value", "robustness_bars", "score"]


def score(x: Optional[float]) -> str:
    return fmt_value(x)


def age(seconds: Optional[float]) -> str:
    if seconds is None:
        return "—"
    if seconds < 90:
        return f"{seconds:.0f}s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f}m"
    if seconds < 36 * 3600:
        return f"{seconds / 3600:.0f}h"
    return f"{seconds / 86400:.0f}d"


def robustness_bars(robustness: dict[str, float], methods: list[str]) -> str:
    """One bar per method (spec order; empty bar = 0 %, full = 100 %) and the best share: '▁▃█ 100%'."""
    shares = [robustness.get(m) for m in methods]
    if not any(s is not None for s in shares):
        return "—"
    bars = "".join(" " if s is None else BARS[min(len(BARS) - 1, int(s * (len(BARS) - 1) + 0.5))] for s in shares)
    return f"{bars} {max(s for s in shares if s is not None):.0%}"
