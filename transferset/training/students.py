"""Student networks: a registry filled by a decorator, built from a spec string (after timm's create_model).

Spec grammar: ``name[:args]`` where ``args`` is a comma-separated list of positional integers and
``key=value`` options, e.g. ``mlp:800,800,dropout=0.2``, ``cnn:32,64,fc=128``, ``resnet20:width=16``.
A spec with a dot before its colon, ``package.module:factory``, names a user factory instead; it is imported
with importlib and called as ``factory(input_shape=..., num_classes=...)``.

Every student built here takes the stored input dtype (uint8, int, float16, ...) and does, inside its
forward (so an ONNX export carries it): ``x -> ((x.float() * input_scale) - input_mean) / input_std``.

Image students (``cnn``, ``resnet8``, ``resnet20``) read the per-row input shape as follows:
rank 2 ``H x W`` -> one channel; rank 3 whose last dimension is at most 4 -> ``H x W x C`` (channels-last,
permuted to NCHW inside forward); any other rank 3 -> ``C x H x W`` as is. Other ranks are refused.
"""

from __future__ import annotations

import importlib
import math
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from ..errors import TransferSetError, printable
from .image_rows import ToNCHW, image_layout

__all__ = [
    "STUDENTS",
    "StudentFactory",
    "Student",
    "register_student",
    "create_student",
    "rebuild_student",
    "list_students",
    "count_parameters",
    "export_onnx",
    "check_positions",
    "image_layout",
    "id_vocab",
    "resolve_id_spec",
    "takes_ids",
]

#: A built-in factory: ``(spec, input_shape, num_classes, positional ints, options as strings) -> body``.
StudentFactory = Callable[[str, tuple[int, ...], int, tuple[int, ...], dict[str, str]], nn.Module]

#: Registered student names -> factories (a plain dict, filled by :func:`register_student`).
STUDENTS: dict[str, StudentFactory] = {}

_SPEC_KEYS = ("spec", "input_shape", "num_classes", "input_scale", "input_mean", "input_std")

_ONNX_DTYPES = {
    "uint8": torch.uint8, "int8": torch.int8, "int16": torch.int16, "int32": torch.int32,
    "int64": torch.int64, "float16": torch.float16, "float32": torch.float32, "float64": torch.float64,
}


def register_student(name: str) -> Callable[[StudentFactory], StudentFactory]:
    """Decorator that stores a factory in :data:`STUDENTS` under ``name``.

    Args:
        name: the spec name (no ``:``, ``,`` or ``.``).

    Returns:
        The decorator, which returns the factory unchanged.
    """
    if not name or any(ch in name for ch in ":,.= "):
        raise ValueError(f"student name {name!r} must be non-empty and contain none of ': , . ='")

    def decorate(factory: StudentFactory) -> StudentFactory:
        if name in STUDENTS:
            raise ValueError(f"student {name!r} is already registered")
        STUDENTS[name] = factory
        return factory

    return decorate


def list_students() -> list[str]:
    """Names of the registered students, sorted."""
    return sorted(STUDENTS)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters (``requires_grad``) in ``model``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


class Student(nn.Module):
    """A student body behind the input cast and scaling: ``body(((x.float() * scale) - mean) / std)``."""

    def __init__(self, body: nn.Module, scale: float = 1.0, mean: float = 0.0, std: float = 1.0) -> None:
        super().__init__()
        self.body = body
        self.scale = float(scale)
        self.mean = float(mean)
        self.std = float(std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.float32)
        if self.scale != 1.0:
            x = x * self.scale
        if self.mean != 0.0:
            x = x - self.mean
        if self.std != 1.0:
            x = x / self.std
        return self.body(x)


