"""ONNX Runtime members: providers, input feeding, output kinds and batching.

Stage 1 only. Each member is one ``InferenceSession``; sessions are configured so several of them do not
starve each other on a CPU (thread spinning off: default spinning sessions were measured 2.4-2.9x slower on a
5-member ensemble on 2 cores). Members that take the same input (same dtype and shape) share one prepared
array, and on a GPU one device copy bound to every member through IOBinding.
"""

from __future__ import annotations

import concurrent.futures
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..errors import FAILED, TransferSetError
from .._io import sha256_file
from ..devices import ort_providers, session_options
from ..targets import looks_like_probabilities, probabilities_to_logits
from .onnx_header import HeaderError, model_meta
from .options import OUTPUT_KINDS

__all__ = ["Preprocess", "Member", "Ensemble", "FeedPlan", "session_options", "OUTPUT_KINDS"]

_ORT_DTYPES = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int16)": np.int16, "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8, "tensor(uint16)": np.uint16, "tensor(bool)": np.bool_,
}


def _ort():
    import onnxruntime as ort

    ort.set_default_logger_severity(3)  # keep provider probing quiet on CPU-only machines
    return ort


@dataclass(frozen=True)
class Preprocess:
    """How source rows become model input: ``((x * scale) - mean) / std``, then layout, then reshape.

    ``mean``/``std`` are scalars or one value per channel. ``layout`` is the model's image layout
    (``nchw`` or ``nhwc``); rows of rank 2 (H x W) gain a channel axis where the layout puts it, and rank-3
    rows stored channels-last (H x W x C, C <= 4) are transposed for ``nchw``. Integer models get the
    preprocessed values cast (rounded) to their integer type.
    """

    scale: float | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    layout: str | None = None

    def to_json(self) -> dict:
        return {"scale": self.scale, "mean": list(self.mean) if self.mean else None,
                "std": list(self.std) if self.std else None, "layout": self.layout}

    def is_identity(self) -> bool:
        return self.scale is None and not self.mean and not self.std

    def apply(self, rows: np.ndarray, dtype: np.dtype, row_shape: tuple | None) -> np.ndarray:
        """Preprocess a batch [N, *source_row] into [N, *row_shape] of ``dtype``.

        uint8 rows (images) go through a 256-entry table per channel built by the same arithmetic, so the values
        are bit-identical and each is one lookup instead of four float passes; rows stored H x W x C for an
        ``nchw`` model are written straight into NCHW (measured: the arithmetic was the largest cost of labelling
        a photo folder, ahead of decoding and of ONNX Runtime; docs/BENCHMARKS.md).
        """
        x = rows
        if not self.is_identity():
            # a scale alone is two vectorised passes, faster than a gather through the table (0.03 against 0.14 ms
            # a batch of 256 MNIST rows); with a mean or a std the table wins (four passes)
            table = rows.dtype == np.uint8 and (self.mean or self.std or self.layout == "nchw")
            x = self._lookup(rows) if table else None
            x = self._arith(rows) if x is None else x
        if self.layout and x.ndim == 3:
            x = x[:, None] if self.layout == "nchw" else x[..., None]
        elif self.layout == "nchw" and x.ndim == 4 and x.shape[-1] <= 4 < x.shape[1]:
            x = np.transpose(x, (0, 3, 1, 2))
        elif self.layout == "nhwc" and x.ndim == 4 and x.shape[1] <= 4 < x.shape[-1]:
            x = np.transpose(x, (0, 2, 3, 1))
        return self._shaped(rows, x, dtype, row_shape)

    def _lookup(self, rows: np.ndarray) -> np.ndarray | None:
        """``_arith`` of uint8 ``rows`` by table lookup, or None where the arithmetic would refuse the rows."""
        chans = rows.shape[-1] if rows.ndim == 4 and rows.shape[-1] <= 4 else 1
        levels = np.arange(256, dtype=np.uint8)
        probe = np.ascontiguousarray(np.broadcast_to(levels[:, None, None, None], (256, 1, 1, chans))) \
            if rows.ndim == 4 else levels.reshape((256,) + (1,) * (rows.ndim - 1))
        try:
            table = self._arith(probe).reshape(256, -1).T  # [channels, 256], the very arithmetic of _arith
        except TransferSetError:
            return None  # _arith on the rows themselves raises, naming their shape
        if table.shape[0] == 1:
            return np.take(table[0], rows, mode="clip")
        if self.layout == "nchw" and rows.shape[1] > 4:  # H x W x C rows for an NCHW model: write NCHW at once
            out = np.empty((rows.shape[0], chans) + rows.shape[1:3], np.float32)
            for i in range(rows.shape[0]):  # a row at a time: its output stays in cache, threads get the GIL
                for c in range(chans):
                    np.take(table[c], rows[i, ..., c], mode="clip", out=out[i, c])
            return np.transpose(out, (0, 2, 3, 1))  # a view: apply's layout step transposes it back, copying nothing
        return table[np.arange(chans), rows]

    def _arith(self, rows: np.ndarray) -> np.ndarray:
        """``((x * scale) - mean) / std`` in float32, per channel where mean/std give one value per channel."""
        x = rows.astype(np.float32)
        if self.scale is not None:
            x = x * np.float32(self.scale)
        chan_axis = -1 if (x.ndim == 4 and x.shape[-1] <= 4) else (1 if x.ndim == 4 else None)
        for name, vals, op in (("mean", self.mean, np.subtract), ("std", self.std, np.divide)):
            if vals:
                v = np.asarray(vals, dtype=np.float32)
                if v.size > 1:
                    if chan_axis is None or x.shape[chan_axis] != v.size:
                        raise TransferSetError(f"gives {v.size} values but the rows {tuple(rows.shape[1:])} have "
                                               "no channel axis of that size", option=name)
                    shape = [1] * x.ndim
                    shape[chan_axis] = v.size
                    v = v.reshape(shape)
                x = op(x, v)
        return x

    @staticmethod
    def _shaped(rows: np.ndarray, x: np.ndarray, dtype: np.dtype, row_shape: tuple | None) -> np.ndarray:
        if row_shape is not None and tuple(x.shape[1:]) != tuple(row_shape):
            if int(np.prod(x.shape[1:])) != int(np.prod(row_shape)):
                raise TransferSetError(
                    f"source rows of shape {tuple(rows.shape[1:])} do not fit the model input {tuple(row_shape)} "
                    f"({int(np.prod(x.shape[1:]))} values vs {int(np.prod(row_shape))}); check the data, the layout or the model")
            x = x.reshape((x.shape[0],) + tuple(row_shape))
        if x.dtype != dtype:
            if np.issubdtype(dtype, np.integer) and not np.issubdtype(x.dtype, np.integer):
                x = np.rint(x)
            x = x.astype(dtype)
        return np.ascontiguousarray(x)


