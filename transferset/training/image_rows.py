"""How a student reads an image row: its layout by the one channel-axis rule, and the module that makes it NCHW."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import TransferSetError
from ..inputs.images import CHW, HW, HWC
from ..inputs.images import image_layout as row_layout

__all__ = ["image_layout", "ToNCHW"]


def image_layout(spec: str, input_shape: tuple[int, ...]) -> tuple[str, int, int, int]:
    """How an image student reads a row: ``(layout, channels, height, width)``, layout in HW, HWC, CHW
    (:func:`transferset.inputs.images.image_layout`); a row that is no image is refused, naming the student."""
    layout = row_layout(input_shape)
    if layout == HW:
        return HW, 1, input_shape[0], input_shape[1]
    if layout == HWC:
        return HWC, input_shape[2], input_shape[0], input_shape[1]
    if layout == CHW:
        return CHW, input_shape[0], input_shape[1], input_shape[2]
    raise TransferSetError(
        f"{spec!r} needs image rows of rank 2 (HxW) or 3 (HxWxC or CxHxW), but the input shape is "
        f"{list(input_shape)}; use an 'mlp' student for flat inputs", option="student")


class ToNCHW(nn.Module):
    """A batch of rows in ``layout`` (HW, HWC or CHW) as N x C x H x W."""

    def __init__(self, layout: str) -> None:
        super().__init__()
        self.layout = layout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.layout == HW:
            return x.unsqueeze(1)
        if self.layout == HWC:
            return x.permute(0, 3, 1, 2)
        return x