def _parse_spec(spec: str) -> tuple[str, tuple[int, ...], dict[str, str]]:
    name, _, args = spec.partition(":")
    name = name.strip()
    positional: list[int] = []
    options: dict[str, str] = {}
    for raw in (a.strip() for a in args.split(",")) if args.strip() else ():
        if not raw:
            raise TransferSetError(f"{spec!r} has an empty argument; write e.g. 'mlp:800,800,dropout=0.2'",
                                   option="student")
        if "=" in raw:
            key, _, value = raw.partition("=")
            key = key.strip()
            if key in options:
                raise TransferSetError(f"{spec!r} gives option {key!r} twice", option="student")
            options[key] = value.strip()
        else:
            if options:
                raise TransferSetError(f"{spec!r}: positional values must come before key=value options",
                                       option="student")
            try:
                positional.append(int(raw))
            except ValueError:
                raise TransferSetError(f"{spec!r}: {raw!r} is not an integer; "
                                       "positional arguments are integer widths, options are key=value",
                                       option="student") from None
    return name, tuple(positional), options


def _take_options(spec: str, options: dict[str, str], allowed: Mapping[str, tuple[type, Any]]) -> dict[str, Any]:
    """Typed values for ``allowed`` (name -> (type, default)); refuses unknown or malformed options."""
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        names = ", ".join(sorted(allowed)) or "none"
        raise TransferSetError(f"{spec!r}: unknown option {unknown[0]!r}; this student takes: {names}",
                               option="student")
    out: dict[str, Any] = {}
    for key, (kind, default) in allowed.items():
        if key not in options:
            out[key] = default
            continue
        try:
            out[key] = kind(options[key])
        except ValueError:
            raise TransferSetError(f"{spec!r}: option {key}={options[key]!r} must be a {kind.__name__}",
                                   option="student") from None
    return out


def _positive(spec: str, what: str, values: Sequence[int]) -> None:
    if any(v < 1 for v in values):
        raise TransferSetError(f"{spec!r}: {what} must be positive integers, got {list(values)}", option="student")


@register_student("mlp")
def _mlp(spec: str, input_shape: tuple[int, ...], num_classes: int, widths: tuple[int, ...],
         options: dict[str, str]) -> nn.Module:
    """``mlp:W1,W2,...[,dropout=P]``: flatten, then Linear-ReLU(-Dropout) per hidden width, then Linear."""
    opts = _take_options(spec, options, {"dropout": (float, 0.0)})
    if not 0.0 <= opts["dropout"] < 1.0:
        raise TransferSetError(f"{spec!r}: dropout must be in [0, 1), got {opts['dropout']}", option="student")
    _positive(spec, "hidden widths", widths)
    layers: list[nn.Module] = [nn.Flatten()]
    width = math.prod(input_shape)
    for hidden in widths:
        layers += [nn.Linear(width, hidden), nn.ReLU(inplace=True)]
        if opts["dropout"] > 0:
            layers.append(nn.Dropout(opts["dropout"]))
        width = hidden
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