@dataclass
class Member:
    """One ONNX teacher and how it is fed."""

    path: Path
    session: object
    input_name: str
    input_shape: list
    input_dtype: np.dtype
    output_name: str
    output_shape: list
    fixed_batch: int | None
    opset: int | None
    producer: str
    sha256: str
    output_kind: str | None = None
    output_kind_source: str = "detected"
    squeeze: bool = False
    preprocess: Preprocess = field(default_factory=Preprocess)
    extra_outputs: tuple[str, ...] = ()  #: hint tensors added to the graph's outputs in memory (labelling.hints)

    @property
    def row_shape(self) -> tuple | None:
        """The model's per-row input shape when every non-batch dimension is a fixed integer."""
        dims = self.input_shape[1:]
        return tuple(dims) if all(isinstance(d, int) and d > 0 for d in dims) else None

    def describe(self) -> dict:
        return {
            "file": self.path.name, "sha256": self.sha256, "input_name": self.input_name,
            "input_shape": [d if isinstance(d, int) else str(d) for d in self.input_shape],
            "input_dtype": np.dtype(self.input_dtype).name, "output_name": self.output_name,
            "output_shape": [d if isinstance(d, int) else str(d) for d in self.output_shape],
            "output_kind": self.output_kind, "output_kind_source": self.output_kind_source,
            "squeeze_output": self.squeeze, "fixed_batch": self.fixed_batch, "opset": self.opset,
            "producer": self.producer, "preprocess": self.preprocess.to_json(),
        }


