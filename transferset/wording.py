"""How numbers and counts are written for people: terminal lines, the dataset card and report pages."""

from __future__ import annotations

import math

__all__ = ["plural", "number", "seconds", "size"]


def plural(n: int, noun: str, many: str | None = None) -> str:
    """``1 shard``, ``2 shards``, ``60,000 rows`` (``many`` for an irregular plural)."""
    return f"{n:,} {noun if n == 1 else (many or noun + 's')}"


def number(v, digits: int = 4) -> str:
    """A value as people read it: ints with thousands separators, floats to ``digits`` significant places."""
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        if v.is_integer() and abs(v) < 1e15:
            return f"{int(v):,}"
        return f"{v:,.{digits}g}" if abs(v) >= 10 ** digits else f"{v:.{digits}g}"
    return str(v)


def seconds(s: float | None) -> str:
    """``104.3 s``; ``-`` when unknown."""
    return "-" if s is None or (isinstance(s, float) and math.isnan(s)) else f"{s:,.1f} s"


def size(n_bytes: int | None) -> str:
    """``4.9 MB`` (decimal units, as file managers show)."""
    if n_bytes is None:
        return "-"
    for unit, k in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n_bytes >= k:
            return f"{n_bytes / k:.1f} {unit}"
    return f"{n_bytes} B"