@register_student("cnn")
def _cnn(spec: str, input_shape: tuple[int, ...], num_classes: int, widths: tuple[int, ...],
         options: dict[str, str]) -> nn.Module:
    """``cnn[:C1,C2][,fc=H]``: (3x3 conv, ReLU, 2x2 max-pool) x2, flatten, optional hidden fc, Linear.

    Defaults: channels 32,64 and a hidden fc of 128 (``fc=0`` goes straight to the classes).
    """
    opts = _take_options(spec, options, {"fc": (int, 128)})
    widths = widths or (32, 64)
    if len(widths) != 2:
        raise TransferSetError(f"{spec!r}: cnn takes two channel widths (e.g. 'cnn:32,64'), got {len(widths)}",
                               option="student")
    _positive(spec, "channel widths", widths)
    if opts["fc"] < 0:
        raise TransferSetError(f"{spec!r}: fc must be >= 0, got {opts['fc']}", option="student")
    layout, channels, height, width = image_layout(spec, input_shape)
    layers: list[nn.Module] = [ToNCHW(layout)]
    c_in = channels
    for c_out in widths:
        # ceil_mode keeps rows as small as 1x1 valid
        layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2, ceil_mode=True)]
        c_in = c_out
        height, width = -(-height // 2), -(-width // 2)
    layers.append(nn.Flatten())
    flat = c_in * height * width
    if opts["fc"] > 0:
        layers += [nn.Linear(flat, opts["fc"]), nn.ReLU(inplace=True)]
        flat = opts["fc"]
    layers.append(nn.Linear(flat, num_classes))
    return nn.Sequential(*layers)


@register_student("deepcnn")
def _deepcnn(spec: str, input_shape: tuple[int, ...], num_classes: int, widths: tuple[int, ...],
             options: dict[str, str]) -> nn.Module:
    """``deepcnn:C1,C2,...[,pool=2,fc=0]``: a thin, deep CNN (the FitNets setting): a 3x3 conv and ReLU per width,
    a 2x2 max-pool after every ``pool`` convolutions, flatten, an optional hidden fc, Linear.

    Default widths 8,8,16,16,16,16. Module names (for ``--hint-loss``) follow ``body.<index>`` in that order.
    """
    opts = _take_options(spec, options, {"pool": (int, 2), "fc": (int, 0)})
    widths = widths or (8, 8, 16, 16, 16, 16)
    _positive(spec, "channel widths", widths)
    if opts["pool"] < 1 or opts["fc"] < 0:
        raise TransferSetError(f"{spec!r}: pool must be >= 1 and fc >= 0", option="student")
    layout, c_in, height, width = image_layout(spec, input_shape)
    layers: list[nn.Module] = [ToNCHW(layout)]
    for i, c_out in enumerate(widths):
        layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(inplace=True)]
        if (i + 1) % opts["pool"] == 0:
            layers.append(nn.MaxPool2d(2, ceil_mode=True))
            height, width = -(-height // 2), -(-width // 2)
        c_in = c_out
    layers.append(nn.Flatten())
    flat = c_in * height * width
    if opts["fc"] > 0:
        layers += [nn.Linear(flat, opts["fc"]), nn.ReLU(inplace=True)]
        flat = opts["fc"]
    layers.append(nn.Linear(flat, num_classes))
    return nn.Sequential(*layers)


class _BasicBlock(nn.Module):
    """He et al. 2016 basic block: conv3x3-BN-ReLU-conv3x3-BN plus shortcut, then ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            # projection shortcut (the paper's option B); export-friendly, costs a few parameters
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class _CifarResNet(nn.Module):
    """CIFAR ResNet of depth 6n+2 (He et al. 2016, sec. 4.2): stages of width w, 2w, 4w, global average pool."""

    def __init__(self, layout: str, channels: int, num_classes: int, blocks: int, width: int) -> None:
        super().__init__()
        self.to_nchw = ToNCHW(layout)
        self.stem = nn.Sequential(nn.Conv2d(channels, width, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        stages: list[nn.Module] = []
        c_in = width
        for i, c_out in enumerate((width, 2 * width, 4 * width)):
            for b in range(blocks):
                stages.append(_BasicBlock(c_in, c_out, 2 if (i > 0 and b == 0) else 1))
                c_in = c_out
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(c_in, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(self.to_nchw(x)))
        return self.fc(x.mean(dim=(2, 3)))


def _resnet(blocks: int) -> StudentFactory:
    def factory(spec: str, input_shape: tuple[int, ...], num_classes: int, positional: tuple[int, ...],
                options: dict[str, str]) -> nn.Module:
        if positional:
            raise TransferSetError(f"{spec!r}: resnets take no positional arguments; use 'width=16'", option="student")
        opts = _take_options(spec, options, {"width": (int, 16)})
        _positive(spec, "width", [opts["width"]])
        layout, channels, _, _ = image_layout(spec, input_shape)
        return _CifarResNet(layout, channels, num_classes, blocks, opts["width"])

    factory.__doc__ = f"``resnet{6 * blocks + 2}[:width=16]``: CIFAR ResNet with {blocks} basic block(s) per stage."
    return factory


register_student("resnet8")(_resnet(1))
register_student("resnet20")(_resnet(3))


#: vocabulary a ``seqcnn`` takes without ``vocab=``: every value of an 8-bit input (bytes)
SEQCNN_DEFAULT_VOCAB = 256
_ID_VOCAB = {"uint8": 256, "int8": 256, "bool": 2}


def id_vocab(input_dtype: str, input_max: int | None = None) -> int | None:
    """The vocabulary an id student needs for a set's input: 256 for 8-bit dtypes, else the recorded max + 1.

    ``input_max`` is the largest id the set holds, when its manifest records one. None when neither says: the
    student then takes its default and refuses, naming the option, the first id that does not fit.
    """
    if input_dtype in _ID_VOCAB:
        return _ID_VOCAB[input_dtype]
    return int(input_max) + 1 if input_max is not None else None


def resolve_id_spec(spec: str, input_dtype: str, input_max: int | None = None) -> str:
    """``spec`` with ``vocab=`` filled in from the set for an id student that does not give one.

    The training loop passes the manifest's ``input.dtype`` (and ``input.max`` when the set records it);
    any other spec, or one whose vocabulary the set does not tell, comes back unchanged.
    """
    name, colon, args = spec.strip().partition(":")
    if name not in _ID_STUDENTS or any(a.strip().startswith("vocab=") for a in args.split(",")):
        return spec
    vocab = id_vocab(input_dtype, input_max)
    if vocab is None:
        return spec
    return f"{spec.strip()},vocab={vocab}" if colon and args.strip() else f"{name}:vocab={vocab}"


def takes_ids(spec: str) -> bool:
    """True when the student named by ``spec`` reads integer ids (an embedding), not scaled numbers."""
    return spec.strip().partition(":")[0] in _ID_STUDENTS


class _SeqCnn(nn.Module):
    """Embedding over ids -> (Conv1d, ReLU[, max-pool 2]) per width -> global max pool over positions -> Linear."""

    takes_ids = True

    def __init__(self, vocab: int, emb: int, widths: tuple[int, ...], kernel: int, stride: int, pool: int,
                 num_classes: int) -> None:
        super().__init__()
        self.vocab = vocab
        self.embed = nn.Embedding(vocab, emb)
        layers: list[nn.Module] = []
        c_in = emb
        for i, c_out in enumerate(widths):
            layers += [nn.Conv1d(c_in, c_out, kernel, stride=stride if i == 0 else 1, padding=kernel // 2),
                       nn.ReLU(inplace=True)]
            if pool > 1 and i < len(widths) - 1:
                layers.append(nn.MaxPool1d(pool, ceil_mode=True))
            c_in = c_out
        self.convs = nn.Sequential(*layers)
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids = x.reshape(x.shape[0], -1).to(torch.int64)  # the Student wrapper cast ids to float32: exact below 2**24
        if not (torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()) and ids.numel():
            lo, hi = int(ids.min()), int(ids.max())
            if lo < 0 or hi >= self.vocab:
                raise TransferSetError(f"the inputs hold id {hi if hi >= self.vocab else lo}, outside the seqcnn "
                                       f"vocabulary [0, {self.vocab}); give the student 'vocab={max(hi + 1, self.vocab)}' "
                                       "(or more)", option="student")
        h = self.convs(self.embed(ids).transpose(1, 2))
        return self.fc(h.amax(dim=2))


@register_student("seqcnn")
def _seqcnn(spec: str, input_shape: tuple[int, ...], num_classes: int, widths: tuple[int, ...],
            options: dict[str, str]) -> nn.Module:
    """``seqcnn:EMB,C1[,C2...][,vocab=V,kernel=K,stride=S,pool=P]``: a student for integer ids (bytes, tokens).

    Each row (any shape, read flattened as a sequence) goes through an embedding of ``EMB`` dimensions over ``V``
    ids (default 256, every byte value), one Conv1d(kernel ``K``, default 5; the first with stride ``S``, default
    1) and ReLU per channel width ``C``, a max-pool of ``P`` (default 2) between convolutions, a global max pool
    over positions and a Linear layer. Inputs are ids: no input scaling applies (it is recorded as 1, 0, 1).
    """
    opts = _take_options(spec, options, {"vocab": (int, SEQCNN_DEFAULT_VOCAB), "kernel": (int, 5),
                                         "stride": (int, 1), "pool": (int, 2)})
    if len(widths) < 2:
        raise TransferSetError(f"{spec!r}: seqcnn takes an embedding size and at least one channel width "
                               "(e.g. 'seqcnn:16,64')", option="student")
    _positive(spec, "embedding size and channel widths", widths)
    _positive(spec, "vocab, kernel, stride and pool", [opts["vocab"], opts["kernel"], opts["stride"], opts["pool"]])
    return _SeqCnn(opts["vocab"], widths[0], widths[1:], opts["kernel"], opts["stride"], opts["pool"], num_classes)


@register_student("lm")
def _lm(spec: str, input_shape: tuple[int, ...], num_classes: int, widths: tuple[int, ...],
        options: dict[str, str]) -> nn.Module:
    """``lm:LAYERS,DIM,HEADS[,max_len=N,dropout=P]``: a small causal transformer language model.

    Pre-norm GPT blocks with :func:`torch.nn.functional.scaled_dot_product_attention` (causal), learned positions
    up to ``max_len`` (default: the set's positions, at least 1024) and an output layer tied to the token
    embedding (:class:`~transferset.training.lm.CausalLM`). Takes ids [B, L], gives logits [B, L, V] with V the
    set's vocabulary (``num_classes``); for per-position sets.
    """
    from .lm import CausalLM

    opts = _take_options(spec, options, {"max_len": (int, max(1024, int(input_shape[-1]))), "dropout": (float, 0.0)})
    if len(widths) != 3:
        raise TransferSetError(f"{spec!r}: lm takes LAYERS,DIM,HEADS (e.g. 'lm:2,128,4')", option="student")
    _positive(spec, "layers, dim and heads", widths)
    layers, dim, heads = widths
    if dim % heads:
        raise TransferSetError(f"{spec!r}: DIM {dim} is not a multiple of HEADS {heads}", option="student")
    if len(input_shape) != 1 or input_shape[0] > opts["max_len"]:
        raise TransferSetError(f"{spec!r}: takes rows of ids [length <= max_len {opts['max_len']}], got "
                               f"{list(input_shape)}", option="student")
    return CausalLM(num_classes, layers, dim, heads, opts["max_len"], opts["dropout"])


_ID_STUDENTS = ("seqcnn", "lm")


class _Crnn(nn.Module):
    """Image line -> per-column logits [B, T, classes]: conv blocks that pool the height (and the width ``stride``
    times over), one convolution spanning the remaining height, an optional bidirectional GRU, a per-column Linear."""

    def __init__(self, layout: str, channels: int, height: int, widths: tuple[int, ...], stride: int, gru: int,
                 num_classes: int) -> None:
        super().__init__()
        layers: list[nn.Module] = [ToNCHW(layout)]
        c_in, halvings = channels, stride.bit_length() - 1
        for i, c_out in enumerate(widths):
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
                       nn.MaxPool2d((2 if height > 1 else 1, 2 if i < halvings else 1), ceil_mode=True)]
            height = -(-height // 2) if height > 1 else 1
            c_in = c_out
        layers += [nn.Conv2d(c_in, c_in, (height, 3), padding=(0, 1)), nn.BatchNorm2d(c_in), nn.ReLU(inplace=True)]
        self.convs = nn.Sequential(*layers)
        self.gru = nn.GRU(c_in, gru, batch_first=True, bidirectional=True) if gru else None
        self.head = nn.Linear(2 * gru if gru else c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.convs(x).squeeze(2).transpose(1, 2)  # [B, C, 1, T] -> [B, T, C]
        if self.gru is not None:
            h = self.gru(h)[0]
        return self.head(h)


@register_student("crnn")
def _crnn(spec: str, input_shape: tuple[int, ...], num_classes: int, widths: tuple[int, ...],
          options: dict[str, str]) -> nn.Module:
    """``crnn:C1,C2,...[,stride=S][,gru=H]``: a per-frame student for image lines [H, W] or [C, H, W].

    Each width adds a 3x3 convolution, batch norm, ReLU and a max-pool that halves the height; the first log2(S)
    of them also halve the width (``S``, default 4, a power of two up to 2 ** len(widths)), so the output has
    T = ceil(W / S) frames. A convolution spanning the remaining height collapses it, then an optional
    bidirectional GRU of ``H`` units a direction (default 0: none) and a Linear give logits [B, T, classes].
    """
    opts = _take_options(spec, options, {"stride": (int, 4), "gru": (int, 0)})
    widths = widths or (16, 32, 64)
    _positive(spec, "channel widths", widths)
    stride = opts["stride"]
    if stride < 1 or stride & (stride - 1) or stride > 2 ** len(widths):
        raise TransferSetError(f"{spec!r}: stride must be a power of two up to 2 ** (number of widths) = "
                               f"{2 ** len(widths)}, got {stride}", option="student")
    if opts["gru"] < 0:
        raise TransferSetError(f"{spec!r}: gru must be >= 0, got {opts['gru']}", option="student")
    if len(input_shape) == 2:
        layout, channels, height = "HW", 1, input_shape[0]
    elif len(input_shape) == 3:
        layout, channels, height = "CHW", input_shape[0], input_shape[1]
    else:
        raise TransferSetError(f"{spec!r} reads image lines of shape [H, W] or [C, H, W], but the input shape is "
                               f"{list(input_shape)}; signals [frames, features] want 'conv1d'", option="student")
    return _Crnn(layout, channels, height, widths, stride, opts["gru"], num_classes)


class _Conv1d(nn.Module):
    """Signal [B, frames, features] -> per-frame logits [B, frames, classes] (same-padded 1-D convolutions)."""

    def __init__(self, features: int, widths: tuple[int, ...], kernel: int, num_classes: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = features
        for c_out in widths:
            layers += [nn.Conv1d(c_in, c_out, kernel, padding=kernel // 2), nn.BatchNorm1d(c_out), nn.ReLU(inplace=True)]
            c_in = c_out
        self.convs = nn.Sequential(*layers)
        self.head = nn.Conv1d(c_in, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.convs(x.transpose(1, 2))).transpose(1, 2)


@register_student("conv1d")
def _conv1d(spec: str, input_shape: tuple[int, ...], num_classes: int, widths: tuple[int, ...],
            options: dict[str, str]) -> nn.Module:
    """``conv1d:C1,C2,...[,kernel=K]``: a per-frame student for signals [frames, features].

    Each width adds a same-padded Conv1d of odd kernel ``K`` (default 5) over the frames, batch norm and ReLU; a
    1x1 convolution gives logits [B, frames, classes], one distribution per input frame.
    """
    opts = _take_options(spec, options, {"kernel": (int, 5)})
    widths = widths or (64, 64)
    _positive(spec, "channel widths", widths)
    if opts["kernel"] < 1 or opts["kernel"] % 2 == 0:
        raise TransferSetError(f"{spec!r}: kernel must be a positive odd number, got {opts['kernel']}",
                               option="student")
    if len(input_shape) != 2:
        raise TransferSetError(f"{spec!r} reads signals of shape [frames, features], but the input shape is "
                               f"{list(input_shape)}", option="student")
    return _Conv1d(input_shape[1], widths, opts["kernel"], num_classes)


def _user_factory(spec: str, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    module_name, _, attr = spec.partition(":")
    if not attr:
        raise TransferSetError(f"{spec!r}: a user factory is written 'package.module:factory'", option="student")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise TransferSetError(f"{spec!r}: cannot import module {module_name!r} ({exc}); "
                               "make it importable (installed or on PYTHONPATH)", option="student") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise TransferSetError(f"{spec!r}: module {module_name!r} has no callable {attr!r}", option="student")
    body = factory(input_shape=input_shape, num_classes=num_classes)
    if not isinstance(body, nn.Module):
        raise TransferSetError(f"{spec!r}: the factory returned {type(body).__name__}, not a torch.nn.Module",
                               option="student")
    return body


def create_student(spec: str, input_shape: Sequence[int], num_classes: int, input_scale: float = 1.0,
                   input_mean: float = 0.0, input_std: float = 1.0) -> nn.Module:
    """Build a student from a spec string.

    Args:
        spec: ``name[:args]`` for a registered student, or ``package.module:factory`` for a user factory.
        input_shape: shape of one input row (without the batch axis).
        num_classes: number of output logits.
        input_scale: multiplies the float32-cast input first (e.g. 1/255 for uint8 pixels).
        input_mean: subtracted after scaling.
        input_std: divides last; must be positive.

    Returns:
        A :class:`Student` whose ``student_spec`` attribute rebuilds it via ``create_student(**student_spec)``.

    Raises:
        TransferSetError: for an unknown name, bad arguments or an input shape the student cannot take.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise TransferSetError("is empty; give e.g. 'mlp:800,800' or 'package.module:factory'", option="student")
    spec = spec.strip()
    shape = tuple(int(d) for d in input_shape)
    if not shape or any(d < 1 for d in shape):
        raise TransferSetError(f"input shape {list(shape)} is not a list of positive dimensions")
    if int(num_classes) < 1:
        raise TransferSetError(f"num_classes must be at least 1, got {num_classes}")
    num_classes = int(num_classes)
    for key, value in (("input_scale", input_scale), ("input_mean", input_mean), ("input_std", input_std)):
        if not math.isfinite(float(value)):
            raise TransferSetError(f"{key} must be a finite number, got {value}")
    if float(input_std) <= 0:
        raise TransferSetError(f"input_std must be positive, got {input_std}")

    head = spec.partition(":")[0]
    if head.strip() == "timm":
        from .timm_student import timm_body

        body = timm_body(spec, shape, num_classes)
    elif "." in head:
        body = _user_factory(spec, shape, num_classes)
    else:
        name, positional, options = _parse_spec(spec)
        if name not in STUDENTS:
            raise TransferSetError(f"{name!r}: unknown student; registered students: "
                                   f"{', '.join(list_students())}, or 'package.module:factory'", option="student")
        body = STUDENTS[name](spec, shape, num_classes, positional, options)
    if getattr(body, "takes_ids", False):  # ids are looked up, never scaled: a scale would corrupt them
        input_scale, input_mean, input_std = 1.0, 0.0, 1.0
    model = Student(body, input_scale, input_mean, input_std)
    model.student_spec = {
        "spec": spec, "input_shape": list(shape), "num_classes": num_classes,
        "input_scale": float(input_scale), "input_mean": float(input_mean), "input_std": float(input_std),
    }
    return model


def rebuild_student(spec_dict: Mapping[str, Any], *, allow_import: bool = False) -> nn.Module:
    """Rebuild a student from its saved ``student_spec`` dict (same architecture, fresh weights).

    A spec read from a file is data: a ``package.module:factory`` spec is imported only with ``allow_import``
    (the user vouches for that code), so a shared checkpoint cannot make transferset import a module.

    Raises:
        TransferSetError: when the dict misses a key or holds one it does not know, or names code to import
            without ``allow_import``.
    """
    if not isinstance(spec_dict, Mapping):
        raise TransferSetError(f"student_spec must be a dict, got {type(spec_dict).__name__}")
    missing = [k for k in ("spec", "input_shape", "num_classes") if k not in spec_dict]
    unknown = sorted(set(spec_dict) - set(_SPEC_KEYS))
    if missing or unknown:
        raise TransferSetError(f"student_spec is not one written by create_student (missing {missing}, unknown "
                               f"{unknown}); re-save the checkpoint with this version of transferset")
    spec = spec_dict["spec"]
    if not isinstance(spec, str):
        raise TransferSetError(f"student_spec 'spec' must be a string, got {type(spec).__name__}")
    if "." in spec.partition(":")[0] and not allow_import:
        raise TransferSetError(
            f"is off, and the checkpoint's student {printable(spec)!r} is user code to import; transferset does not "
            "import code named by a file. If you trust that module, turn this option on", option="allow_import")
    return create_student(**dict(spec_dict))


def export_onnx(model: nn.Module, path: str | Path, input_shape: Sequence[int], input_dtype: str) -> None:
    """Export ``model`` to ONNX (opset 17, legacy exporter) with a dynamic batch axis.

    The graph input is named ``input`` and takes ``input_dtype`` (the stored dtype, e.g. ``uint8``; the
    cast and scaling are inside the model); the output is ``logits`` [batch, classes]. The model is exported
    in eval mode and its training flag restored afterwards.

    Raises:
        TransferSetError: for an input dtype ONNX inputs cannot carry here.
    """
    body = getattr(model, "body", model)
    # a language model: int64 ids [B, L] -> logits [B, L, V], batch and length dynamic
    positional = len(input_shape) == 1 and getattr(body, "takes_ids", False) and hasattr(body, "hidden")
    if positional:
        input_dtype = "int64"
    if input_dtype not in _ONNX_DTYPES:
        raise TransferSetError(f"input dtype {input_dtype!r} cannot be exported; choose one of "
                               f"{', '.join(_ONNX_DTYPES)}")
    dummy = torch.zeros((2, *(int(d) for d in input_shape)), dtype=_ONNX_DTYPES[input_dtype])
    names = (["input_ids"], {"input_ids": {0: "batch", 1: "length"}, "logits": {0: "batch", 1: "length"}}) \
        if positional else (["input"], {"input": {0: "batch"}, "logits": {0: "batch"}})
    was_training = model.training
    model.eval()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            # the legacy TorchScript exporter is deprecated but fast and dependable for these small graphs
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", UserWarning)
            torch.onnx.export(model, (dummy,), str(path), dynamo=False, opset_version=17,
                              do_constant_folding=not positional,  # folding would copy the tied output layer
                              input_names=names[0], output_names=["logits"], dynamic_axes=names[1])
    finally:
        model.train(was_training)


def check_positions(model: nn.Module, spec: str, input_shape: Sequence[int], input_dtype: str, positions: int) -> None:
    """Refuse, before any training, a student whose output does not have ``positions`` distributions a row.

    One zero row goes through ``model`` (eval mode, restored after): a per-position set (tokens, frames) needs
    logits [B, positions, C], the teachers' frame count.

    Raises:
        TransferSetError: naming both counts.
    """
    x = torch.zeros((1, *(int(d) for d in input_shape)), dtype=_ONNX_DTYPES.get(input_dtype, torch.float32),
                    device=next(model.parameters()).device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            shape = tuple(model(x).shape)
    except (RuntimeError, ValueError) as e:
        raise TransferSetError(f"{spec!r} cannot read rows of shape {list(input_shape)} {input_dtype} "
                               f"({str(e).splitlines()[0][:200]})", option="student") from None
    finally:
        model.train(was_training)
    if len(shape) != 3 or shape[1] != positions:
        got = f"{shape[1]} frames a row" if len(shape) == 3 else "one distribution a row"
        raise TransferSetError(f"{spec!r} gives {got}, but the set has {positions} positions a row (the teachers' "
                               "frames); choose a student with one output per teacher frame (crnn: its stride)",
                               option="student")