def _model_meta(path: Path) -> tuple[int | None, str]:
    """``(opset, producer)`` from the file's header fields (``onnx_header.model_meta``), ``(None, "")`` where
    they do not read."""
    try:
        return model_meta(path)
    except (OSError, HeaderError):  # metadata only; the session gives the real verdict on the file
        return None, ""


def load_member(path: str | os.PathLike, providers: list, preprocess: Preprocess, input_name: str | None = None,
                output_name: str | None = None, output_kind: str | None = None, threads: int | None = None,
                positions: bool = False, extra_outputs: Sequence[str] = (), sha256: Callable[[], str] | None = None
                ) -> Member:
    """Open one ONNX file; pick its input and its class-score output; fail with a clear line.

    ``extra_outputs`` (hint tensors) are added to the graph's outputs in memory; the file is read, never written.
    ``sha256`` gives the file's hash when it is computed elsewhere (``Ensemble`` hashes its members in a thread
    while ONNX Runtime builds the sessions).
    """
    path = Path(path)
    if not path.is_file():
        raise TransferSetError(f"{path}: no such ONNX file")
    sess = _open_session(path, providers, threads, extra_outputs)
    inp = _data_input(path, sess.get_inputs(), input_name)
    out = _score_output(path, sess.get_outputs(), output_name, positions)
    shape = list(inp.shape)
    if not shape:
        raise TransferSetError(f"{path}: input {inp.name!r} is a scalar; a batch dimension is needed")
    fixed = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None
    opset, producer = _model_meta(path)
    kind = _declared_kind(output_kind)
    return Member(path=path, session=sess, input_name=inp.name, input_shape=shape,
                  input_dtype=np.dtype(_ORT_DTYPES[inp.type]), output_name=out.name, output_shape=list(out.shape or []),
                  fixed_batch=fixed, opset=opset, producer=producer,
                  sha256=(sha256() if sha256 is not None else None) or sha256_file(path), output_kind=kind,
                  output_kind_source="option" if kind else "detected", preprocess=preprocess,
                  extra_outputs=tuple(extra_outputs))


def _hash_if_file(path: str | os.PathLike) -> str | None:
    """sha256 of ``path``, or None where it cannot be read (``load_member`` then says why in its own words)."""
    try:
        return sha256_file(path) if os.path.isfile(path) else None
    except OSError:
        return None


def _open_session(path: Path, providers: list, threads: int | None, extra_outputs: Sequence[str]):
    """An InferenceSession of ``path`` (with ``extra_outputs`` added in memory), or one line saying why not."""
    ort = _ort()
    model: str | bytes = str(path)
    if extra_outputs:
        from .hints import model_with_outputs

        model = model_with_outputs(path, extra_outputs)
    try:
        return ort.InferenceSession(model, sess_options=session_options(threads), providers=providers)
    except Exception as e:  # ORT raises several private exception types for bad files
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "INVALID_PROTOBUF" in first or "Protobuf parsing failed" in first:
            raise TransferSetError(f"{path}: not a loadable ONNX model (its bytes do not parse as one); is this an "
                                   "ONNX model?") from None
        first = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", first)  # ORT's prefix says nothing to a user
        raise TransferSetError(f"{path}: not a loadable ONNX model ({first[:300]})") from None


def _data_input(path: Path, inputs: list, input_name: str | None):
    """The session input that takes the data: the one named, or the only one; of a type transferset feeds."""
    if input_name:
        chosen = [i for i in inputs if i.name == input_name]
        if not chosen:
            raise TransferSetError(f"{path}: no input named {input_name!r}; it has {[i.name for i in inputs]}")
        inp = chosen[0]
    elif len(inputs) == 1:
        inp = inputs[0]
    else:
        raise TransferSetError(f"needed: {path} has {len(inputs)} inputs {[i.name for i in inputs]}; name the data input",
                               option="input_name")
    if inp.type not in _ORT_DTYPES:
        raise TransferSetError(f"{path}: input {inp.name!r} has type {inp.type}, which transferset cannot feed")
    return inp


