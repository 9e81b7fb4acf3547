"""A held-out split of a transfer set's own source rows, for choosing T and alpha without touching a test set.

``--holdout F`` picks a seeded fraction ``F`` of the set's *source* rows (a pure function of the source rows
present, ``F`` and the seed). Every row made from a held-out source row (its clean row and all its augmented
views) is kept out of training: the in-memory reader drops those rows, the streaming reader masks them out of
every batch (the epoch plan is unchanged, so a batch holds about ``1 - F`` real rows). The student is scored on
the held-out source rows' clean rows (view 0), or on all their views when the set keeps no clean view, against
the hard labels stored in the set.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import TransferSetError
from .reader import ReadSpec, ShardAccess, load_in_memory

__all__ = ["held_out_sources", "HoldOut", "HeldOutRows", "open_holdout", "skipped_only", "held_out_rows"]

_SALT = 0x686F6C64  # "hold": the split's random stream is apart from every other use of the seed
_BLOCK = 8192  # rows read at a time when gathering the held-out rows


def held_out_sources(sources: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """The held-out source indices (sorted): ``round(fraction * n)`` of the ``n`` distinct ``sources``, at least
    one, drawn by a seeded permutation; at least one source row is left to train on."""
    uniq = np.unique(np.asarray(sources, dtype=np.int64))
    if not (isinstance(fraction, float | int) and math.isfinite(fraction) and 0 < fraction < 1):
        raise TransferSetError(f"is a fraction of the source rows in (0, 1), got {fraction!r}", option="holdout")
    k = max(1, int(round(fraction * len(uniq))))
    if k >= len(uniq):
        raise TransferSetError(f"{fraction:g} of {len(uniq)} source rows leaves none to train on; hold out less",
                               option="holdout")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), _SALT]))
    return np.sort(uniq[rng.permutation(len(uniq))[:k]])


class HeldOutRows:
    """The rows the student is scored on: ``rows``, ``read(start, stop)`` (as a source) and ``labels``."""

    def __init__(self, inputs: np.ndarray, labels: np.ndarray, description: str) -> None:
        self.inputs, self.labels, self.description = inputs, labels, description
        self.rows = len(labels)

    def read(self, start: int, stop: int) -> np.ndarray:
        return self.inputs[start:stop]


@dataclass
class HoldOut:
    """Which global rows are kept out of training (``excluded``: their indices, sorted, unique) and which of them are
    scored (``scored``).

    The rows are listed, not marked in an array of every row: the count of rows is only known once every shard is
    checked, and a manifest from someone else may say 10^12 (a mask of that many rows asked for 931 GiB)."""

    fraction: float
    sources: np.ndarray
    excluded: np.ndarray
    scored: np.ndarray
    _on: dict = field(default_factory=dict, repr=False, compare=False)  # excluded as a tensor, per device

    def keep(self, index: torch.Tensor) -> torch.Tensor:
        """True for rows (by global index) that may be trained on."""
        if index.device not in self._on:
            self._on[index.device] = torch.from_numpy(np.asarray(self.excluded, np.int64)).to(index.device)
        ex, idx = self._on[index.device], index.long()
        if not len(ex):
            return torch.ones_like(idx, dtype=torch.bool)
        return ex[torch.searchsorted(ex, idx).clamp_(max=len(ex) - 1)] != idx

    def drop_from(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """:func:`load_in_memory`'s tensors without the held-out rows."""
        keep = self.keep(tensors["index"])
        return {name: t[keep] for name, t in tensors.items()}

    def mask_batch(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A streamed batch with its held-out rows masked out (they count in no loss term)."""
        batch["mask"] = batch["mask"] & self.keep(batch["index"])
        return batch


def skipped_only(skipped: np.ndarray) -> HoldOut:
    """No holdout, but the rows ``skipped`` (of files that could not be decoded) kept out of training."""
    return HoldOut(0.0, np.zeros(0, np.int64), np.unique(np.asarray(skipped, np.int64)), np.zeros(0, np.int64))


def open_holdout(root: str | os.PathLike, fraction: float, seed: int, *, skip_bad_shards: bool = False,
                 skipped: np.ndarray | None = None) -> HoldOut:
    """Split the set at ``root``: read every row's ``source_index`` and ``view`` (small), draw the held-out
    sources, and mark their rows. The rows ``skipped`` (files that could not be decoded) are never drawn and are
    kept out of training too."""
    cols = load_in_memory(root, ("source_index", "view"), skip_bad_shards=skip_bad_shards)
    index, src, view = (cols[k].numpy() for k in ("index", "source_index", "view"))
    bad = np.isin(index, skipped) if skipped is not None and len(skipped) else np.zeros(len(index), bool)
    held = held_out_sources(src[~bad], fraction, seed)
    rows = np.isin(src, held) & ~bad
    excluded = np.unique(index[rows | bad].astype(np.int64))
    clean = rows & (view == 0)
    scored = np.sort(index[clean] if clean.any() else index[rows])
    return HoldOut(float(fraction), held, excluded, scored)


def held_out_rows(root: str | os.PathLike, holdout: HoldOut, *, source_override: str | os.PathLike | None = None,
                  skip_bad_shards: bool = False) -> HeldOutRows:
    """Inputs and hard labels of the scored rows, read block by block (inputs replayed only for those rows); with
    ``skip_bad_shards`` a bad shard is left out here too (none of its rows was drawn: :func:`open_holdout`)."""
    spec = ReadSpec.open(root, ("inputs", "labels"), None, source_override, skip_bad_shards=skip_bad_shards)
    shards = ShardAccess(spec)
    parts: dict[str, list] = {"inputs": [], "labels": []}
    try:
        for i, n in enumerate(shards.shard_rows):
            first = int(shards.row_starts[i])
            want = holdout.scored[(holdout.scored >= first) & (holdout.scored < first + n)] - first
            for a in range(0, n, _BLOCK):
                pos = want[(want >= a) & (want < a + _BLOCK)]
                if not len(pos):
                    continue
                got = shards.read(i, a, min(a + _BLOCK, n))
                got = spec.finish({name: arr[pos - a] for name, arr in got.items()})
                for name in parts:
                    parts[name].append(got[name])
    finally:
        shards.close()
    labels = np.concatenate(parts["labels"]).astype(np.int64) if parts["labels"] else np.zeros(0, np.int64)
    if not len(labels) or (labels < 0).any():
        raise TransferSetError(f"{root}: the set holds no hard label for some held-out rows; scoring on a holdout "
                               "needs a set labelled with hard labels; evaluate on a labelled source instead", option="holdout")
    what = f"{len(holdout.sources)} held-out source rows ({holdout.fraction:g} of the set)"
    return HeldOutRows(np.concatenate(parts["inputs"]), labels, what)

