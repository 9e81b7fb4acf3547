"""Tiny ONNX teachers exported inside the tests, as real exporters make them."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn


class _Flat(nn.Module):
    def __init__(self, d_in: int, classes: int, hidden: int = 16, head: str = "logits", seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.l1 = nn.Linear(d_in, hidden)
        self.l2 = nn.Linear(hidden, classes)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        self.head = head

    def forward(self, x):
        z = self.l2(torch.relu(self.l1(x.float().flatten(1))))
        if self.head == "softmax":
            return torch.softmax(z, dim=1)
        if self.head == "manual-softmax":  # probabilities built without a Softmax node
            e = torch.exp(z - z.max(dim=1, keepdim=True).values)
            return e / e.sum(dim=1, keepdim=True)
        if self.head == "nc11":
            return z[:, :, None, None]
        if self.head == "nan":
            return z * torch.tensor(float("nan"))
        return z


def export_teacher(path: str | Path, input_shape: tuple[int, ...], classes: int = 5, *, head: str = "logits",
                   seed: int = 0, fixed_batch: int | None = None, dtype: torch.dtype = torch.float32,
                   hidden: int = 16, input_name: str = "x", output_name: str = "y") -> Path:
    """Export a 2-layer MLP over ``input_shape`` rows (flattened inside the graph) to ONNX."""
    d_in = int(np.prod(input_shape))
    model = _Flat(d_in, classes, hidden, head, seed).eval()
    batch = fixed_batch or 2
    dummy = torch.zeros((batch,) + tuple(input_shape), dtype=dtype)
    dyn = None if fixed_batch else {input_name: {0: "batch"}, output_name: {0: "batch"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (dummy,), str(path), input_names=[input_name], output_names=[output_name],
                          dynamic_axes=dyn, opset_version=17, dynamo=False)
    return Path(path)


def reference_outputs(path: str | Path, x: np.ndarray) -> np.ndarray:
    """Run a model directly with ONNX Runtime, one row at a time if its batch is fixed."""
    import onnxruntime as ort

    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inp = s.get_inputs()[0]
    fixed = inp.shape[0] if isinstance(inp.shape[0], int) else None
    if fixed:
        return np.concatenate([s.run(None, {inp.name: x[i:i + fixed]})[0] for i in range(0, len(x), fixed)])
    return s.run(None, {inp.name: x})[0]
