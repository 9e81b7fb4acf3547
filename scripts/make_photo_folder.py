"""Write a realistic photo folder with numpy and PIL (no download), one sub-folder per class.

Each image is 200-640 px a side (width and height drawn apart), a noisy two-colour gradient background with
clutter, and one class object: the class fixes the shape (disc, square, triangle, cross, ring, stripes, ...)
and the hue of its colour (jittered), position, size and rotation are random, so a small CNN can learn it.
Mix: about 84% JPEG (quality 70-95), 8% PNG, 6% WebP, ~1% grayscale JPEG, and a few CMYK JPEGs, 16-bit
grayscale PNGs, palette PNGs with transparency, RGBA PNGs, GIFs, BMPs, TIFFs and EXIF-rotated JPEGs (stored
rotated, with the Orientation tag that turns them upright), plus five corrupt or truncated files.
The first 13 images cover every kind, so a tiny folder (``--count 60``) has them all.
Every image is a pure function of (seed, image number): the same command writes the same bytes.

    python scripts/make_photo_folder.py OUT [--count 20000] [--classes 6] [--seed 0] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SHAPES = ("disc", "square", "triangle", "cross", "ring", "stripes", "star", "diamond", "bars", "dots")
HUES = (0.0, 0.58, 0.33, 0.12, 0.8, 0.47, 0.07, 0.66, 0.9, 0.25)
CORRUPT = ("truncated.jpg", "truncated.png", "garbage.jpg", "empty.png", "text.webp")


def _hsv(h: float, s: float, v: float) -> tuple[int, int, int]:
    i, f = int(h * 6) % 6, h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    r, g, b = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]
    return int(r * 255), int(g * 255), int(b * 255)


def _background(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    c0, c1 = rng.uniform(30, 225, 3), rng.uniform(30, 225, 3)
    t = np.linspace(0, 1, w)[None, :, None] if rng.random() < 0.5 else np.linspace(0, 1, h)[:, None, None]
    img = c0 * (1 - t) + c1 * t + rng.normal(0, 12, (h, w, 3))
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


def _polygon(cx: float, cy: float, r: float, n: int, rot: float, inner: float = 1.0) -> list[tuple[float, float]]:
    pts = []
    for k in range(n * (2 if inner != 1.0 else 1)):
        rr = r if (inner == 1.0 or k % 2 == 0) else r * inner
        a = rot + k * math.pi / (n if inner != 1.0 else n / 2)
        pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
    return pts


def _draw_object(d: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, rot: float, col) -> None:
    if shape == "disc":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=col)
    elif shape == "ring":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], outline=col, width=max(3, int(r / 4)))
    elif shape == "square":
        d.polygon(_polygon(cx, cy, r, 4, rot), fill=col)
    elif shape == "diamond":
        d.polygon(_polygon(cx, cy, r, 4, math.pi / 4), fill=col)
    elif shape == "triangle":
        d.polygon(_polygon(cx, cy, r, 3, rot), fill=col)
    elif shape == "star":
        d.polygon(_polygon(cx, cy, r, 5, rot, inner=0.45), fill=col)
    elif shape == "cross":
        w = r / 3
        d.rectangle([cx - r, cy - w, cx + r, cy + w], fill=col)
        d.rectangle([cx - w, cy - r, cx + w, cy + r], fill=col)
    elif shape == "stripes":
        for k in range(-2, 3):
            d.line([cx - r, cy + k * r / 2.5 - r / 3, cx + r, cy + k * r / 2.5 + r / 3], fill=col, width=max(2, int(r / 8)))
    elif shape == "bars":
        for k in range(-2, 3):
            d.rectangle([cx + k * r / 2.5 - r / 10, cy - r, cx + k * r / 2.5 + r / 10, cy + r], fill=col)
    else:  # dots
        for k in range(7):
            a = rot + k * 2 * math.pi / 7
            x, y, rr = cx + 0.7 * r * math.cos(a), cy + 0.7 * r * math.sin(a), r / 5
            d.ellipse([x - rr, y - rr, x + rr, y + rr], fill=col)


def make_image(seed: int, i: int, cls: int) -> Image.Image:
    """The RGB image ``i`` of class ``cls``: a pure function of (seed, i, cls)."""
    rng = np.random.default_rng([seed, i])
    w, h = (int(v) for v in rng.integers(200, 641, 2))
    img = _background(rng, w, h)
    d = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(2, 6))):  # clutter: small grey blobs of no class
        x, y, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(5, 25)
        g = int(rng.integers(40, 220))
        d.ellipse([x - r, y - r, x + r, y + r], fill=(g, g, g))
    r = rng.uniform(0.15, 0.35) * min(w, h)
    cx, cy = rng.uniform(r, w - r), rng.uniform(r, h - r)
    col = _hsv((HUES[cls % len(HUES)] + rng.normal(0, 0.04)) % 1.0, rng.uniform(0.55, 1.0), rng.uniform(0.6, 1.0))
    _draw_object(d, SHAPES[cls % len(SHAPES)], cx, cy, r, rng.uniform(0, 2 * math.pi), col)
    return img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0, 1.2))))


_FIRST_KINDS = ("gray", "cmyk", "png16", "exif", "palette", "rgba", "gif", "bmp", "tiff", "png", "webp", "exif",
                "exif")


def _kind(u: float) -> str:
    for kind, edge in (("gray", 0.010), ("cmyk", 0.014), ("png16", 0.018), ("exif", 0.026), ("palette", 0.029),
                       ("rgba", 0.032), ("gif", 0.034), ("bmp", 0.036), ("tiff", 0.038), ("png", 0.118),
                       ("webp", 0.178)):
        if u < edge:
            return kind
    return "jpeg"


def write_one(args: tuple[int, int, int, str]) -> tuple[str, str]:
    seed, i, cls, out = args
    rng = np.random.default_rng([seed, i, 1])
    kind = _kind(float(rng.random()))
    if i < len(_FIRST_KINDS):  # every kind appears even in a tiny folder
        kind = _FIRST_KINDS[i]
    img = make_image(seed, i, cls)
    stem = os.path.join(out, f"{i:06d}")
    q = int(rng.integers(70, 96))
    if kind == "gray":
        path = stem + ".jpg"; img.convert("L").save(path, quality=q)
    elif kind == "cmyk":
        path = stem + ".jpg"; img.convert("CMYK").save(path, quality=q)
    elif kind == "png16":
        a = np.asarray(img.convert("L"), np.uint16) * 257 + rng.integers(0, 257, img.size[::-1]).astype(np.uint16)
        path = stem + ".png"; Image.fromarray(a).save(path)
    elif kind == "exif":
        orient = int(rng.choice([3, 6, 8]))
        stored = img.transpose({3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_90,
                                8: Image.Transpose.ROTATE_270}[orient])
        exif = Image.Exif()
        exif[0x0112] = orient
        path = stem + ".jpg"; stored.save(path, quality=q, exif=exif.tobytes())
    elif kind == "palette":
        p = img.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
        path = stem + ".png"; p.save(path, transparency=0)
    elif kind == "rgba":
        rgba = img.convert("RGBA"); rgba.putalpha(200)
        path = stem + ".png"; rgba.save(path)
    elif kind in ("gif", "bmp", "tiff", "png", "webp"):
        path = stem + {"gif": ".gif", "bmp": ".bmp", "tiff": ".tif", "png": ".png", "webp": ".webp"}[kind]
        img.save(path, **({"quality": q} if kind == "webp" else {}))
    else:
        path = stem + ".jpg"; img.save(path, quality=q)
    return path, kind


def write_corrupt(out_dirs: list[str], seed: int) -> list[str]:
    """Five bad files: truncated JPEG and PNG, random bytes, an empty file, text named .webp."""
    rng = np.random.default_rng([seed, 999_999])
    img = make_image(seed, 10 ** 7, 0)
    paths = []
    for k, name in enumerate(CORRUPT):
        path = os.path.join(out_dirs[k % len(out_dirs)], "zz-" + name)
        if name == "truncated.jpg":
            img.save(path, quality=90); data = open(path, "rb").read(); open(path, "wb").write(data[: len(data) * 2 // 5])
        elif name == "truncated.png":
            img.save(path); data = open(path, "rb").read(); open(path, "wb").write(data[: len(data) // 2])
        elif name == "garbage.jpg":
            open(path, "wb").write(b"\xff\xd8\xff\xe0" + rng.integers(0, 256, 5000, dtype=np.uint8).tobytes())
        elif name == "empty.png":
            open(path, "wb").close()
        else:
            open(path, "w").write("this is not an image\n")
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out")
    ap.add_argument("--count", type=int, default=20000, help="good images (five corrupt files come on top)")
    ap.add_argument("--classes", type=int, default=6, help=f"classes, at most {len(SHAPES)}")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=2)
    a = ap.parse_args(argv)
    if not 2 <= a.classes <= len(SHAPES) or a.count < a.classes:
        ap.error(f"need 2..{len(SHAPES)} classes and at least one image per class")
    out = Path(a.out)
    dirs = [str(out / f"{k}-{SHAPES[k]}") for k in range(a.classes)]
    for d in dirs:
        os.makedirs(d, exist_ok=True)
    jobs = [(a.seed, i, i % a.classes, dirs[i % a.classes]) for i in range(a.count)]
    t0 = time.time()
    if a.workers > 1:
        with get_context("spawn").Pool(a.workers) as pool:
            done = pool.map(write_one, jobs, chunksize=64)
    else:
        done = [write_one(j) for j in jobs]
    bad = write_corrupt(dirs, a.seed)
    kinds: dict[str, int] = {}
    for _, k in done:
        kinds[k] = kinds.get(k, 0) + 1
    summary = {"out": str(out), "images": len(done), "corrupt": [os.path.relpath(p, out) for p in bad],
               "kinds": dict(sorted(kinds.items())), "classes": [os.path.basename(d) for d in dirs],
               "seconds": round(time.time() - t0, 1)}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
