"""Shared set-up of the benchmark scripts: the teachers, the rows, the machine line (never imported by the package)."""

from __future__ import annotations

import os
import platform
import sys
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a clone: import this checkout's transferset, not an installed one
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

MNIST_TRAIN = ROOT / "data" / "mnist" / "train-images.idx3-ubyte.gz"


class MLP(nn.Module):
    """The teacher of the benchmarks: 784-1200-1200-10 on uint8-scaled float input [N, 784]."""

    def __init__(self, widths=(1200, 1200), d_in: int = 784, classes: int = 10) -> None:
        super().__init__()
        layers, w = [], d_in
        for h in widths:
            layers += [nn.Linear(w, h), nn.ReLU()]
            w = h
        layers.append(nn.Linear(w, classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x.flatten(1))


def make_teachers(folder: Path, count: int = 4, widths=(1200, 1200), seed: int = 0,
                  classes: int = 10) -> tuple[list[Path], list[nn.Module]]:
    """``count`` seeded random MLP teachers (``classes`` outputs) as torch modules (eval mode) and as ONNX files
    in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    paths, modules = [], []
    for i in range(count):
        torch.manual_seed(seed + i)
        m = MLP(widths, classes=classes).eval()
        p = folder / f"teacher{i}.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(m, (torch.zeros(2, 784),), str(p), input_names=["x"], output_names=["y"],
                              dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}}, opset_version=17, dynamo=False)
        paths.append(p)
        modules.append(m)
    return paths, modules


def mnist_rows(n: int) -> np.ndarray:
    """``n`` MNIST training images [n, 28, 28] uint8 (repeated past 60000; synthetic if the file is missing)."""
    if MNIST_TRAIN.exists():
        from transferset.inputs.sources import open_source

        src = open_source(str(MNIST_TRAIN))
        x = src.read(0, min(n, src.rows))
    else:
        x = np.random.default_rng(0).integers(0, 256, (min(n, 60000), 28, 28), dtype=np.uint8)
    reps = -(-n // len(x))
    return np.ascontiguousarray(np.concatenate([x] * reps)[:n]) if reps > 1 else x


def machine() -> dict:
    """What the timings ran on, and how busy it was (the load of other jobs skews absolute figures)."""
    import onnxruntime as ort

    return {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "onnxruntime": ort.__version__, "torch_threads": torch.get_num_threads(),
            "loadavg": [round(v, 2) for v in os.getloadavg()]}


MNIST_TRAIN_LABELS = ROOT / "data" / "mnist" / "train-labels.idx1-ubyte.gz"


def mnist_labels(n: int) -> np.ndarray:
    """Labels of :func:`mnist_rows` (int64, repeated the same way; random if the file is missing)."""
    if MNIST_TRAIN.exists() and MNIST_TRAIN_LABELS.exists():
        from transferset.inputs.sources import read_labels

        y = read_labels(str(MNIST_TRAIN_LABELS))
    else:
        y = np.random.default_rng(1).integers(0, 10, min(n, 60000))
    reps = -(-n // len(y))
    return np.concatenate([y] * reps)[:n].astype(np.int64)


def lm_ids(lm: str, rows: int, seq_len: int) -> tuple[np.ndarray, int]:
    """``(ids [rows, seq_len] int64 drawn uniformly from the decoder's vocabulary, V)``: the LM legs' rows."""
    from transferset.labelling.lm_graph import build_token_graph

    vocab = build_token_graph([lm], [1.0], "mean-probs", [1.0], "topk:1").vocab
    return np.random.default_rng(0).integers(0, vocab, (rows, seq_len)).astype(np.int64), vocab
