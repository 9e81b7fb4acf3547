"""Photo decoding and torchvision-style views that replay bit for bit.

A photo view is a handful of small integers: ``View(kind, left, top, width, height, flip)``. The box is in source
pixels *after* the EXIF orientation is applied. Two kinds:

- ``CLEAN`` (view 0): ``Resize(resize)`` (shorter side, bilinear, PIL's antialias) then ``CenterCrop(size)``, the
  torchvision evaluation transform; the box is the whole image ``(0, 0, W, H)``, so a replay notices a changed file.
- ``RRC`` (views >= 1 with ``rrc``): ``RandomResizedCrop(size, scale, ratio)``: crop the box, resize to
  ``size x size`` (bilinear, antialias). The box is torchvision's ``get_params`` algorithm (10 tries, then the
  centre fallback) driven by counter-based uniforms that are a pure function of ``(seed, source index, view)``.

``flip`` (horizontal, p = 0.5) is applied last, as ``RandomHorizontalFlip`` after the crop. Rendering makes the same
PIL calls as torchvision's PIL path, so pixels are bit-identical to torchvision's for the same box and PIL version.

Decoding (:func:`decode_image`): EXIF orientation applied, first frame of animations, every mode converted to the
model's channels like ``img.convert("RGB")`` (torchvision's and timm's loaders) except 16- and 32-bit integer modes,
scaled ``round(v / 257)`` from 0..65535 (PIL's own convert clips them at 255), and float ``F``, taken as 0..1.
Alpha is dropped, not composited, as in those loaders. Any failure becomes :class:`BadImage` with a one-line reason.

JPEG draft mode (DCT-domain downscaling by 1/2, 1/4 or 1/8) is off by default: it changes pixels (see
scripts/bench_photos.py for the measured difference), though it is deterministic and recorded in the transform.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import numpy as np

from ..errors import FAILED, USAGE, TransferSetError, printable
from .augment import view_seed

__all__ = ["BadImage", "View", "PhotoTransform", "CLEAN", "RRC", "parse_photo_augment", "rrc_params", "flip_bit",
           "upright_size", "decode_image", "render_file", "render_views_of_file", "resized_shorter_size"]

CLEAN, RRC = 0, 1
_M64 = (1 << 64) - 1
_GAMMA, _C1, _C2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
#: Counter ranges of the photo draws (each view has its own SplitMix64 stream; see augment.view_seed).
_RRC_COUNTER, _FLIP_COUNTER = 1 << 48, (1 << 48) + 1024
_ORIENTATION = 0x0112
_SWAPS_AXES = (5, 6, 7, 8)
_INT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


class BadImage(TransferSetError):
    """A file that cannot be decoded; ``reason`` is one line, ``path`` the file."""

    def __init__(self, path: Any, reason: str) -> None:
        self.path, self.reason = str(path), " ".join(str(reason).split())
        super().__init__(f"image {printable(self.path)}: {printable(self.reason)}; replace or remove the file, "
                         "or let bad images be skipped", USAGE)


class View(NamedTuple):
    """One photo view: the kind, the box in upright source pixels, and the horizontal flip bit."""

    kind: int
    left: int
    top: int
    width: int
    height: int
    flip: int

    @property
    def box(self) -> tuple[int, int, int, int]:
        """``(left, top, width, height)``: what a shard stores per row beside ``flip``."""
        return self.left, self.top, self.width, self.height


# -- counter-based randomness (same SplitMix64 construction as augment.py, on Python ints) --------------------
def _mix64(z: int) -> int:
    z = ((z ^ (z >> 30)) * _C1) & _M64
    z = ((z ^ (z >> 27)) * _C2) & _M64
    return z ^ (z >> 31)


def _uniform(seed: int, counter: int) -> float:
    return (_mix64((seed + (counter + 1) * _GAMMA) & _M64) >> 11) * (1.0 / (1 << 53))


def _seed(base_seed: int, source_index: int, view: int) -> int:
    return int(view_seed(int(base_seed), int(source_index), int(view)))


def rrc_params(base_seed: int, source_index: int, view: int, width: int, height: int,
               scale: tuple[float, float] = (0.08, 1.0),
               ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """RandomResizedCrop box ``(left, top, width, height)`` for an upright ``width x height`` image.

    torchvision's ``RandomResizedCrop.get_params``: up to 10 tries of area fraction ~ U(scale) and log aspect ratio
    ~ U(log ratio); the first box that fits is placed uniformly (top, then left); else the centre fallback. The
    uniforms are consumed in torchvision's order from the view's counter stream, in float64; ``randint(0, n)``
    is ``floor(u * n)``.
    """
    seed = _seed(base_seed, source_index, view)
    counter = iter(range(_RRC_COUNTER, _RRC_COUNTER + 40))
    u = lambda a, b: a + (b - a) * _uniform(seed, next(counter))  # noqa: E731
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * u(scale[0], scale[1])
        aspect = math.exp(u(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(u(0.0, 1.0) * (height - h + 1))
            left = int(u(0.0, 1.0) * (width - w + 1))
            return left, top, w, h
    in_ratio = float(width) / float(height)
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def flip_bit(base_seed: int, source_index: int, view: int) -> int:
    """1 with probability 0.5: the horizontal flip of a view (view 0 is never flipped by the transform)."""
    return int(_uniform(_seed(base_seed, source_index, view), _FLIP_COUNTER) < 0.5)


def resized_shorter_size(width: int, height: int, size: int) -> tuple[int, int]:
    """torchvision ``Resize(size)``: the shorter side becomes ``size``, the longer ``int(size * long / short)``."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    return (new_short, new_long) if width <= height else (new_long, new_short)


