"""Seeded augmented views that can be replayed exactly.

Every random number is a pure function of ``(view seed, counter)`` (counter-based, SplitMix64 mixing), so a row's
augmentation depends only on its clean row, source index, view number, the spec and the base seed: never on the
batch it was rendered in. View 0 is the clean row.

Spec: comma-separated ops applied in order, each ``name`` or ``name:arg``:

- ``jitter:N``: translate by integers ``dx, dy`` uniform in ``[-N, N]``, zero fill (Hinton et al. 2015, MNIST).
- ``crop:P``: pad by ``P`` zeros on every side, then crop a random window of the original size.
- ``flip``: horizontal flip with probability 0.5.
- ``noise:SIGMA``: additive Gaussian noise with standard deviation ``SIGMA`` in the units of the data.
- ``mixup:A``: mixup views for function matching (Beyer et al. 2022, "Knowledge distillation: A good teacher
  is patient and consistent"): the row becomes ``lam * x + (1 - lam) * partner`` where ``partner`` is the clean
  row of another source row drawn uniformly, and ``lam ~ Beta(A, A)`` (Johnk's method on the view's seeded
  uniforms). Partner and weight are a pure function of (seed, source index, view, source rows):
  :func:`mixup_params` gives them, and a transfer set made with mixup stores them per row (``mixup_partner``,
  ``mixup_weight``) so a consumer can rebuild the view without this code. Hard labels stay the row's own.
- ``munge:P[:S]``: MUNGE (Bucilua et al. 2006, "Model compression") for vector rows: each attribute is, with
  probability ``P``, replaced by a draw from ``Normal(nb, |x - nb| / S)`` where ``nb`` is the attribute of the
  row's nearest neighbour (Euclidean, on clean rows) within its block of ``MUNGE_BLOCK`` consecutive source rows.

Image ops take the rows :func:`transferset.images.image_layout` reads as images: ``H x W``, ``H x W x C``
(C <= 4) or ``C x H x W`` (C < W, any number of channels); the spatial axes are H (rows, ``dy``) and W
(columns, ``dx``; the axis ``flip`` reverses).
Outputs keep the source dtype; integer results are rounded and clipped to the dtype's range.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from ..errors import TransferSetError
from .images import CHW, HW, image_layout

__all__ = ["AugmentSpec", "MUNGE_BLOCK", "OPS", "parse_augment", "needs_block", "munge_blocks_needed", "mixup_params",
           "view_seed", "render_views", "replay"]

#: Rows per MUNGE neighbourhood block: block ``b`` holds source rows ``[b * MUNGE_BLOCK, (b + 1) * MUNGE_BLOCK)``.
MUNGE_BLOCK = 4096

#: op name -> usage, for messages.
OPS = {"jitter": "jitter:N", "crop": "crop:P", "flip": "flip", "noise": "noise:SIGMA", "munge": "munge:P[:S]",
       "mixup": "mixup:A"}
_MIXUP_TRIES = 64  # Johnk's method accepts a pair with probability >= 1/2 for A <= 1: 2^-64 falls back to 1/2
_IMAGE_OPS = ("jitter", "crop", "flip")

_M64 = (1 << 64) - 1
_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_C1, _C2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
#: Each op of a spec draws from its own counter range: op ``k`` uses counters ``(k + 1) << 40`` onwards.
_OP_STRIDE = 40


def _mix(z: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser on uint64 (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * _C1
        z = (z ^ (z >> np.uint64(27))) * _C2
        return z ^ (z >> np.uint64(31))


def _u64(x: np.ndarray | int) -> np.ndarray:
    if isinstance(x, (int, np.integer)):
        return np.uint64(int(x) & _M64)
    a = np.asarray(x)
    return a.astype(np.int64).astype(np.uint64) if a.dtype.kind == "i" else a.astype(np.uint64)


def view_seed(base_seed: int, source_index: np.ndarray | int, view: np.ndarray | int) -> np.ndarray:
    """The uint64 seed of view ``view`` of source row ``source_index`` (broadcasts; platform independent)."""
    with np.errstate(over="ignore"):
        h = _mix(np.uint64(int(base_seed) & _M64) ^ _GAMMA)
        h = _mix(h + _mix(_u64(source_index) + _GAMMA * np.uint64(2)))
        h = _mix(h + _mix(_u64(view) + _GAMMA * np.uint64(3)))
    return np.asarray(h, dtype=np.uint64)


def _uniform(seeds: np.ndarray, counter: np.ndarray) -> np.ndarray:
    """float64 in [0, 1) from (seed, counter): the SplitMix64 stream of ``seed`` at position ``counter``."""
    with np.errstate(over="ignore"):
        z = _mix(seeds + (counter + np.uint64(1)) * _GAMMA)
    return (z >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def _normal(seeds: np.ndarray, counter: np.ndarray) -> np.ndarray:
    """Standard normal by Box-Muller from counters ``2c`` and ``2c + 1``."""
    c2 = counter * np.uint64(2)
    u1 = _uniform(seeds, c2)
    u2 = _uniform(seeds, c2 + np.uint64(1))
    return np.sqrt(-2.0 * np.log1p(-u1)) * np.cos(2.0 * np.pi * u2)


@dataclass(frozen=True)
class AugmentSpec:
    """Parsed augmentation: ``ops`` is a tuple of ``(name, *args)`` applied in order."""

    ops: tuple[tuple[Any, ...], ...] = ()

    @property
    def canonical(self) -> str:
        """The spec as a normal-form string (``""`` for none); ``parse_augment(canonical)`` gives it back."""
        return ",".join(":".join([op[0]] + [repr(a) if isinstance(a, float) else str(a) for a in op[1:]])
                        for op in self.ops)

    def to_json(self) -> list[dict[str, Any]]:
        """JSON-safe list of ``{"op": name, "args": [...]}``."""
        return [{"op": op[0], "args": list(op[1:])} for op in self.ops]

    def __bool__(self) -> bool:
        return bool(self.ops)


def _bad(op: str, why: str) -> TransferSetError:
    return TransferSetError(f"{op!r}: {why}; valid ops are {', '.join(OPS.values())} "
                            "(comma-separated, e.g. jitter:2,noise:0.1)", option="augment")


def _number(op: str, text: str, kind: type, name: str) -> Any:
    try:
        v = kind(text)
    except ValueError:
        raise _bad(op, f"{name} must be {'an integer' if kind is int else 'a number'}, got {text!r}") from None
    if kind is float and not math.isfinite(v):
        raise _bad(op, f"{name} must be finite")
    return v


def _positive(item: str, args: list[str], name: str) -> float:
    """The one positive number of an op such as ``noise:SIGMA`` or ``mixup:A``."""
    if len(args) != 1:
        raise _bad(item, f"write {item.split(':')[0]}:{name} with one positive number")
    v = _number(item, args[0], float, name)
    if v <= 0:
        raise _bad(item, f"{name} must be positive, got {v}")
    return v


def parse_augment(spec: str | None) -> AugmentSpec:
    """Parse ``spec`` (e.g. ``"crop:4,flip"``); ``None``, ``""`` and ``"none"`` give no ops."""
    if spec is None or not str(spec).strip() or str(spec).strip().lower() == "none":
        return AugmentSpec()
    ops = []
    for item in str(spec).split(","):
        item = item.strip()
        parts = [p.strip() for p in item.split(":")]
        name, args = parts[0].lower(), parts[1:]
        if name not in OPS:
            raise _bad(item, f"unknown op {name!r}" if name else "empty op")
        if name == "flip":
            if args:
                raise _bad(item, "flip takes no argument")
            ops.append(("flip",))
        elif name in ("jitter", "crop"):
            if len(args) != 1:
                raise _bad(item, f"write {OPS[name]} with one integer")
            n = _number(item, args[0], int, "N" if name == "jitter" else "P")
            if n < 1:
                raise _bad(item, f"{name} needs a positive number of pixels, got {n}")
            ops.append((name, n))
        elif name in ("mixup", "noise"):
            if name == "mixup" and any(op[0] == "mixup" for op in ops):
                raise _bad(item, "one mixup per spec (its partner and weight are stored per row)")
            ops.append((name, _positive(item, args, "A" if name == "mixup" else "SIGMA")))
        else:
            if len(args) not in (1, 2):
                raise _bad(item, "write munge:P or munge:P:S")
            p = _number(item, args[0], float, "P")
            s = _number(item, args[1], float, "S") if len(args) == 2 else 1.0
            if not 0.0 <= p <= 1.0:
                raise _bad(item, f"P is a probability in [0, 1], got {p}")
            if s <= 0:
                raise _bad(item, f"S must be positive, got {s}")
            ops.append(("munge", p, s))
    return AugmentSpec(tuple(ops))


def mixup_params(base_seed: int, source_index: np.ndarray, view: np.ndarray, source_rows: int, alpha: float,
                 op_index: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(partner, weight)`` of mixup views: partner row (int64, never the row itself when there are two or more
    rows) and weight ``lam`` of the row itself (float64, Beta(alpha, alpha) by Johnk's method). View 0 gets
    ``(row, 1.0)``. ``op_index`` is the op's position in the spec (each op draws from its own counters)."""
    sidx = np.asarray(source_index, dtype=np.int64).reshape(-1)
    vw = np.asarray(view, dtype=np.int64).reshape(-1)
    seeds = view_seed(base_seed, sidx, vw)
    base = np.uint64((op_index + 1) << _OP_STRIDE)
    partner = np.floor(_uniform(seeds, base) * max(source_rows - 1, 1)).astype(np.int64)
    if source_rows > 1:
        partner = partner + (partner >= sidx)  # uniform over the other rows
    else:
        partner = sidx.copy()
    lam = np.full(len(sidx), 0.5)
    todo = np.ones(len(sidx), bool)
    for t in range(_MIXUP_TRIES):
        u = _uniform(seeds, base + np.uint64(2 + 2 * t))
        v = _uniform(seeds, base + np.uint64(3 + 2 * t))
        x, y = u ** (1.0 / alpha), v ** (1.0 / alpha)
        ok = todo & (x + y <= 1.0) & (x + y > 0.0)
        lam[ok] = x[ok] / (x[ok] + y[ok])
        todo &= ~ok
        if not todo.any():
            break
    clean = vw == 0
    return np.where(clean, sidx, partner), np.where(clean, 1.0, lam)


