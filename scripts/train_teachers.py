"""Train the teachers shipped in data/teachers/, once, and record how.

Two kinds, both taking uint8 [N, 28, 28] MNIST images and exporting to ONNX with a dynamic batch:

* ``cnn``: the demo's ensemble. conv5x5(32)-BN-pool-conv5x5(64)-BN-pool-fc(256)-dropout-fc(10), trained with
  random affine distortions (rotation, scale, shear, +-2 px shifts) and mild elastic distortions.
* ``mlp``: the paper's big net, 784-1200-1200-10 with dropout 0.5 on hidden units and 0.2 on inputs
  (Hinton et al. 2015, section 3), trained long on jittered and distorted inputs.

Each run writes ``<name>.onnx`` and merges an entry into ``data/teachers/teachers.json``: the file's sha256,
the command line, the seed, the architecture, the parameter count, the wall time and a log of test errors every
few epochs (the test set is only watched, never used to choose anything: the last epoch's weights are shipped).

    python scripts/train_teachers.py --kind cnn --members 3 --epochs 15 --threads 1
    python scripts/train_teachers.py --kind mlp --epochs 100 --threads 1
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from transferset.demo import MlpTeacher, export_teacher, mnist_paths  # noqa: E402
from transferset.inputs.sources import open_source, read_labels  # noqa: E402


class CnnBnTeacher(nn.Module):
    """conv5x5(32)-BN-pool -> conv5x5(64)-BN-pool -> fc(256) -> dropout -> fc(10); uint8 [N, 28, 28] in.

    The demo's CNN with batch norm: unpadded convolutions (28 -> 24 -> 12 -> 8 -> 4) keep it at about 3.7M
    multiply-adds a row, so labelling 240,000 rows with three of them takes about a minute on 2 CPU cores.
    """

    def __init__(self, dropout: float = 0.4) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 32, 5), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(32, 64, 5), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(64 * 4 * 4, 256), nn.ReLU(), nn.Dropout(dropout),
                                  nn.Linear(256, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x.float().div(255.0).unsqueeze(1)))


def distort(x: torch.Tensor, gen: torch.Generator, *, rotate: float, scale: float, shear: float, shift: float,
            elastic_alpha: float, elastic_sigma: float) -> torch.Tensor:
    """Random affine + elastic distortion (Simard et al. 2003) of float images [B, 28, 28] in 0..255."""
    b = x.shape[0]
    u = lambda lo, hi: torch.rand(b, generator=gen) * (hi - lo) + lo  # noqa: E731
    ang = u(-rotate, rotate) * math.pi / 180
    sc = u(1 - scale, 1 + scale)
    sh = u(-shear, shear)
    tx, ty = u(-shift, shift) * 2 / 27, u(-shift, shift) * 2 / 27
    cos, sin = torch.cos(ang) / sc, torch.sin(ang) / sc
    theta = torch.stack([torch.stack([cos, -sin + sh, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    grid = F.affine_grid(theta, (b, 1, 28, 28), align_corners=True)
    if elastic_alpha > 0:
        k = int(4 * elastic_sigma) | 1
        r = torch.arange(k, dtype=torch.float32) - k // 2
        g = torch.exp(-r ** 2 / (2 * elastic_sigma ** 2))
        g = g / g.sum()
        d = torch.rand(b * 2, 1, 28, 28, generator=gen) * 2 - 1
        d = F.conv2d(F.pad(d, (k // 2, k // 2, 0, 0), mode="reflect"), g.view(1, 1, 1, k))
        d = F.conv2d(F.pad(d, (0, 0, k // 2, k // 2), mode="reflect"), g.view(1, 1, k, 1))
        d = d.view(b, 2, 28, 28).permute(0, 2, 3, 1)
        d = d / d.abs().amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6)  # unit peak, then alpha pixels
        grid = grid + d * (elastic_alpha * 2 / 27)
    return F.grid_sample(x.unsqueeze(1), grid, align_corners=True, padding_mode="zeros").squeeze(1)


def test_errors(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(x[i:i + 2000]).argmax(1) for i in range(0, len(x), 2000)])
    model.train()
    return int((pred != y).sum())


def train(kind: str, seed: int, args, x: torch.Tensor, y: torch.Tensor, xt: torch.Tensor, yt: torch.Tensor):
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = CnnBnTeacher() if kind == "cnn" else MlpTeacher()
    steps_per_epoch = -(-len(x) // args.batch_size)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.epochs * steps_per_epoch)
    log = []
    t0 = time.perf_counter()
    model.train()
    for epoch in range(1, args.epochs + 1):
        order = torch.randperm(len(x), generator=gen)
        total = 0.0
        for s in range(0, len(x), args.batch_size):
            idx = order[s:s + args.batch_size]
            xb = distort(x[idx], gen, rotate=args.rotate, scale=args.scale, shear=args.shear, shift=args.shift,
                         elastic_alpha=args.elastic_alpha, elastic_sigma=args.elastic_sigma) * 255.0
            loss = F.cross_entropy(model(xb), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        if epoch % args.log_every == 0 or epoch == args.epochs:
            e = test_errors(model, xt, yt)
            entry = {"epoch": epoch, "train_loss": round(total / len(x), 5), "test_errors": e,
                     "seconds": round(time.perf_counter() - t0, 1)}
            log.append(entry)
            print(f"{kind} seed {seed}: {json.dumps(entry)}", flush=True)
    return model.eval(), log, time.perf_counter() - t0


def _merge_index(index_path: Path, name: str, entry: dict) -> None:
    """Add one teacher to teachers.json under a lock (members may be trained by parallel processes)."""
    import fcntl

    with open(index_path.with_name(".teachers.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        index = json.loads(index_path.read_text()) if index_path.exists() else {"teachers": {}}
        index["teachers"][name] = entry
        tmp = index_path.with_name(".teachers.json.tmp")
        tmp.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, index_path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kind", choices=["cnn", "mlp"], required=True)
    ap.add_argument("--members", type=int, default=1)
    ap.add_argument("--first-seed", type=int, default=None)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--rotate", type=float, default=10.0, help="degrees")
    ap.add_argument("--scale", type=float, default=0.1)
    ap.add_argument("--shear", type=float, default=0.1)
    ap.add_argument("--shift", type=float, default=2.0, help="pixels")
    ap.add_argument("--elastic-alpha", type=float, default=None, help="peak elastic displacement in pixels")
    ap.add_argument("--elastic-sigma", type=float, default=4.0)
    ap.add_argument("--log-every", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "data" / "teachers"))
    args = ap.parse_args(argv)
    if args.lr is None:
        args.lr = 2e-3 if args.kind == "cnn" else 1e-3
    if args.elastic_alpha is None:
        args.elastic_alpha = 1.5 if args.kind == "cnn" else 2.0
    if args.first_seed is None:
        args.first_seed = 1000 if args.kind == "cnn" else 2000
    if args.threads:
        torch.set_num_threads(args.threads)
    paths = mnist_paths()
    src, test = open_source(paths["train_x"]), open_source(paths["test_x"])
    x = torch.from_numpy(src.read(0, src.rows).astype(np.float32) / 255.0)
    y = torch.from_numpy(read_labels(paths["train_y"], rows=src.rows).astype(np.int64))
    xt = torch.from_numpy(test.read(0, test.rows))
    yt = torch.from_numpy(read_labels(paths["test_y"], rows=test.rows).astype(np.int64))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for m in range(args.members):
        seed = args.first_seed + m
        name = f"{args.kind}-{seed - 1000}" if args.kind == "cnn" else "mlp-1200-1200"
        model, log, secs = train(args.kind, seed, args, x, y, xt, yt)
        f = out / f"{name}.onnx"
        export_teacher(model, f)
        entry = {
            "file": f.name, "sha256": hashlib.sha256(f.read_bytes()).hexdigest(), "kind": args.kind,
            "architecture": model.__class__.__name__ + ": " + (model.__class__.__doc__ or "").strip().splitlines()[0],
            "parameters": sum(p.numel() for p in model.parameters()), "seed": seed,
            "command": "python scripts/train_teachers.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "options": {k: v for k, v in vars(args).items() if k not in ("out",)},
            "test_errors": log[-1]["test_errors"], "train_seconds": round(secs, 1), "log": log,
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
                       f"{torch.get_num_threads()} threads",
        }
        _merge_index(out / "teachers.json", name, entry)
        print(f"{name}: {entry['test_errors']} test errors, {secs:.0f} s -> {f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