def _score_output(path: Path, outputs: list, output_name: str | None, positions: bool):
    """The class-score output: the one named, else the first float output of a score shape ([N, C] or
    [N, C, 1, 1]; with ``positions``, [N, frames, C])."""
    if output_name:
        cand = [o for o in outputs if o.name == output_name]
        if not cand:
            raise TransferSetError(f"{path}: no output named {output_name!r}; it has {[o.name for o in outputs]}")
        return cand[0]
    cand = [o for o in outputs if o.type in ("tensor(float)", "tensor(double)", "tensor(float16)")
            and o.shape is not None and len(o.shape) in ((3,) if positions else (2, 4))]
    if not cand:
        want = "[N, frames, C]" if positions else "[N, C] or [N, C, 1, 1]"
        raise TransferSetError(f"needed: {path} has no float output of shape {want} among "
                               f"{[o.name for o in outputs]}; name the class-score output", option="output_name")
    return cand[0]


def _declared_kind(output_kind: str | None) -> str | None:
    """What the user says the models output (None: auto, read from the graph later)."""
    if not output_kind or output_kind == "auto":
        return None
    if output_kind not in OUTPUT_KINDS:
        raise TransferSetError(f"{output_kind!r}: choose auto, logits or probabilities", option="output_kind")
    return output_kind


@dataclass(frozen=True)
class FeedPlan:
    """Prepared inputs for a batch, keyed by (dtype, row shape): members that agree share one array.

    Holds only preprocessing and shapes, so it pickles and can run in a preparing thread or worker process.
    """

    entries: tuple[tuple[tuple, Preprocess, np.dtype, tuple | None], ...]

    def __call__(self, rows: np.ndarray) -> dict:
        return {key: pre.apply(rows, dtype, shape) for key, pre, dtype, shape in self.entries}


def _declared_classes(members: Sequence[Member]) -> int | None:
    """The class count the members' ``[N, C]`` outputs declare, or None when any leaves it open; members that
    declare different counts are refused here, before any row is run."""
    dims = [m.output_shape[1] if len(m.output_shape) == 2 else None for m in members]
    if not all(isinstance(d, int) and d > 0 for d in dims):
        return None
    if len(set(dims)) > 1:
        detail = ", ".join(f"{m.path.name}: {d}" for m, d in zip(members, dims))
        raise TransferSetError(f"the members disagree on the number of classes ({detail}); an ensemble needs one "
                               "label space")
    return int(dims[0])


MAX_LANES = 4