def mixup_op(spec: AugmentSpec | None) -> tuple[int, float] | None:
    """``(position in the spec, A)`` of the spec's mixup op, or None."""
    for k, op in enumerate(spec.ops if spec is not None else ()):
        if op[0] == "mixup":
            return k, float(op[1])
    return None


def needs_block(spec: AugmentSpec | str | None) -> bool:
    """True when the spec uses MUNGE, which needs the clean rows of each row's block."""
    spec = spec if isinstance(spec, AugmentSpec) else parse_augment(spec)
    return any(op[0] == "munge" for op in spec.ops)


def munge_blocks_needed(source_index: np.ndarray) -> list[tuple[int, int]]:
    """The ``[start, stop)`` source-row ranges of the MUNGE blocks that ``source_index`` touches (stop unclipped)."""
    blocks = np.unique(np.asarray(source_index, dtype=np.int64) // MUNGE_BLOCK)
    return [(int(b) * MUNGE_BLOCK, (int(b) + 1) * MUNGE_BLOCK) for b in blocks]


def _to_dtype(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return np.clip(np.rint(x), info.min, info.max).astype(dtype)
    if dtype.kind == "b":
        return x >= 0.5
    return x.astype(dtype)


def _image_layout(op: str, row_shape: tuple[int, ...]) -> str:
    layout = image_layout(row_shape)
    if layout is None:
        raise TransferSetError(
            f"{op} needs image rows (H x W, H x W x C with C <= 4, or C x H x W with C < W); the source rows are "
            f"{row_shape}; reshape the data to images, or use noise/munge for vector rows", option="augment")
    return layout


def _as_hwc(x: np.ndarray, layout: str) -> np.ndarray:
    if layout == HW:
        return x[..., None]
    return np.moveaxis(x, 1, -1) if layout == CHW else x


def _from_hwc(x: np.ndarray, layout: str) -> np.ndarray:
    if layout == HW:
        return x[..., 0]
    return np.moveaxis(x, -1, 1) if layout == CHW else x


def _shift(x: np.ndarray, dy: np.ndarray, dx: np.ndarray) -> np.ndarray:
    """``out[b, y, x] = x[b, y - dy[b], x - dx[b]]`` with zero fill; ``x`` is [B, H, W, C]."""
    b, h, w = x.shape[:3]
    ys = np.arange(h)[None, :] - dy[:, None]
    xs = np.arange(w)[None, :] - dx[:, None]
    ok = ((ys >= 0) & (ys < h))[:, :, None] & ((xs >= 0) & (xs < w))[:, None, :]
    out = x[np.arange(b)[:, None, None], np.clip(ys, 0, h - 1)[:, :, None], np.clip(xs, 0, w - 1)[:, None, :]]
    out[~ok] = 0
    return out


def _crop(x: np.ndarray, p: int, oy: np.ndarray, ox: np.ndarray) -> np.ndarray:
    """Pad [B, H, W, C] by ``p`` zeros, then take the H x W window at ``(oy[b], ox[b])`` of each row."""
    b, h, w = x.shape[:3]
    padded = np.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
    ys = oy[:, None] + np.arange(h)[None, :]
    xs = ox[:, None] + np.arange(w)[None, :]
    return padded[np.arange(b)[:, None, None], ys[:, :, None], xs[:, None, :]]


def _munge(x: np.ndarray, sidx: np.ndarray, seeds: np.ndarray, base: np.uint64, p: float, s: float,
           block_reader: Callable[[int, int], np.ndarray] | None) -> np.ndarray:
    if block_reader is None:
        raise TransferSetError("munge needs the clean rows of each block: pass block_reader "
                               "(for a Source, source.read)", option="augment")
    n = x.shape[0]
    flat = x.reshape(n, -1).astype(np.float64)
    d = flat.shape[1]
    nb = flat.copy()  # a row without a neighbour (a block of one row) keeps its values
    for b0, b1 in munge_blocks_needed(sidx):
        block = np.asarray(block_reader(b0, b1)).reshape(-1, d).astype(np.float64)
        in_block = np.nonzero((sidx >= b0) & (sidx < b1))[0]
        if len(block) < 2:
            continue
        queries, inverse = np.unique(sidx[in_block] - b0, return_inverse=True)
        nn = np.empty(len(queries), dtype=np.int64)
        cols = np.ascontiguousarray(block.T)
        # squared distances summed attribute by attribute in a fixed order: the same bits for a row whatever
        # else is in the batch, so the nearest neighbour (first index on ties) never depends on the batch
        step = max(1, (1 << 22) // len(block))
        for q0 in range(0, len(queries), step):
            q = queries[q0:q0 + step]
            d2 = np.zeros((len(q), len(block)))
            for j in range(d):
                d2 += np.square(cols[j][None, :] - cols[j][q][:, None])
            d2[np.arange(len(q)), q] = np.inf
            nn[q0:q0 + step] = np.argmin(d2, axis=1)
        nb[in_block] = block[nn[inverse]]
    counter = base + np.arange(d, dtype=np.uint64)
    pick = _uniform(seeds[:, None], counter[None, :]) < p
    z = _normal(seeds[:, None], (counter + np.uint64(d))[None, :])
    draw = nb + z * (np.abs(flat - nb) / s)
    return np.where(pick, draw, flat).reshape(x.shape)


def _mixup(x: np.ndarray, sidx: np.ndarray, vw: np.ndarray, base_seed: int, alpha: float, k: int,
           row_reader, source_rows) -> np.ndarray:
    if row_reader is None or not source_rows:
        raise TransferSetError("mixup needs the source's other rows: pass row_reader and source_rows "
                               "(transferset label and replay do)", option="augment")
    partner, lam = mixup_params(base_seed, sidx, vw, source_rows, alpha, k)
    other = np.asarray(row_reader(partner), dtype=np.float64)
    lam = lam.reshape((-1,) + (1,) * (x.ndim - 1))
    return lam * x.astype(np.float64) + (1.0 - lam) * other


def _image_op(x: np.ndarray, op: tuple, seeds: np.ndarray, base: np.uint64, layout: str) -> np.ndarray:
    """One of jitter, crop or flip on rows ``x`` laid out as ``layout``."""
    hwc = _as_hwc(x, layout)
    two = base + np.arange(2, dtype=np.uint64)
    if op[0] == "jitter":
        u = _uniform(seeds[:, None], two[None, :])
        d = np.floor(u * (2 * op[1] + 1)).astype(np.int64) - op[1]
        hwc = _shift(hwc, d[:, 0], d[:, 1])
    elif op[0] == "crop":
        u = _uniform(seeds[:, None], two[None, :])
        o = np.floor(u * (2 * op[1] + 1)).astype(np.int64)
        hwc = _crop(hwc, op[1], o[:, 0], o[:, 1])
    else:
        flip = _uniform(seeds, base) < 0.5
        hwc = np.where(flip[:, None, None, None], hwc[:, :, ::-1], hwc)
    return _from_hwc(hwc, layout)


def render_views(rows: np.ndarray, source_index: np.ndarray, view: np.ndarray, spec: AugmentSpec | None,
                 base_seed: int, block_reader: Callable[[int, int], np.ndarray] | None = None,
                 row_reader: Callable[[np.ndarray], np.ndarray] | None = None,
                 source_rows: int | None = None) -> np.ndarray:
    """Augmented rows: ``out[i]`` is view ``view[i]`` of source row ``source_index[i]``, whose clean row is ``rows[i]``.

    View 0 is returned unchanged. The result depends only on each row's own inputs, never on the batch.

    Args:
        rows: clean rows [B, *row_shape].
        source_index: [B] source row numbers.
        view: [B] view numbers.
        spec: parsed augmentation (None or no ops: a copy of ``rows``).
        base_seed: the transfer set's augmentation seed.
        block_reader: for ``munge`` only: ``block_reader(start, stop)`` returns the clean source rows
            ``[start, min(stop, rows))`` (``Source.read`` does); called once per MUNGE block the batch touches.
        row_reader, source_rows: for ``mixup`` only: ``row_reader(indices)`` returns clean source rows
            (``Source.read_rows`` does) and ``source_rows`` is how many the source has.
    """
    rows = np.asarray(rows)
    out = np.array(rows, copy=True)
    sidx = np.asarray(source_index, dtype=np.int64).reshape(-1)
    vw = np.asarray(view, dtype=np.int64).reshape(-1)
    if not (len(rows) == len(sidx) == len(vw)):
        raise ValueError(f"rows, source_index and view differ in length: {len(rows)}, {len(sidx)}, {len(vw)}")
    if spec is None or not spec.ops:
        return out
    row_shape = tuple(rows.shape[1:])
    for op in spec.ops:
        if op[0] in _IMAGE_OPS:
            _image_layout(op[0], row_shape)
    sel = np.nonzero(vw != 0)[0]
    if len(sel) == 0:
        return out
    dtype = rows.dtype
    x = rows[sel]
    seeds = view_seed(base_seed, sidx[sel], vw[sel])
    for k, op in enumerate(spec.ops):
        base = np.uint64((k + 1) << _OP_STRIDE)
        name = op[0]
        if name in _IMAGE_OPS:
            x = _image_op(x, op, seeds, base, _image_layout(name, row_shape))
        elif name == "mixup":
            x = _to_dtype(_mixup(x, sidx[sel], vw[sel], base_seed, op[1], k, row_reader, source_rows), dtype)
        elif name == "noise":
            d = int(np.prod(row_shape, dtype=np.int64))
            z = _normal(seeds[:, None], (base + np.arange(d, dtype=np.uint64))[None, :])
            x = _to_dtype(x.reshape(len(x), -1).astype(np.float64) + op[1] * z, dtype).reshape(x.shape)
        else:
            x = _to_dtype(_munge(x, sidx[sel], seeds, base, op[1], op[2], block_reader), dtype)
    out[sel] = x
    return out


def replay(source: Any, source_index: np.ndarray, view: np.ndarray, spec: AugmentSpec | None,
           base_seed: int) -> np.ndarray:
    """Rebuild the rows a transfer set was labelled with, from ``source`` (a :class:`transferset.inputs.sources.Source`)."""
    sidx = np.asarray(source_index, dtype=np.int64).reshape(-1)
    rows = source.read_rows(sidx)
    return render_views(rows, sidx, view, spec, base_seed,
                        block_reader=source.read if spec is not None and needs_block(spec) else None,
                        row_reader=source.read_rows, source_rows=source.rows)
