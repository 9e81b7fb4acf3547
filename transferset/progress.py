"""Progress bars: shown on a terminal, silent when quiet or when stderr is not a terminal."""

from __future__ import annotations

import sys

__all__ = ["progress_bar"]


def progress_bar(total: int, *, desc: str, unit: str = "rows", initial: int = 0, quiet: bool = False):
    """A tqdm bar (rate and ETA) or None; callers do ``if bar: bar.update(n)`` and ``bar.close()``."""
    if quiet or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit=unit, unit_scale=unit == "rows", desc=desc, dynamic_ncols=True)
