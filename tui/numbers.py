"""How learning rates and metric values are written, everywhere (CLI tables, the app, exports'
previews). Plain functions with no imports, so the app's first frame does not wait for the store's
libraries."""
from __future__ import annotations

from typing import Optional


def fmt_lr(lr: float) -> str:
    """Compact and exact when it can be: 1e-05, 3e-05, 2.5e-04; else three significant digits."""
    for p in range(3):
        s = f"{lr:.{p}e}"
        if float(s) == lr:
            return s
    return f"{lr:.2e}"


def fmt_value(x: Optional[float]) -> str:
    """At most 7 characters (a cell adds a success mark: 8)."""
    if x is None:
        return "—"
    a = abs(x)
    if a != 0 and (a >= 1e4 or a < 1e-3):
        return f"{x:.1e}" if x > 0 else f"{x:.0e}"
    if a >= 100:
        return f"{x:.0f}"
    s = f"{x:.3g}"
    return s if len(s) <= 6 else f"{x:.2g}"
