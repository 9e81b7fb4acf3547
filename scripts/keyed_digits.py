"""A fine-grained 100-class task from the shipped MNIST for the specialists experiment: a key digit and the small
digit it points to.

A row is a uint8 image [28, 98]: on the left a full-size MNIST digit, the *key* ``a``; on the right ten small
MNIST digits (28x28 halved to 14x14 by 2x2 means) in two rows of five slots (slot ``s`` at row ``s // 5``, column
``s % 5``), every slot a random digit. The class is ``10 a + b`` where ``b`` is the small digit in slot ``a``: the
key says which small digit to read, the nine others are distractors.

Why this task (the paper's section 5, not the three-digit task's shape): JFT's confusable clusters are kinds of
one thing (mushrooms, bridges), and telling the kinds within one cluster apart wants features no other cluster
uses. Here the key is easy (a full-size digit) and the ten classes of one key differ only in the small digit of
one slot: a generalist must read all ten slots, a specialist for key ``a`` only slot ``a``. For a fully connected
student, which has no weight sharing across positions, reading a slot takes hidden units of its own, so a
generalist of fixed width spreads them over ten slots while a specialist of the same width can spend them on one.
Its rows are the key's rows (and as many others, as the paper draws), and its dustbin is mostly "another key".

The teachers (:class:`KeyedCnn`) are real CNNs trained with the 100-way cross-entropy: one trunk reads the key
(10 logits ``h``), another reads each small slot (10 logits ``g_s`` per slot), and the logit of class ``10 a + b``
is ``h[a] + g_a[b]``.

    python scripts/specialists.py --task keyed --workdir /tmp/keyed --threads 1
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import many_class  # noqa: E402

__all__ = ["SLOTS", "HEIGHT", "WIDTH", "small", "slot_box", "compose", "stage_data", "KeyedCnn", "stage_teachers",
           "describe_plan"]

SLOTS = 10
HEIGHT, WIDTH = 28, 28 + 5 * 14  #: [28, 98]


def small(images: np.ndarray) -> np.ndarray:
    """[N, 28, 28] uint8 -> [N, 14, 14] uint8: 2x2 means, rounded."""
    x = images.reshape(len(images), 14, 2, 14, 2).astype(np.float32).mean(axis=(2, 4))
    return np.rint(x).astype(np.uint8)


def slot_box(slot: int) -> tuple[int, int]:
    """(top, left) of small slot ``slot`` in a row."""
    return 14 * (slot // 5), 28 + 14 * (slot % 5)


def compose(images: np.ndarray, labels: np.ndarray, rows: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``rows`` keyed images [rows, 28, 98] (uint8) and their classes ``10 a + b`` (see the module docstring)."""
    rng = np.random.default_rng(seed)
    key = rng.integers(0, len(images), size=rows)
    pick = rng.integers(0, len(images), size=(rows, SLOTS))
    x = np.zeros((rows, HEIGHT, WIDTH), np.uint8)
    x[:, :, :28] = images[key]
    tiny = small(images)
    for s in range(SLOTS):
        top, left = slot_box(s)
        x[:, top:top + 14, left:left + 14] = tiny[pick[:, s]]
    a = labels[key].astype(np.int64)
    b = labels[pick[np.arange(rows), a]].astype(np.int64)
    return x, 10 * a + b


def stage_data(work: Path, train_rows: int, test_rows: int) -> dict:
    """The train rows from MNIST's train digits, the test rows from its test digits (seeds 0 and 1), as .npy files
    in ``work`` (made once; many_class.stage_data with this task's :func:`compose`)."""
    return many_class.stage_data(work, train_rows, test_rows, compose)


def _keyed_cnn():
    import torch
    from torch import nn

    class KeyedCnn(nn.Module):
        """uint8 [N, 28, 98] -> 100 logits ``h[a] + g_a[b]``: ``h`` from the key, ``g_s`` from small slot s (one
        trunk shared by the ten slots)."""

        def __init__(self) -> None:
            super().__init__()
            self.key = nn.Sequential(
                nn.Conv2d(1, 16, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(16, 32, 5), nn.ReLU(), nn.MaxPool2d(2),
                nn.Flatten(), nn.Linear(32 * 4 * 4, 128), nn.ReLU(), nn.Dropout(0.2), nn.Linear(128, 10))
            self.slot = nn.Sequential(
                nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * 3 * 3, 64), nn.ReLU(), nn.Dropout(0.2), nn.Linear(64, 10))

        def forward(self, x):
            n = x.shape[0]
            x = x.float() / 255.0
            h = self.key(x[:, None, :, :28])  # [N, 10]
            # the ten 14x14 slots: [N, 28, 70] -> [N, 2, 14, 5, 14] -> [N * 10, 1, 14, 14], slot s = 5 * row + col
            crops = x[:, :, 28:].reshape(n, 2, 14, 5, 14).permute(0, 1, 3, 2, 4).reshape(n * 10, 1, 14, 14)
            g = self.slot(crops).reshape(n, 10, 10)  # [N, slot, digit]
            return (h[:, :, None] + g).reshape(n, 100)  # class 10 a + b: key a, slot a's digit b

    return KeyedCnn


def __getattr__(name):  # KeyedCnn without importing torch at import time
    if name == "KeyedCnn":
        return _keyed_cnn()
    raise AttributeError(name)


def stage_teachers(work: Path, data: dict, members: int, epochs: list[int]) -> list[dict]:
    """Train and export the members not yet in ``work`` (many_class's trainer and exporter, this task's CNN)."""
    return many_class.stage_teachers(work, data, members, epochs, model_class=_keyed_cnn())


def describe_plan(plan: dict) -> str:
    """One sentence for the section: whether k-means found the keys (each cluster's keys, as ``10 a + b // 10``)."""
    keys = [sorted({v // 10 for v in c["classes"]}) for c in plan["clusters"]]
    pure = sum(len(k) == 1 for k in keys)
    shown = "; ".join("{" + ",".join(map(str, k)) + "}" for k in keys)
    return (f"The clusters' keys: {shown} ({pure} of {len(keys)} clusters hold the classes of one key only; "
            f"{len(plan['uncovered_classes'])} classes in no specialist's cluster).")
