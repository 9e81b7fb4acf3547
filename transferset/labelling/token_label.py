"""Stage 1 for language-model teachers: label token rows into a per-position transfer set.

Every member's output is logits [B, L, V]; the set has ``positions`` = L and each per-position field a leading
L axis (docs/FORMAT.md, "Per-position sets"). The members' graphs are joined and extended in memory
(:mod:`.lm_graph`), so only what the codec keeps leaves ONNX Runtime. Shards are written and listed as by
``label`` for any other source (atomic shards, the manifest rewritten after each, a killed run resumed by the
same command into byte-identical files), one batch at a time: ONNX Runtime uses every thread it is given, and the
encoding left in numpy is small beside the graph.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from .. import __version__
from .._io import sha256_file
from ..errors import TransferSetError
from ..format.codecs import encode, resolve_codec
from ..format.schema import Manifest, parse_codec, refuse_past_limits, schema_version_for, shard_layout
from ..format.shards import layout_chunk_rows
from ..targets import normalise_weights
from ..inputs.tokens import TokenRows, token_labels
from .ensemble import cpu_lanes, session_options
from .lm_graph import build_token_graph, decoder_vocab
from .options import LabelOptions
from .parts import threads_per_process
from .position_writer import label_positions
from .result import LabelResult
from .run import PositionRun

__all__ = ["label_tokens", "TokenRun", "TOKEN_CODEC_DEFAULT"]

#: the codec of a per-position set unless told: dense below DENSE_BELOW_CLASSES ids, else top-32 (the field keeps
#: 32-128 per token; 32 at one temperature and one member is about 138 bytes a token)
TOKEN_CODEC_DEFAULT = "topk:32"
#: labelling a top-k set on a CPU, the rows of one ``session.run`` hold at most this many bytes of logits
#: [rows, L, V] (at least one row): the extension reads that tensor several times, faster from the cache than memory
CPU_RUN_BYTES = 4 << 20


def _member_info(path: str, sha256: str, graph_inputs: list[str], vocab: int) -> dict:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return {"file": Path(path).name, "sha256": sha256, "input_name": "input_ids",
            "inputs": graph_inputs, "input_shape": ["batch", "length"], "input_dtype": "int64",
            "output_name": model.graph.output[0].name, "output_shape": ["batch", "length", vocab],
            "output_kind": "logits", "output_kind_source": "detected", "squeeze_output": False, "fixed_batch": None,
            "opset": max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=None),
            "producer": f"{model.producer_name} {model.producer_version}".strip(), "preprocess": None}


class TokenRun(PositionRun):
    """One per-token label run: the extended session, the manifest it makes, how a batch is encoded."""

    def __init__(self, ensemble: Sequence[str | os.PathLike], rows: TokenRows, o) -> None:
        import onnxruntime as ort

        from ..devices import ort_providers

        self.o, self.rows, self.total_rows = o, rows, rows.rows
        self.paths = [str(p) for p in ensemble]
        for p in self.paths:
            if not Path(p).is_file():
                raise TransferSetError(f"{p}: no such ONNX file", option="ensemble")
        self.weights = normalise_weights(o.weights, len(self.paths))
        self.temps = [float(t) for t in o.temperatures]
        vocab = decoder_vocab(self.paths, o.output_name)
        if not vocab:
            raise TransferSetError(f"{self.paths[0]}: its logits' last axis (the vocabulary) has no fixed size; "
                                   "export the teacher with a fixed vocabulary", option="ensemble")
        self.vocab = int(vocab)
        providers, self.cuda = ort_providers(o.device)
        if rows.vocab is not None and rows.vocab != self.vocab:
            raise TransferSetError(f"the tokenizer has {rows.vocab} ids but the teachers' vocabulary has "
                                   f"{self.vocab}; use the teachers' own tokenizer", option="tokenizer")
        top = int(rows.ids.max()) if rows.ids.size else 0
        if top >= self.vocab:
            raise TransferSetError(f"the rows hold token id {top} but the teachers' vocabulary has {self.vocab} ids; "
                                   "tokenize with the teachers' tokenizer", option="data")
        self.codec = resolve_codec(o.codec if o.codec is not None else
                                   ("dense" if self.vocab < 1000 else TOKEN_CODEC_DEFAULT), self.vocab)
        self.graph = build_token_graph(self.paths, self.temps, o.combine, list(self.weights), self.codec,
                                       o.output_name)
        threads = threads_per_process(o.threads)
        # a top-k set on a CPU runs its session a few rows at a time (_run): those runs go in lanes, each a thread
        # on a session of threads // lanes intra-op threads (ensemble.cpu_lanes), not one run at a time
        self.lanes = 1
        if self._few_rows_a_run():
            self.lanes, threads = cpu_lanes(threads)
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._pending: dict[tuple[int, int], list[concurrent.futures.Future]] = {}  # rows -> their queued runs
        self.so = session_options(threads)
        self.session = ort.InferenceSession(self.graph.model_bytes, self.so, providers=providers)
        self.sha256 = [sha256_file(p) for p in self.paths]
        self.definition = {
            "positions": rows.positions, "codec": self.codec, "teachers": self.sha256,
            "source": rows.fingerprint, "limit": o.limit, "temperatures": self.temps, "combine": o.combine,
            "weights": [float(w) for w in self.weights], "dtype": o.dtype, "batch_size": o.batch_size,
            "shard_size": o.shard_size, "compression": o.compression, "seed": o.seed,
            "provider": "cuda" if self.cuda is not None else "cpu"}
        self.definition_sha256 = hashlib.sha256(json.dumps(self.definition, sort_keys=True).encode()).hexdigest()

    @staticmethod
    def _feeds(ids: np.ndarray, length: np.ndarray, inputs: list[str]) -> dict:
        n, seq = ids.shape
        feeds = {"input_ids": ids.astype(np.int64)}
        if "attention_mask" in inputs:
            feeds["attention_mask"] = (np.arange(seq)[None, :] < length[:, None]).astype(np.int64)
        if "position_ids" in inputs:
            feeds["position_ids"] = np.broadcast_to(np.arange(seq, dtype=np.int64), (n, seq)).copy()
        return {k: v for k, v in feeds.items() if k in inputs}

    def _few_rows_a_run(self) -> bool:
        return self.cuda is None and parse_codec(self.codec)[0] == "topk"

    def prefetch(self, r0: int, r1: int) -> None:
        """Queue the runs of rows [r0, r1) on the lanes now (``encode`` of those rows collects them): a batch's runs
        start while the one before it is encoded and written, so no lane waits for the writer."""
        if self.lanes > 1 and (r0, r1) not in self._pending:
            self._pending[(r0, r1)] = self._submit(r0, r1)

    def _submit(self, r0: int, r1: int) -> list[concurrent.futures.Future]:
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(self.lanes, thread_name_prefix="ts-infer")
        step = self._step(r1 - r0)
        return [self._pool.submit(self._run_rows, a, min(a + step, r1)) for a in range(r0, r1, step)]

    def _step(self, rows: int) -> int:
        """Rows per session run. For a top-k set on a CPU the session runs a few rows at a time, so that the
        [rows, L, V] tensors the extension reads several times stay in the cache (the outputs are the same: every
        position's values depend on its own row only); the other codecs hand back [rows, L, T, V] anyway."""
        seq = self.rows.ids.shape[1]
        return max(1, CPU_RUN_BYTES // (4 * seq * self.vocab)) if self._few_rows_a_run() else max(1, rows)

    def _run_rows(self, a: int, b: int) -> list[np.ndarray]:
        return self.session.run(self.graph.outputs, self._feeds(self.rows.ids[a:b], self.rows.length[a:b],
                                                                self.graph.inputs))

    def _run(self, r0: int, r1: int) -> dict[str, np.ndarray]:
        """The graph's outputs for rows [r0, r1): runs of ``_step`` rows, on the lanes (in order: the same arrays
        as one run after another) when there are several, else one after another here."""
        futures = self._pending.pop((r0, r1), None)
        step = self._step(r1 - r0)
        if futures is None and self.lanes > 1 and r1 - r0 > step:
            futures = self._submit(r0, r1)
        parts = [f.result() for f in futures] if futures is not None else \
            [self._run_rows(a, min(a + step, r1)) for a in range(r0, r1, step)]
        return {name: parts[0][i] if len(parts) == 1 else np.concatenate([p[i] for p in parts])
                for i, name in enumerate(self.graph.outputs)}

    def close(self) -> None:
        """Drop the session: none left for the collector to free in a forked child (``Ensemble.close``); runs
        queued for rows never encoded (a failed or interrupted run) are dropped."""
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None
        self._pending.clear()
        self.session = None

    def new_manifest(self) -> Manifest:
        o, rows = self.o, self.rows
        m = Manifest(
            codec=self.codec, schema_version=schema_version_for(self.codec, rows.positions),
            positions=rows.positions, num_classes=self.vocab, num_members=len(self.paths),
            teachers=[_member_info(p, h, self.graph.inputs, self.vocab) for p, h in zip(self.paths, self.sha256)],
            temperatures=self.temps, combine=o.combine, weights=[float(w) for w in self.weights], dtype=o.dtype,
            input={"shape": [rows.positions], "dtype": rows.ids.dtype.name, "stored": True},
            augment={"spec": "", "ops": [], "views": 0, "clean_view": True, "views_per_row": 1, "seed": o.seed},
            source={**rows.describe, "fingerprint": rows.fingerprint, "labels": "next token",
                    "labels_sha256": None},
            tool_version=__version__, class_names=None, preprocess=None, batch_size=o.batch_size,
            shard_size=o.shard_size, compression=None if o.compression in (None, "none") else o.compression,
            expected_rows=rows.rows, device=self.definition["provider"], definition_sha256=self.definition_sha256,
            extra={k: v for k, v in (("license", o.license), ("citation", o.citation)) if v})
        refuse_past_limits(m)
        m.chunk_rows = layout_chunk_rows(shard_layout(m), min(o.shard_size, rows.rows))
        return m

    def encode(self, r0: int, r1: int, fdtype) -> tuple[dict[str, np.ndarray], dict]:
        """The shard fields of rows [r0, r1) and their statistics."""
        ids, length = self.rows.ids[r0:r1], self.rows.length[r0:r1]
        out = self._run(r0, r1)
        n, seq = ids.shape
        family, k = parse_codec(self.codec)
        m_count, t_count = len(self.paths), len(self.temps)
        if family == "topk":
            arrays = {"topk_index": out["topk_index"], "topk_log_probs": out["topk_log_probs"],
                      "tail_log_mass": out["tail_log_mass"], "member_log_partition": out["member_log_partition"]}
            if m_count > 1:
                arrays["topk_logits"] = out["topk_logits"]
            top1 = out["topk_index"][..., 0]
        else:
            lp = out["combined_log_probs"].astype(np.float64)  # [n, L, T, V]
            flat_rows = (np.arange(r0, r1, dtype=np.int64)[:, None] * seq + np.arange(seq)[None, :]).reshape(-1)
            z = out["member_logits"].reshape(n * seq, m_count, -1) if family == "dense" else None
            enc = encode(self.codec, z, lp.reshape(n * seq, t_count, -1), flat_rows, self.temps, fdtype)
            arrays = {name: v.reshape((n, seq) + v.shape[1:]) for name, v in enc.items()}
            top1 = out["combined_top1"][..., 0]
        from ..format.schema import index_dtype

        labels = token_labels(ids, length)
        for name in list(arrays):
            arrays[name] = arrays[name].astype(index_dtype(self.vocab) if name == "topk_index" else
                                               arrays[name].dtype if name.startswith("sample") else fdtype)
        arrays.update(labels=labels, length=length.astype(np.int32), inputs=ids,
                      source_index=np.arange(r0, r1, dtype=np.int64), view=np.zeros(n, np.int32),
                      aug_seed=np.zeros(n, np.uint64))
        real = np.arange(seq)[None, :] < length[:, None]
        has = labels >= 0
        ent = (out["entropy"] * real[..., None]).sum(1) / np.maximum(length, 1)[:, None]  # [n, T]
        stats = {"labelled": int(has.sum()), "ensemble_correct": int((top1[has] == labels[has]).sum()),
                 "member_correct": [int((out["member_top1"][..., i][has] == labels[has]).sum())
                                    for i in range(m_count)],
                 "entropy_sum": [float(ent[:, j].sum()) for j in range(t_count)]}
        return arrays, stats


def label_tokens(ensemble: Sequence[str | os.PathLike], rows: TokenRows, out: str | os.PathLike,
                 options: LabelOptions | None = None) -> LabelResult:
    """Label token ``rows`` with the decoder ``ensemble`` into the per-position set ``out`` (resuming if possible)."""
    return label_positions(lambda o: TokenRun(ensemble, rows, o), "token rows", out, options)
