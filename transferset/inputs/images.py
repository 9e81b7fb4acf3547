"""Which axis of a row is channels: the one rule an image row is read by.

A row (one sample, no batch axis) is read as an image by its rank and shape alone:

- rank 2, ``H x W``: one channel, no channel axis;
- rank 3 whose last axis has at most :data:`MAX_CHANNELS_LAST` (4) entries: ``H x W x C`` (channels-last, as
  image files decode: grey, grey + alpha, RGB, RGBA);
- rank 3 whose leading axis is smaller than its last: ``C x H x W`` (channels-first, the PyTorch habit), with
  any number of channels, so an ``(8, 32, 32)`` row of 8 feature maps is CHW, as is ``(3, 32, 32)``;
- anything else (vectors, ``(9, 9, 9)`` cubes, rank 4 and up): not an image row; callers refuse it.

The channels-last reading wins: a ``(3, 32, 4)`` row is HWC. Nothing here imports torch or ONNX Runtime.
"""

from __future__ import annotations

from typing import Sequence

__all__ = ["MAX_CHANNELS_LAST", "HW", "HWC", "CHW", "image_layout", "channel_axis"]

#: The largest last axis read as channels (grey, grey + alpha, RGB, RGBA).
MAX_CHANNELS_LAST = 4
HW, HWC, CHW = "HW", "HWC", "CHW"


def image_layout(row_shape: Sequence[int]) -> str | None:
    """``"HW"``, ``"HWC"`` or ``"CHW"`` for an image row of shape ``row_shape`` (no batch axis), else None."""
    shape = tuple(int(d) for d in row_shape)
    if len(shape) == 2:
        return HW
    if len(shape) == 3 and shape[-1] <= MAX_CHANNELS_LAST:
        return HWC
    if len(shape) == 3 and shape[0] < shape[-1]:
        return CHW
    return None


def channel_axis(row_shape: Sequence[int]) -> int | None:
    """The channel axis of a row (0 for CHW, 2 for HWC; add 1 for a batch), or None (HW or not an image)."""
    layout = image_layout(row_shape)
    return 2 if layout == HWC else 0 if layout == CHW else None