def cpu_lanes(threads: int | None) -> tuple[int, int]:
    """``(lanes, threads per session)`` for ``threads`` CPU threads in all (None: every core).

    On a CPU, ``label`` runs up to :data:`MAX_LANES` batches at once, each in its own Python thread on sessions of
    ``threads // lanes`` intra-op threads, instead of one batch at a time on sessions of ``threads``. ONNX Runtime's
    pool splits every operator among its threads and waits for the last one; beside the writer thread (soft
    targets, HDF5, sha256) on the same cores, one preempted pool thread stalls the whole operator. Batches in
    their own lanes do not wait for each other (docs/BENCHMARKS.md: 1,000 classes, dense). The outputs are the
    same bytes: MLAS splits a GEMM's rows and columns among threads, never a sum (tested).
    """
    total = int(threads or os.cpu_count() or 1)
    lanes = max(1, min(total, MAX_LANES))
    return lanes, max(1, total // lanes)


class Ensemble:
    """Members run one after another over a batch; returns [N, M, C] float32 logits (or log-probabilities).

    With ``positions``, each member gives one distribution per frame, [N, P, C], and the ensemble [N, M, P, C]
    (an image-line recogniser, an acoustic model); the members must agree on P and C.
    """

    def __init__(self, paths: Sequence[str | os.PathLike], *, preprocess: Preprocess = Preprocess(), device: str = "auto",
                 input_name: str | None = None, output_name: str | None = None, output_kind: str | None = None,
                 threads: int | None = None, positions: bool = False, hints: Sequence = (),
                 lanes: bool = False) -> None:
        if not paths:
            raise TransferSetError("needs at least one ONNX file", option="ensemble")
        _ort()  # quiet provider probing before the providers are chosen
        self.providers, self.cuda_id = ort_providers(device)
        self.device = "cuda:%d" % self.cuda_id if self.cuda_id is not None else "cpu"
        #: how many batches may run at once, each in its own thread (see :func:`cpu_lanes`); 1 on a GPU
        self.lanes, threads = cpu_lanes(threads) if lanes and self.cuda_id is None else (1, threads)
        #: hint specs (labelling.hints.HintSpec): tensor names fetched from their member with its logits
        self.hints = list(hints)
        self.hint_shapes: list[list[int]] | None = None  #: each hint tensor's per-row shape, once a batch ran
        # the members' sha256 (hashlib releases the GIL) is read in a thread while ONNX Runtime builds the sessions
        with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ts-hash") as hasher:
            digests = [hasher.submit(_hash_if_file, p) for p in paths]
            self.members = [load_member(p, self.providers, preprocess, input_name, output_name, output_kind, threads,
                                        positions, tuple(dict.fromkeys(h.tensor for h in self.hints if h.member == i)),
                                        sha256=digests[i].result)
                            for i, p in enumerate(paths)]
        self.positions = positions
        self._ort = _ort()
        try:
            #: the class count, known when the members' outputs declare it, else from the first batch run
            self.num_classes: int | None = None if positions else _declared_classes(self.members)
        except TransferSetError:
            self.close()  # no session left for the collector (see close)
            raise

    def close(self) -> None:
        """Release every member's ONNX Runtime session now.

        A session left for the garbage collector can be inherited by a process forked later (a DataLoader worker
        of the same Python process) and destroyed there, where ONNX Runtime waits for thread-pool threads that do
        not exist in the child: the worker hangs with the GIL held (seen in the test suite). ``label``, ``evaluate``
        and ``verify --reteach`` close theirs before they return (``with Ensemble(...) as ens``).
        """
        for m in self.members:
            m.session = None

    def __enter__(self) -> "Ensemble":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def feed_plan(self) -> "FeedPlan":
        """How source rows become every member's input, as a picklable callable (no sessions inside)."""
        entries = {}
        for m in self.members:
            key = (m.input_dtype.str, m.row_shape)
            entries.setdefault(key, (key, m.preprocess, m.input_dtype, m.row_shape))
        return FeedPlan(tuple(entries.values()))

    def feeds(self, rows: np.ndarray) -> dict:
        """Prepared inputs keyed by (dtype, row shape): members that agree share one array."""
        return self.feed_plan()(rows)

    def _run_member(self, m: Member, x: np.ndarray, bound: object | None) -> tuple[np.ndarray, list[np.ndarray]]:
        n = x.shape[0]
        if m.fixed_batch is not None and m.fixed_batch != n:
            b = m.fixed_batch
            parts = []
            for s in range(0, n, b):
                piece = x[s:s + b]
                if piece.shape[0] < b:  # pad the tail to the fixed batch and drop the padding's outputs
                    pad = np.zeros((b - piece.shape[0],) + piece.shape[1:], dtype=piece.dtype)
                    piece = np.concatenate([piece, pad])
                y, extras = self._run_member(m, piece, None)
                parts.append([y[: min(b, n - s)]] + [e[: min(b, n - s)] for e in extras])
            return np.concatenate([p[0] for p in parts]), [np.concatenate([p[j] for p in parts])
                                                           for j in range(1, len(parts[0]))]
        names = [m.output_name, *m.extra_outputs]
        try:
            if bound is not None:
                io = m.session.io_binding()
                io.bind_ortvalue_input(m.input_name, bound)
                for name in names:
                    io.bind_output(name, "cpu")
                m.session.run_with_iobinding(io)
                got = io.copy_outputs_to_cpu()
            else:
                got = m.session.run(names, {m.input_name: x})
            y, extras = got[0], [np.asarray(e) for e in got[1:]]
        except Exception as e:  # ORT's runtime errors (shape, type) are user input problems here
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise TransferSetError(f"{m.path}: the model failed on input of shape {tuple(x.shape)} {x.dtype} ({msg[:300]}); "
                                   "check the data, the layout, the scale or the model's expected input") from None
        y = np.asarray(y)
        if self.positions:
            if y.ndim != 3 or y.shape[0] != n:
                raise TransferSetError(f"{m.path}: output {m.output_name!r} has shape {y.shape}; a per-frame teacher "
                                       "gives [N, frames, C]")
            return y.astype(np.float32, copy=False), extras
        if y.ndim == 4 and y.shape[2:] == (1, 1):
            m.squeeze = True
            y = y[:, :, 0, 0]
        if y.ndim != 2 or y.shape[0] != n:
            raise TransferSetError(f"{m.path}: output {m.output_name!r} has shape {y.shape}; expected [N, C] or [N, C, 1, 1]")
        for name, e in zip(m.extra_outputs, extras):
            if e.ndim < 1 or e.shape[0] != n:
                raise TransferSetError(f"{m.path}: hint tensor {name!r} has shape {list(e.shape)}, not one row per "
                                       f"input row ({n}); choose a tensor with the batch axis first", option="hint")
        return y.astype(np.float32, copy=False), extras

    def run(self, feeds: dict, first_row: int = 0) -> np.ndarray:
        """Run every member on prepared ``feeds``; returns [N, M, C] float32."""
        return self.run_with_hints(feeds, first_row)[0]

    def run_with_hints(self, feeds: dict, first_row: int = 0) -> tuple[np.ndarray, list[np.ndarray]]:
        """``run``, and each hint tensor's raw values ``[N, *tensor_shape]``, in the order of ``self.hints``."""
        bound = {}
        if self.cuda_id is not None:
            for key, x in feeds.items():
                if all(m.fixed_batch in (None, x.shape[0]) for m in self.members):
                    bound[key] = self._ort.OrtValue.ortvalue_from_numpy(x, "cuda", self.cuda_id)
        outs, extra = [], {}
        for i, m in enumerate(self.members):
            key = (m.input_dtype.str, m.row_shape)
            y, extras = self._run_member(m, feeds[key], bound.get(key))
            extra.update({(i, name): e for name, e in zip(m.extra_outputs, extras)})
            if not np.all(np.isfinite(y)):
                bad = int(np.argwhere(~np.isfinite(y))[0][0])
                raise TransferSetError(f"{m.path}: the teacher emitted NaN or Inf for row {first_row + bad}; "
                                       "check its preprocessing (scale, mean, std) or the model", FAILED)
            if m.output_kind is None:
                m.output_kind = "probabilities" if looks_like_probabilities(y) else "logits"
            if m.output_kind == "probabilities":
                if np.any(y < 0):
                    raise TransferSetError(f"probabilities, but {m.path} emitted negative values; use logits",
                                           option="output_kind")
                y = probabilities_to_logits(y)
            outs.append(y)
        if len({y.shape[1:-1] for y in outs}) != 1:
            detail = ", ".join(f"{m.path.name}: {y.shape[1]}" for m, y in zip(self.members, outs))
            raise TransferSetError(f"the members disagree on the number of frames a row ({detail}); a per-frame "
                                   "ensemble needs one frame rate", option="ensemble")
        classes = {y.shape[-1] for y in outs}
        if len(classes) != 1:
            detail = ", ".join(f"{m.path.name}: {y.shape[-1]}" for m, y in zip(self.members, outs))
            raise TransferSetError(f"the members disagree on the number of classes ({detail}); an ensemble needs one label space")
        c = classes.pop()
        if self.num_classes is None:
            self.num_classes = c
        elif c != self.num_classes:
            raise TransferSetError(f"the ensemble emitted {c} classes, earlier batches had {self.num_classes}")
        return np.stack(outs, axis=1), [extra[(h.member, h.tensor)] for h in self.hints]
