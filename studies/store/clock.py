"""Time as the store keeps it: UTC. SQLite gives datetimes back naive; they are UTC too."""
from __future__ import annotations

import datetime as dt
from typing import Optional


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def aware(when: dt.datetime) -> dt.datetime:
    """`when` with its zone: UTC when it has none (how a driver or sqlmodel version returns a
    stored datetime varies; what we print does not)."""
    return when.replace(tzinfo=dt.timezone.utc) if when.tzinfo is None else when


def age_s(when: Optional[dt.datetime], now: Optional[dt.datetime] = None) -> Optional[float]:
    """Seconds since `when` (a naive datetime is read as UTC)."""
    if when is None:
        return None
    return max(0.0, ((now or utcnow()) - aware(when)).total_seconds())
