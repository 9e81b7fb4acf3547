"""Photo decode ceiling: decode + Resize/CenterCrop (and RandomResizedCrop views) with the same worker processes,
for each decoder, on the same files; plus how exact each decoder is against PIL's exact decode.

Legs (rows/s = rendered views per second, ``--workers`` processes each):
- ``pil``: the photo layer's exact path (DecodePool: decode once per file, render every view, pixels shipped
  back to the parent in order), the one labelling and replay use.
- ``pil_draft``: the same with JPEG draft mode (DCT-domain 1/2, 1/4, 1/8 downscale when the view allows).
- ``pil_decode`` / ``simplejpeg_decode``: decode only (JPEG files only, no orientation, no crop), same harness.
- ``torchvision_decode``: ``torchvision.io.decode_jpeg`` when torchvision imports; else the reason it does not.

Pipeline legs, side by side in the same run (``--no-pipeline`` skips them): the decode ceiling twice (a file's
views sharing one decode, as ``label`` renders them; one decode per view, as stage 2's replay of shuffled rows
must), ONNX Runtime alone on tensors in memory with ``--threads`` intra-op threads, ``label`` end to end with the
same workers and threads, and ``train-student`` replaying every view from the photos in ``--workers`` DataLoader
workers (two epochs; the second epoch's logged rate and the whole command's). On a machine with few cores, give
the decode workers and ONNX Runtime separate cores (``--workers 1 --threads 1`` on 2 cores): the ceilings are
then measured with the resources each stage has when the pipeline overlaps them.

With ``--parts-leg``: the folder labelled by 2 parts at once (``--part 1/2`` and ``2/2``, 1 decode worker and 1
ONNX Runtime thread each) against 1 process with 2 decode workers, both whole commands from start to end, and
whether the two folders hold the same bytes (bad files' rows are kept, so any process can label any shard).

Exactness (in the parent, on up to ``--exact-sample`` JPEGs): draft views against exact views, simplejpeg's
decoded pixels against PIL's (max and mean absolute difference, share of identical values).

    python scripts/bench_photos.py [--folder DIR | --count 300] [--workers 2] [--size 224] [--views 2] [--parts-leg] [--json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from transferset.inputs.decode import PhotoTransform, render_file  # noqa: E402
from transferset.inputs.render import PhotoTask  # noqa: E402
from transferset.labelling.photo_pool import DecodePool  # noqa: E402
from transferset.inputs.photos import open_photo_source  # noqa: E402


def _decode_pil(path: str) -> int:
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        return im.size[0]


def _decode_simplejpeg(path: str) -> int:
    import simplejpeg

    with open(path, "rb") as f:
        return simplejpeg.decode_jpeg(f.read(), colorspace="RGB").shape[1]


def _decode_torchvision(path: str) -> int:
    from torchvision.io import decode_jpeg, read_file

    return int(decode_jpeg(read_file(path)).shape[-1])


_LEGS = {"pil_decode": _decode_pil, "simplejpeg_decode": _decode_simplejpeg, "torchvision_decode": _decode_torchvision}


def _run_leg(name: str, paths: list[str]) -> int:
    fn = _LEGS[name]
    return sum(fn(p) > 0 for p in paths)


def _available(name: str) -> str | None:
    """None when the decoder imports, else the reason."""
    try:
        if name == "simplejpeg_decode":
            import simplejpeg  # noqa: F401
        elif name == "torchvision_decode":
            from torchvision.io import decode_jpeg  # noqa: F401
    except Exception as e:  # noqa: BLE001 - report any import failure as the reason
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return None


def _decode_only(ctx, name: str, paths: list[str], workers: int) -> float:
    chunks = [paths[i:i + 16] for i in range(0, len(paths), 16)]
    with ctx.Pool(workers) as pool:
        pool.starmap(_run_leg, [(name, paths[:2])] * workers)  # warm: imports happen before the clock
        t0 = time.perf_counter()
        done = sum(pool.starmap(_run_leg, [(name, c) for c in chunks]))
        dt = time.perf_counter() - t0
    return done / dt


def _views_leg(src, transform: PhotoTransform, workers: int, views: int, per_row: bool = False) -> tuple[float, int]:
    """Rendered views per second. File-major task order (``per_row=False``: a file's views share one decode, as
    ``label`` renders them) or view-major (``per_row=True``: one decode per view, as replay in stage 2 does, where
    rows arrive shuffled)."""
    if per_row:
        tasks = [PhotoTask(i, v, src.path_of(i)) for v in range(views) for i in range(src.rows)]
    else:
        tasks = [PhotoTask(i, v, src.path_of(i)) for i in range(src.rows) for v in range(views)]
    with DecodePool(transform, base_seed=1, workers=workers) as pool:
        list(pool.imap(tasks[: 4 * workers], 4 * workers))  # warm the workers
        t0 = time.perf_counter()
        rows = sum(len(b.source_index) for b in pool.imap(tasks, 64))
        dt = time.perf_counter() - t0
    return rows / dt, rows


def _diff(a: np.ndarray, b: np.ndarray) -> dict:
    d = np.abs(a.astype(np.int16) - b.astype(np.int16))
    return {"max_abs": int(d.max()), "mean_abs": round(float(d.mean()), 4), "identical": round(float((d == 0).mean()), 4)}


def _exactness(src, transform: PhotoTransform, jpegs: list[str], views: int) -> dict:
    from PIL import Image

    draft_t = PhotoTransform(**{**transform.to_json(), "scale": transform.scale, "ratio": transform.ratio,
                                "draft": True})
    exact, drafted, reduced = [], [], 0
    sj_a, pil_a = [], []
    for p in jpegs:
        for v in range(views):
            px, view = render_file(p, transform, base_seed=1, source_index=0, view_number=v)
            exact.append(px)
            drafted.append(render_file(p, draft_t, view)[0])
            reduced += int(draft_t._draft_scale(view) > 1)
        if _available("simplejpeg_decode") is None:
            import simplejpeg

            with Image.open(p) as im:
                if im.mode != "RGB":
                    continue
                pil_a.append(np.asarray(im.convert("RGB")).ravel())
            sj_a.append(simplejpeg.decode_jpeg(open(p, "rb").read(), colorspace="RGB").ravel())
    out = {"draft_vs_exact": {**_diff(np.stack(exact), np.stack(drafted)), "views": len(exact),
                              "views_reduced": reduced}}
    if sj_a:
        out["simplejpeg_vs_pil"] = {**_diff(np.concatenate(pil_a), np.concatenate(sj_a)), "files": len(sj_a)}
    return out


def _export_teacher(path: str, size: int, classes: int) -> str:
    """A small ONNX CNN teacher (two strided convolutions, global pool, linear) for ``size`` x ``size`` RGB."""
    import warnings

    import torch
    from torch import nn

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.ReLU(), nn.Conv2d(16, 32, 3, 2, 1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, classes)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.zeros(2, 3, size, size),), path, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "b"}, "y": {0: "b"}}, opset_version=17, dynamo=False)
    return path


def _ort_leg(teacher: str, size: int, rows: int, batch: int, threads: int) -> float:
    """ONNX Runtime alone on preprocessed tensors already in memory (the inference ceiling), ``threads`` intra-op
    threads as ``label`` gets them."""
    from transferset.labelling.ensemble import Ensemble
    from transferset.labelling.photo_label import photo_preprocess

    ens = Ensemble([teacher], device="cpu", threads=threads)
    ens.members[0].preprocess = photo_preprocess("imagenet", None, None, None, "nchw")
    x = np.random.default_rng(0).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    feeds = ens.feeds(x)
    ens.run(feeds)
    t0 = time.perf_counter()
    for _ in range(max(1, rows // batch)):
        ens.run(feeds)
    return max(1, rows // batch) * batch / (time.perf_counter() - t0)


def _label_leg(teacher: str, folder: str, out: str, a) -> tuple[float, int]:
    from transferset.labelling.pipeline import LabelOptions, label

    o = LabelOptions(augment=f"rrc:{a.size},flip", views=a.views - 1, norm="imagenet", batch_size=64,
                     decode_workers=a.workers, threads=a.threads, quiet=True, overwrite=True)
    r = label([teacher], folder, out, o)
    return r.rows_written / r.seconds, r.rows_written


def _train_leg(labelled: str, folder: str, out: str, a) -> tuple[float, float, int]:
    """train-student streaming, inputs replayed from the photos in DataLoader workers (a tiny MLP student), two
    epochs: (rows/s of the whole command, start-up included; rows/s of the second epoch as the run logs it; rows)."""
    from transferset.format import load_manifest
    from transferset.training.loop import TrainOptions, train_student

    rows = load_manifest(labelled)["stats"]["rows"]
    o = TrainOptions(student="mlp:16", epochs=2, batch_size=64, in_memory="no", num_workers=a.workers,
                     threads=a.threads, source=folder, quiet=True, device="cpu")
    t0 = time.perf_counter()
    train_student(labelled, out, o)
    whole = 2 * rows / (time.perf_counter() - t0)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        epoch2 = [json.loads(line) for line in f][-1]["samples_per_s"]
    return whole, epoch2, rows


def _digests(folder: str) -> dict:
    import hashlib

    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(folder).iterdir())
            if p.name.endswith((".h5", ".json"))}


def _parts_leg(teacher: str, folder: str, work: str, a) -> dict:
    """2 parts at once (1 decode worker, 1 thread each) against 1 process with 2 decode workers: whole commands."""
    base = [sys.executable, "-m", "transferset", "label", "--ensemble", teacher, "--data", folder, "--augment",
            f"rrc:{a.size},flip", "--views", str(a.views - 1), "--norm", "imagenet", "--batch-size", "64",
            "--shard-size", str(a.parts_shard_size), "-q"]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    one, parts = os.path.join(work, "one"), os.path.join(work, "parts")
    t0 = time.perf_counter()
    subprocess.run(base + ["--out", one, "--decode-workers", "2", "--threads", "1"], check=True, env=env)
    t_one = time.perf_counter() - t0
    t0 = time.perf_counter()
    procs = [subprocess.Popen(base + ["--out", parts, "--part", f"{i}/2", "--decode-workers", "1", "--threads", "1"],
                              env=env) for i in (1, 2)]
    if any(p.wait() != 0 for p in procs):
        raise SystemExit("a part failed")
    t_parts = time.perf_counter() - t0
    rows = json.loads(Path(one, "manifest.json").read_text())["stats"]["rows"]
    return {"rows": rows, "one_process_2_decode_workers_rows_per_s": round(rows / t_one, 1),
            "two_parts_1_decode_worker_rows_per_s": round(rows / t_parts, 1),
            "parts_vs_one": round(t_one / t_parts, 3), "identical": _digests(one) == _digests(parts),
            "load_average_after": [round(x, 2) for x in os.getloadavg()]}


def _pipeline_legs(folder: str, src, transform: PhotoTransform, a, res: dict) -> None:
    """The ceilings and the two stages end to end, side by side in one run."""
    with tempfile.TemporaryDirectory() as work:
        teacher = _export_teacher(os.path.join(work, "teacher.onnx"), a.size, len(src.class_names or [0]))
        ceiling, rows = _views_leg(src, transform, a.workers, a.views)
        per_row, _ = _views_leg(src, transform, a.workers, a.views, per_row=True)
        ort = _ort_leg(teacher, a.size, rows, 64, a.threads)
        lab, lab_rows = _label_leg(teacher, folder, os.path.join(work, "ts"), a)
        train, train_epoch2, train_rows = _train_leg(os.path.join(work, "ts"), folder, os.path.join(work, "run"), a)
    smaller = min(ceiling, ort)
    res["pipeline"] = {
        "decode_ceiling": round(ceiling, 1), "decode_ceiling_one_decode_per_row": round(per_row, 1),
        "ort_ceiling": round(ort, 1), "label": round(lab, 1),
        "label_rows": lab_rows, "label_vs_smaller_ceiling": round(lab / smaller, 3),
        "train_replay_whole_command": round(train, 1), "train_replay_epoch2": round(train_epoch2, 1),
        "train_rows": train_rows,
        "train_epoch2_vs_per_row_decode_ceiling": round(train_epoch2 / per_row, 3),
        "train_whole_vs_per_row_decode_ceiling": round(train / per_row, 3),
        "load_average_after": [round(x, 2) for x in os.getloadavg()]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--folder", help="a photo folder (default: make one with scripts/make_photo_folder.py)")
    ap.add_argument("--count", type=int, default=300, help="images to make when no --folder is given")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None,
                    help="ONNX Runtime intra-op threads for the ORT leg and label, torch threads for train-student "
                         "(default: the cores the decode workers leave, at least 1)")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--views", type=int, default=2, help="views per file for the view legs (view 0 is clean)")
    ap.add_argument("--exact-sample", type=int, default=40)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--no-pipeline", action="store_true", help="decode legs only (no teacher, label or training)")
    ap.add_argument("--no-decoders", action="store_true", help="skip the decoder comparison legs and exactness")
    ap.add_argument("--parts-leg", action="store_true", help="also: 2 parts at once against 1 process (see above)")
    ap.add_argument("--parts-shard-size", type=int, default=256, help="rows per shard in the parts leg")
    a = ap.parse_args(argv)
    if a.threads is None:
        a.threads = max(1, (os.cpu_count() or 2) - a.workers)
    tmp = None
    folder = a.folder
    if folder is None:
        tmp = tempfile.TemporaryDirectory()
        folder = os.path.join(tmp.name, "photos")
        subprocess.run([sys.executable, str(ROOT / "scripts" / "make_photo_folder.py"), folder, "--count",
                        str(a.count), "--workers", str(a.workers)], check=True, stdout=subprocess.DEVNULL)
    transform = PhotoTransform(a.size, rrc=True, flip=True)
    src = open_photo_source(folder, transform)
    jpegs = [src.path_of(i) for i in range(src.rows) if src.rel_paths[i].lower().endswith((".jpg", ".jpeg"))
             and "zz-" not in src.rel_paths[i]]
    ctx = mp.get_context("forkserver")
    res: dict = {"files": src.rows, "jpeg_files": len(jpegs), "workers": a.workers, "threads": a.threads, "size": a.size,
                 "views_per_file": a.views, "load_average": [round(x, 2) for x in os.getloadavg()], "legs": {}}
    for name, t in (() if a.no_decoders else
                    (("pil", transform), ("pil_draft", PhotoTransform(a.size, rrc=True, flip=True, draft=True)))):
        rate, rows = _views_leg(src, t, a.workers, a.views)
        res["legs"][name] = {"rows_per_s": round(rate, 1), "rows": rows, "what": "decode + clean/rrc views, ordered"}
    for name in () if a.no_decoders else _LEGS:
        why = _available(name)
        if why is not None:
            res["legs"][name] = {"rows_per_s": None, "unavailable": why}
            continue
        res["legs"][name] = {"rows_per_s": round(_decode_only(ctx, name, jpegs, a.workers), 1),
                             "rows": len(jpegs), "what": "JPEG decode only"}
    res["exactness"] = {} if a.no_decoders else _exactness(src, transform, jpegs[: a.exact_sample], a.views)
    if not a.no_pipeline:
        _pipeline_legs(folder, src, transform, a, res)
    if a.parts_leg:
        with tempfile.TemporaryDirectory() as work:
            teacher = _export_teacher(os.path.join(work, "teacher.onnx"), a.size, len(src.class_names or [0]))
            res["parts"] = _parts_leg(teacher, folder, work, a)
    if a.json:
        print(json.dumps(res))
    else:
        print(f"{res['files']} files ({res['jpeg_files']} JPEG), {a.workers} workers, size {a.size}, "
              f"{a.views} views/file, load average {res['load_average']}")
        print(f"{'leg':<20}{'rows/s':>10}  what")
        for name, leg in res["legs"].items():
            rate = "-" if leg["rows_per_s"] is None else f"{leg['rows_per_s']:.0f}"
            print(f"{name:<20}{rate:>10}  {leg.get('what') or leg.get('unavailable')}")
        for name, d in res["exactness"].items():
            print(f"{name}: {d}")
        for name, v in res.get("pipeline", {}).items():
            print(f"{name:<26}{v}")
        for name, v in res.get("parts", {}).items():
            print(f"parts: {name:<40}{v}")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
