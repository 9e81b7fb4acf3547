"""Rendering photo views in this process: (source index, path, view) tasks to uint8 pixels, bad files set aside.

:func:`render_chunk` is what each decode worker of ``labelling.photo_pool.DecodePool`` runs, and what a replay
(:mod:`transferset.inputs.replay`) runs to rebuild stored views, so both stages draw the same bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from ..errors import TransferSetError
from .decode import BadImage, PhotoTransform, render_views_of_file

__all__ = ["PhotoTask", "BadFile", "PhotoBatch", "render_chunk", "concat_batches"]


class PhotoTask(NamedTuple):
    """One view to render. ``box``/``flip`` given: replay that stored view; None: draw view ``view``."""

    source_index: int
    view: int
    path: str
    box: tuple[int, int, int, int] | None = None
    flip: int | None = None


class BadFile(NamedTuple):
    """A task whose file could not be decoded, with a one-line reason."""

    source_index: int
    view: int
    path: str
    reason: str


@dataclass
class PhotoBatch:
    """The good rows of one batch of tasks, in task order, and the bad ones.

    ``pixels`` [B, size, size, channels] uint8; ``boxes`` [B, 4] int32 (left, top, width, height); ``flips`` [B]
    uint8; ``source_index`` [B] int64; ``view`` [B] int32; ``tasks`` is how many tasks the batch covered.
    """

    source_index: np.ndarray
    view: np.ndarray
    pixels: np.ndarray
    boxes: np.ndarray
    flips: np.ndarray
    bad: list[BadFile] = field(default_factory=list)
    tasks: int = 0


def render_chunk(transform: PhotoTransform, base_seed: int, tasks: list[PhotoTask]) -> PhotoBatch:
    """Render ``tasks`` in this process (what each worker runs); bad files go to ``bad``, never raise.

    Consecutive tasks of the same file (its clean view and augmented views) share one decode.
    """
    n = len(tasks)
    pixels = np.empty((n,) + transform.row_shape, np.uint8)
    boxes, flips = np.empty((n, 4), np.int32), np.empty(n, np.uint8)
    ok = np.zeros(n, bool)
    bad: list[BadFile] = []
    start = 0
    while start < n:
        t0 = tasks[start]
        stop = start + 1
        while stop < n and tasks[stop].source_index == t0.source_index and tasks[stop].path == t0.path:
            stop += 1
        group = tasks[start:stop]
        wanted = [(t.view, None if t.box is None else transform.stored_view(t.view, t.box, t.flip or 0))
                  for t in group]
        try:
            got = render_views_of_file(t0.path, transform, wanted, base_seed, t0.source_index)
        except TransferSetError as e:  # BadImage, or a stored box that no longer fits the file
            reason = e.reason if isinstance(e, BadImage) else e.message
            bad += [BadFile(int(t.source_index), int(t.view), str(t.path), reason) for t in group]
        else:
            for k, (px, view) in enumerate(got, start):
                pixels[k], boxes[k], flips[k], ok[k] = px, view.box, view.flip, True
        start = stop
    sidx = np.fromiter((t.source_index for t in tasks), np.int64, n)
    views = np.fromiter((t.view for t in tasks), np.int32, n)
    return PhotoBatch(sidx[ok], views[ok], pixels[ok], boxes[ok], flips[ok], bad, n)


def concat_batches(parts: list[PhotoBatch]) -> PhotoBatch:
    """One :class:`PhotoBatch` of consecutive batches."""
    if len(parts) == 1:
        return parts[0]
    return PhotoBatch(*(np.concatenate([getattr(p, k) for p in parts])
                        for k in ("source_index", "view", "pixels", "boxes", "flips")),
                      bad=[b for p in parts for b in p.bad], tasks=sum(p.tasks for p in parts))
