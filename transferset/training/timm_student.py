"""``--student timm:NAME[,key=value...]``: any timm model as a student (the optional extra ``transferset[timm]``).

The model is built with ``pretrained=False`` (nothing is downloaded), for the set's channels and classes; its input
is the student's scaled float image in NCHW (rows stored HxWxC are transposed first, as for the registry's CNNs).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..errors import TransferSetError
from .image_rows import ToNCHW, image_layout

__all__ = ["timm_body", "TIMM_EXTRA"]

TIMM_EXTRA = "pip install 'transferset[timm]'"


def _import_timm(spec: str) -> Any:
    try:
        import timm
    except Exception as e:  # ImportError, or a torchvision build that does not match torch
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise TransferSetError(f"{spec!r} needs the optional extra timm ({TIMM_EXTRA}); importing timm failed: "
                               f"{first}", option="student") from None
    return timm


def _value(text: str) -> Any:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def timm_body(spec: str, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """The body of ``timm:NAME[,key=value,...]`` (keyword arguments go to ``timm.create_model``)."""

    _, _, rest = spec.partition(":")
    name, *opts = [p.strip() for p in rest.split(",")]
    if not name:
        raise TransferSetError(f"{spec!r}: name a timm model, e.g. timm:resnet18", option="student")
    kwargs = {}
    for o in opts:
        key, eq, value = o.partition("=")
        if not eq or not key.strip():
            raise TransferSetError(f"{spec!r}: options are key=value, got {o!r}", option="student")
        kwargs[key.strip()] = _value(value.strip())
    layout, channels, _, _ = image_layout(spec, input_shape)
    timm = _import_timm(spec)
    try:
        model = timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=channels, **kwargs)
    except (RuntimeError, TypeError, ValueError) as e:
        raise TransferSetError(f"{spec!r}: timm cannot build it ({str(e).splitlines()[0][:200]})",
                               option="student") from None
    return nn.Sequential(ToNCHW(layout), model)