def _centre_offset(dim: int, crop: int) -> int:
    # torchvision pads (crop - dim) // 2 on the leading side when the crop is larger; PIL's crop fills with 0
    return -((crop - dim) // 2) if crop > dim else int(round((dim - crop) / 2.0))


#: the largest crop or resize side a transform takes: a 32,768-pixel square is already 3 GB of RGB (a manifest's
#: transform is untrusted, and a side of 1e308 or 10^12 must be refused, not rendered)
MAX_SIDE = 1 << 15


def _positive(name: str, v: Any) -> int:
    try:
        n = int(v)
    except (TypeError, ValueError, OverflowError):
        raise TransferSetError(f"must be a positive integer, got {printable(v)!s:.40}", option=name) from None
    if n < 1 or n != v or n > MAX_SIDE:
        raise TransferSetError(f"must be a positive integer up to {MAX_SIDE}, got {printable(v)!s:.40}", option=name)
    return n


def parse_photo_augment(spec: str | None) -> dict[str, Any]:
    """Parse ``rrc:SIZE[:SMIN:SMAX[:RMIN:RMAX]]`` and/or ``flip`` (comma-separated) into keyword arguments of
    :class:`PhotoTransform` (``rrc_size``, ``scale``, ``ratio``, ``flip``)."""
    out: dict[str, Any] = {}
    if spec is None or not str(spec).strip() or str(spec).strip().lower() == "none":
        return out
    for item in str(spec).split(","):
        parts = [p.strip() for p in item.strip().split(":")]
        name, args = parts[0].lower(), parts[1:]
        if name == "flip" and not args:
            out["flip"] = True
        elif name == "rrc" and len(args) in (1, 3, 5):
            try:
                nums = [float(a) for a in args[1:]]
            except ValueError:
                raise TransferSetError(f"{item!r}: scale and ratio must be numbers", option="augment") from None
            if not args[0].isdigit() or int(args[0]) < 1:
                raise TransferSetError(f"{item!r}: SIZE must be a positive integer", option="augment")
            out["rrc_size"] = int(args[0])
            if len(nums) >= 2:
                out["scale"] = (nums[0], nums[1])
            if len(nums) == 4:
                out["ratio"] = (nums[2], nums[3])
        else:
            raise TransferSetError(f"{item!r}: photo sources take rrc:SIZE[:SMIN:SMAX[:RMIN:RMAX]] and flip "
                                   "(comma-separated, e.g. rrc:224,flip)", option="augment")
    return out


@dataclass(frozen=True)
class PhotoTransform:
    """How a photo becomes a ``size x size x channels`` uint8 row (see the module docstring).

    Attributes:
        size: output side; the clean view's centre crop and the RandomResizedCrop size.
        resize: the clean view's shorter side (default ``floor(size / 0.875)``, timm's crop_pct, 224 -> 256).
        rrc: views >= 1 are RandomResizedCrops (else they are clean views, flipped when ``flip``).
        scale, ratio: RandomResizedCrop's ranges (torchvision's defaults).
        flip: views >= 1 are flipped horizontally with probability 0.5.
        channels: 3 (RGB) or 1 (L).
        draft: decode JPEGs at 1/2, 1/4 or 1/8 scale when the output still has at least ``size`` pixels a side.
    """

    size: int
    resize: int | None = None
    rrc: bool = False
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = False
    channels: int = 3
    draft: bool = False

    def __post_init__(self) -> None:
        _positive("crop", self.size)
        if self.resize is None:
            object.__setattr__(self, "resize", int(math.floor(self.size / 0.875)))
        _positive("resize", self.resize)
        if self.channels not in (1, 3):
            raise TransferSetError(f"photos decode to 1 (L) or 3 (RGB) channels, not {self.channels}",
                                   option="channels")
        for name, (a, b) in (("scale", self.scale), ("ratio", self.ratio)):
            if not (0 < a <= b and math.isfinite(b)):
                raise TransferSetError(f"rrc {name} must be 0 < MIN <= MAX, got ({a}, {b})", option="augment")
        object.__setattr__(self, "scale", (float(self.scale[0]), float(self.scale[1])))
        object.__setattr__(self, "ratio", (float(self.ratio[0]), float(self.ratio[1])))

    @classmethod
    def from_options(cls, crop: int | None = None, resize: int | None = None, augment: str | None = None,
                     channels: int = 3, draft: bool = False) -> "PhotoTransform":
        """The transform for ``crop``, ``resize`` and a photo ``augment`` spec; the crop defaults to the rrc size."""
        aug = parse_photo_augment(augment)
        size = aug.pop("rrc_size", None)
        rrc = size is not None
        if crop is not None and size is not None and int(crop) != size:
            raise TransferSetError(f"{crop} differs from the rrc size {size}; every view must have the teacher's "
                                   "input size", option="crop")
        size = crop if crop is not None else size
        if size is None:
            raise TransferSetError("is needed for photos (the side of the square the teacher sees)", option="crop")
        return cls(size=int(size), resize=resize, rrc=rrc, channels=channels, draft=draft, **aug)

    @property
    def row_shape(self) -> tuple[int, int, int]:
        return (self.size, self.size, self.channels)

    def to_json(self) -> dict[str, Any]:
        """JSON-safe description for the manifest; ``PhotoTransform.from_json`` gives it back."""
        d = asdict(self)
        d["scale"], d["ratio"] = list(self.scale), list(self.ratio)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "PhotoTransform":
        known = {k: d[k] for k in ("size", "resize", "rrc", "scale", "ratio", "flip", "channels", "draft") if k in d}
        for k in ("scale", "ratio"):
            if k in known:
                known[k] = tuple(known[k])
        return cls(**known)

    def kind_of(self, view: int) -> int:
        """The kind of view number ``view``: CLEAN for view 0 or without rrc, else RRC."""
        return RRC if (view != 0 and self.rrc) else CLEAN

    def view_for(self, base_seed: int, source_index: int, view: int, width: int, height: int) -> View:
        """The view's parameters: a pure function of (seed, source index, view, upright image size)."""
        flip = flip_bit(base_seed, source_index, view) if (self.flip and view != 0) else 0
        if self.kind_of(view) == RRC:
            return View(RRC, *rrc_params(base_seed, source_index, view, width, height, self.scale, self.ratio), flip)
        return View(CLEAN, 0, 0, int(width), int(height), flip)

    def stored_view(self, view: int, box: Any, flip: Any) -> View:
        """The :class:`View` of a stored row (view number, ``box`` = 4 ints, ``flip``)."""
        left, top, w, h = (int(v) for v in box)
        return View(self.kind_of(int(view)), left, top, w, h, int(flip))

    # -- rendering ---------------------------------------------------------------------------------------
    def _draft_scale(self, view: View) -> int:
        need = self.size if view.kind == RRC else self.resize
        short = min(view.width, view.height)
        for s in (8, 4, 2):
            if short // s >= need:
                return s
        return 1

    def render(self, image: Any, view: View, reduced: float = 1.0) -> np.ndarray:
        """``size x size x channels`` uint8 pixels of ``view`` from a decoded upright image (:func:`decode_image`).

        ``reduced`` is the JPEG draft factor the image was decoded at (1 for an exact decode).
        """
        from PIL import Image

        full = (round(image.size[0] * reduced), round(image.size[1] * reduced)) if reduced != 1 else image.size
        if view.kind == CLEAN and reduced == 1 and (view.width, view.height) != image.size:
            raise TransferSetError(f"the image is {image.size[0]}x{image.size[1]} but was {view.width}x{view.height} "
                                   "when the view was drawn; the source changed since labelling", FAILED)
        if view.kind == RRC and (view.left < 0 or view.top < 0 or view.width < 1 or view.height < 1
                                 or (reduced == 1 and (view.left + view.width > full[0]
                                                       or view.top + view.height > full[1]))):
            raise TransferSetError(f"crop box {view.box} lies outside the {full[0]}x{full[1]} image; "
                                   "the source changed since labelling", FAILED)
        if view.kind == RRC:
            l, t, r, b = view.left, view.top, view.left + view.width, view.top + view.height
            if reduced == 1:
                out = image.crop((l, t, r, b)).resize((self.size, self.size), Image.BILINEAR)
            else:
                out = image.resize((self.size, self.size), Image.BILINEAR,
                                   box=(l / reduced, t / reduced, r / reduced, b / reduced))
        else:
            w, h = resized_shorter_size(view.width, view.height, self.resize)
            if reduced != 1:
                image = image.resize((w, h), Image.BILINEAR, box=(0, 0, view.width / reduced, view.height / reduced))
            elif (w, h) != image.size:
                image = image.resize((w, h), Image.BILINEAR)
            x0, y0 = _centre_offset(w, self.size), _centre_offset(h, self.size)
            out = image.crop((x0, y0, x0 + self.size, y0 + self.size))
        arr = np.asarray(out, dtype=np.uint8).reshape(self.size, self.size, self.channels)
        return np.ascontiguousarray(arr[:, ::-1] if view.flip else arr)


# -- decoding ------------------------------------------------------------------------------------------------
def _open(path: Any):
    from PIL import Image

    try:
        return Image.open(path)
    except Exception as e:  # PIL plugins raise many types on bad data: all are the file's fault
        raise BadImage(path, _reason(e)) from None


def _reason(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    return text if type(e).__name__ in ("UnidentifiedImageError", "DecompressionBombError") else \
        f"{type(e).__name__}: {text}"


def _orientation(im: Any) -> int:
    try:
        return int(im.getexif().get(_ORIENTATION, 1) or 1)
    except Exception:
        return 1


def upright_size(path: Any) -> tuple[int, int]:
    """``(width, height)`` after the EXIF orientation, from the header alone (no pixels decoded)."""
    with _open(path) as im:
        w, h = im.size
        return (h, w) if _orientation(im) in _SWAPS_AXES else (w, h)


def _to_channels(im: Any, channels: int) -> Any:
    from PIL import Image

    if im.mode in _INT_MODES:
        a = np.clip(np.asarray(im).astype(np.int64), 0, 65535)
        im = Image.fromarray(((a + 128) // 257).astype(np.uint8), "L")
    elif im.mode == "F":
        a = np.nan_to_num(np.asarray(im, dtype=np.float64), nan=0.0, posinf=1.0, neginf=0.0)
        im = Image.fromarray(np.rint(np.clip(a, 0.0, 1.0) * 255.0).astype(np.uint8), "L")
    elif im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")  # the palette's colours, without PIL's warning about byte transparency
    target = "RGB" if channels == 3 else "L"
    return im if im.mode == target else im.convert(target)


def decode_image(path: Any, channels: int = 3, draft_scale: int = 1) -> tuple[Any, float]:
    """Decode ``path`` upright into a PIL image of mode RGB (``channels=3``) or L (1).

    Returns ``(image, reduced)``: ``reduced`` is the JPEG draft factor actually used (1.0 for an exact decode;
    only JPEGs with ``draft_scale > 1`` are reduced). Raises :class:`BadImage` for any unreadable file.
    """
    return _decode_opened(_open(path), path, channels, draft_scale)


def _decode_opened(im: Any, path: Any, channels: int, draft_scale: int) -> tuple[Any, float]:
    from PIL import ImageOps

    try:
        reduced = 1.0
        if draft_scale > 1 and im.format == "JPEG":
            w, h = im.size
            got = im.draft(im.mode, (-(-w // draft_scale), -(-h // draft_scale)))
            if got is not None and got[1][2]:
                reduced = w / got[1][2]
        im.seek(0)
        im.load()
        upright = ImageOps.exif_transpose(im)
        return _to_channels(upright, channels), reduced
    except BadImage:
        raise
    except Exception as e:  # truncated data, bad EXIF, bad palette...: the file's fault, one line
        raise BadImage(path, _reason(e)) from None
    finally:
        im.close()


def render_views_of_file(path: Any, transform: PhotoTransform, views: list[tuple[int, View | None]],
                         base_seed: int = 0, source_index: int = 0) -> list[tuple[np.ndarray, View]]:
    """Decode ``path`` once and render several views of it: ``views`` holds ``(view number, stored View or None)``
    (None: draw the view from ``base_seed``); returns ``[(pixels [size, size, channels] uint8, view), ...]``.

    The upright size comes from the header, so views are drawn before the pixels are decoded.
    """
    im = _open(path)
    try:
        w, h = im.size
        if _orientation(im) in _SWAPS_AXES:
            w, h = h, w
        drawn = [v if v is not None else transform.view_for(base_seed, source_index, n, w, h) for n, v in views]
    except BaseException:
        im.close()
        raise
    scale = min(transform._draft_scale(v) for v in drawn) if transform.draft else 1
    image, reduced = _decode_opened(im, path, transform.channels, scale)
    try:
        return [(transform.render(image, v, reduced), v) for v in drawn]
    except TransferSetError as e:
        raise TransferSetError(f"image {printable(path)}: {e.message}", e.exit_code) from None


def render_file(path: Any, transform: PhotoTransform, view: View | None = None, *, base_seed: int = 0,
                source_index: int = 0, view_number: int = 0) -> tuple[np.ndarray, View]:
    """Decode ``path`` and render one view; returns ``(pixels [size, size, channels] uint8, view)``.

    Give ``view`` to replay a stored view, or leave it None to draw view ``view_number`` of ``source_index``
    from ``base_seed``.
    """
    return render_views_of_file(path, transform, [(view_number, view)], base_seed, source_index)[0]
