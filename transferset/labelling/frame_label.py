"""Stage 1 for per-frame teachers: image lines or signals labelled into a per-position set, one distribution a frame.

A teacher whose output is [B, T, C] for a float input (an image line [B, ch, H, W], a signal [B, frames,
features]: a line recogniser, a keyword spotter, an acoustic model) makes a per-position set exactly as a language
model does (docs/FORMAT.md, "Per-position sets"): ``positions`` = T, every codec field with a leading T axis, the
same per-position losses and -1 masks. Rows come from an array source (one row, one view: no augmentation), go
through the ensemble's preprocessing, and every member's [n, T, C] logits are encoded per frame by the row codecs.
Hard labels are per frame too: ``labels`` [N, T] int from a file, -1 where a frame has none. Every frame of a row
is real (``length`` = T): a teacher whose T depends on the input width is fine within a set of equal-width rows.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Sequence

import numpy as np

from .. import __version__
from ..errors import TransferSetError
from ..format.codecs import encode, resolve_codec
from ..format.schema import (TARGETS_SCHEMA_VERSION, Manifest, index_dtype, parse_codec, refuse_past_limits,
                             schema_version_for, shard_layout)
from ..format.shards import layout_chunk_rows
from ..targets import normalise_weights, soft_targets
from .half import to_float16
from .ensemble import Ensemble, Preprocess
from .parts import threads_per_process
from ..inputs.sources import frame_labels, open_source
from .onnx_header import FLOAT_ELEM_TYPES, HeaderError, graph_interface
from .options import LabelOptions
from .position_writer import label_positions
from .result import LabelResult
from .run import PositionRun

__all__ = ["label_frames", "is_frame_teacher", "FrameRun"]


def is_frame_teacher(path: str | os.PathLike | None, output_name: str | None = None) -> bool:
    """Whether the ONNX model at ``path`` takes a float input and gives scores with a frame axis [B, T, C]."""
    if path is None or not os.path.isfile(path):
        return False
    try:
        g = graph_interface(path)
    except (OSError, HeaderError):  # not ONNX: the ensemble loader says so in its own words
        return False
    inputs = [i for i in g.inputs if i.name not in g.initializers]
    out = next((x for x in g.outputs if output_name in (None, x.name)), None)
    return out is not None and out.rank == 3 and len(inputs) == 1 and inputs[0].elem_type in FLOAT_ELEM_TYPES


class FrameRun(PositionRun):
    """One per-frame label run: the source, the ensemble, the manifest it makes and how a batch is encoded."""

    def __init__(self, ensemble: Sequence[str | os.PathLike], data: str, o) -> None:
        self.o = o
        self.source = open_source(data, limit=o.limit)
        self.total_rows = self.source.rows
        if self.total_rows < 1:
            raise TransferSetError(f"{data}: has no rows to label", option="data")
        pre = Preprocess(o.scale, tuple(o.mean) if o.mean else None, tuple(o.std) if o.std else None, o.layout)
        self.ens = Ensemble(list(ensemble), preprocess=pre, device=o.device, input_name=o.input_name,
                            output_name=o.output_name, output_kind=o.output_kind,
                            threads=threads_per_process(o.threads), positions=True)
        try:
            self._define(o, pre)
        except BaseException:
            self.ens.close()  # a refused run leaves no session for the collector (Ensemble.close)
            raise

    def _define(self, o, pre: Preprocess) -> None:
        """The frame count and classes (one row run through the teachers), the labels and the definition."""
        self.plan = self.ens.feed_plan()
        probe = self.ens.run(self.plan(self.source.read(0, 1)))  # [1, M, T, C]: the frame count and classes
        self.frames, self.classes = int(probe.shape[2]), int(probe.shape[3])
        self.weights = normalise_weights(o.weights, len(self.ens.members))
        self.temps = [float(t) for t in o.temperatures]
        self.codec = resolve_codec(o.codec, self.classes)
        self.labels, labels_sha = (frame_labels(o.labels, self.total_rows, self.frames, self.classes)
                                   if o.labels else (None, None))
        self.store = True if o.store_inputs is None else bool(o.store_inputs)
        self.definition = {
            "schema_version": TARGETS_SCHEMA_VERSION,  # float32 maths: a set begun by older code is not resumed
            "positions": self.frames, "codec": self.codec, "teachers": [[m.sha256, m.input_name, m.output_name]
                                                                        for m in self.ens.members],
            "output_kind_option": o.output_kind, "preprocess": pre.to_json(), "source": self.source.fingerprint(),
            "labels": labels_sha, "limit": o.limit, "store_inputs": self.store, "temperatures": self.temps,
            "combine": o.combine, "weights": [float(w) for w in self.weights], "dtype": o.dtype,
            "batch_size": o.batch_size, "shard_size": o.shard_size, "compression": o.compression,
            "provider": "cuda" if self.ens.cuda_id is not None else "cpu"}
        self.definition_sha256 = hashlib.sha256(json.dumps(self.definition, sort_keys=True).encode()).hexdigest()

    def close(self) -> None:
        self.ens.close()

    def new_manifest(self) -> Manifest:
        o, src = self.o, self.source
        m = Manifest(
            codec=self.codec, schema_version=schema_version_for(self.codec, self.frames), positions=self.frames,
            num_classes=self.classes, num_members=len(self.ens.members),
            teachers=[m.describe() for m in self.ens.members], temperatures=self.temps, combine=o.combine,
            weights=[float(w) for w in self.weights], dtype=o.dtype,
            input={"shape": list(src.row_shape), "dtype": np.dtype(src.dtype).name, "stored": self.store},
            augment={"spec": "", "ops": [], "views": 0, "clean_view": True, "views_per_row": 1, "seed": o.seed},
            source={**src.describe(), "fingerprint": src.fingerprint(), "labels": o.labels,
                    "labels_sha256": self.definition["labels"]},
            tool_version=__version__, class_names=None, preprocess=self.ens.members[0].preprocess.to_json(),
            batch_size=o.batch_size, shard_size=o.shard_size,
            compression=None if o.compression in (None, "none") else o.compression,
            expected_rows=self.total_rows, device=self.definition["provider"],
            definition_sha256=self.definition_sha256,
            extra={k: v for k, v in (("license", o.license), ("citation", o.citation)) if v})
        refuse_past_limits(m)
        m.chunk_rows = layout_chunk_rows(shard_layout(m), min(o.shard_size, self.total_rows))
        return m

    def encode(self, r0: int, r1: int, fdtype) -> tuple[dict[str, np.ndarray], dict]:
        """The shard fields of rows [r0, r1) and their statistics."""
        x = self.source.read(r0, r1)
        z = self.ens.run(self.plan(x), first_row=r0)  # [n, M, T, C]
        n, m_count, t, c = z.shape
        if (t, c) != (self.frames, self.classes):
            raise TransferSetError(f"rows {r0}..{r1 - 1} gave {t} frames of {c} classes, the first row "
                                   f"{self.frames} of {self.classes}; label rows of one width", option="data")
        flat = z.transpose(0, 2, 1, 3).reshape(n * t, m_count, c)  # one row per frame for the row codecs
        # float32 maths (schema 4), the log-partitions and the entropy from the same pass
        part = np.empty((n * t, m_count, len(self.temps)), np.float32)
        ent = np.empty((n * t, len(self.temps)), np.float32)
        lp = soft_targets(flat, self.temps, self.o.combine, self.weights, log_partition=part, dtype=np.float32,
                          entropy=ent)
        frame_rows = (np.arange(r0, r1, dtype=np.int64)[:, None] * t + np.arange(t)[None, :]).reshape(-1)
        enc = encode(self.codec, flat, lp, frame_rows, self.temps, np.float32, log_partition=part)
        family, _ = parse_codec(self.codec)
        arrays = {}
        for name, v in enc.items():
            v = v.reshape((n, t) + v.shape[1:])
            arrays[name] = v.astype(index_dtype(c)) if name == "topk_index" else \
                to_float16(v) if fdtype == np.float16 and v.dtype == np.float32 else v
        if family == "topk" and m_count == 1:
            arrays.pop("topk_logits", None)  # one member: topk_logits = T (topk_log_probs + partition)
        labels = self.labels[r0:r1] if self.labels is not None else np.full((n, t), -1, np.int32)
        arrays.update(labels=labels, length=np.full(n, t, np.int32), source_index=np.arange(r0, r1, dtype=np.int64),
                      view=np.zeros(n, np.int32), aug_seed=np.zeros(n, np.uint64))
        if self.store:
            arrays["inputs"] = x
        has = labels >= 0
        top1 = lp[:, int(np.argmin(self.temps))].argmax(-1).reshape(n, t)
        member_top1 = z.argmax(-1)  # [n, M, T]
        ent = ent.reshape(n, t, -1).mean(1, dtype=np.float64)  # [n, temps]: a row's mean over its frames
        stats = {"labelled": int(has.sum()), "ensemble_correct": int((top1[has] == labels[has]).sum()),
                 "member_correct": [int((member_top1[:, i][has] == labels[has]).sum()) for i in range(m_count)],
                 "entropy_sum": [float(ent[:, j].sum()) for j in range(len(self.temps))]}
        return arrays, stats


def label_frames(ensemble: Sequence[str | os.PathLike], data: str, out: str | os.PathLike,
                 options: LabelOptions | None = None) -> LabelResult:
    """Label the rows of ``data`` with the per-frame ``ensemble`` into the per-position set ``out`` (resuming if
    possible)."""
    return label_positions(lambda o: FrameRun(ensemble, data, o), "per-frame rows", out, options)
