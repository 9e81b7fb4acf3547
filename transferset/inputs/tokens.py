"""Token rows for language-model teachers: pre-tokenized ids, or raw text packed with a tokenizer.

Two sources, one result (:class:`TokenRows`: ids [N, L], each row's real length, a description for the manifest):

- ``--data ids.npy`` (also ``.npz``, ``.h5[:dataset]``, or ``.parquet[:column]`` with one list of ids per row):
  integer ids [N, L]; every position is real (no padding).
- ``--text FILE`` (``.txt``: documents separated by blank lines; ``.jsonl``: one JSON object per line, the
  document in ``--text-field``; ``.parquet[:column]``: one document per row) with ``--tokenizer tokenizer.json``
  (the ``tokenizers`` package, offline) and ``--seq-len L``. The packing rule: every document tokenized, joined
  into one stream with the tokenizer's end-of-text id *between* documents, and cut into rows of L; the last row
  is padded with the pad id (the end-of-text id when the tokenizer has none) and its ``length`` says where the
  real tokens end.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import TransferSetError
from ..format.schema import index_dtype

__all__ = ["TokenRows", "open_ids", "pack_text", "open_token_rows", "token_labels", "decoder_input_roles", "EOT_NAMES",
           "PAD_NAMES"]

EOT_NAMES = ("<|endoftext|>", "</s>", "<eos>", "[SEP]", "<|end_of_text|>")
PAD_NAMES = ("<|pad|>", "<pad>", "[PAD]")


@dataclass
class TokenRows:
    """Rows of token ids [N, L] and the real positions of each row (``length``, the rest padding)."""

    ids: np.ndarray
    length: np.ndarray
    describe: dict[str, Any]
    fingerprint: str
    vocab: int | None = None  #: the tokenizer's vocabulary, when a tokenizer made the rows
    extra: dict = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return int(self.ids.shape[0])

    @property
    def positions(self) -> int:
        return int(self.ids.shape[1])


def token_labels(ids: np.ndarray, length: np.ndarray) -> np.ndarray:
    """The hard label of every position [N, L] int32: token j + 1, -1 at the last real position and under padding."""
    n, seq = ids.shape
    out = np.full((n, seq), -1, dtype=np.int32)
    if seq > 1:
        out[:, :-1] = ids[:, 1:]
    out[np.arange(seq)[None, :] >= (np.asarray(length)[:, None] - 1)] = -1
    return out


def decoder_input_roles(model, option: str = "ensemble") -> dict[str, str]:
    """The role of each graph input of a decoder ONNX ``model`` (``input_ids``, ``attention_mask``,
    ``position_ids``): inputs named like a mask or positions take those roles; the one other input takes the ids.

    ``labelling.lm_graph.token_inputs`` (labelling's joined graph) uses it too; ``option`` names the option that
    gave the model, for the message."""
    init = {i.name for i in model.graph.initializer}
    roles: dict[str, str] = {}
    for inp in model.graph.input:
        if inp.name in init:
            continue
        low = inp.name.lower()
        role = "attention_mask" if "mask" in low else "position_ids" if "position" in low else "input_ids"
        if role in roles.values():
            raise TransferSetError(f"has two inputs that look like {role} ({inp.name!r}); a decoder takes input_ids "
                                   "and optionally attention_mask and position_ids", option=option)
        roles[inp.name] = role
    if "input_ids" not in roles.values():
        raise TransferSetError("has no input_ids input; a decoder takes int ids [batch, length]", option=option)
    return roles


def _sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _stored_ids(ids: np.ndarray, vocab: int | None, where: str) -> np.ndarray:
    if ids.size and (ids.min() < 0):
        raise TransferSetError(f"{where}: holds a negative token id ({int(ids.min())}); ids are 0 .. V-1",
                               option="data")
    top = int(ids.max()) + 1 if ids.size else 1
    return np.ascontiguousarray(ids, dtype=index_dtype(max(top, vocab or 0)))


def _parquet_column(path: Path, column: str | None, option: str) -> list:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise TransferSetError(f"{path}: reading Parquet needs pyarrow; install the 'parquet' extra "
                               "(pip install 'transferset[parquet]')", option=option) from None
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises its own types for a damaged file
        raise TransferSetError(f"{path}: not a readable Parquet file ({str(e)[:200]})", option=option) from None
    name = column or table.column_names[0]
    if name not in table.column_names:
        raise TransferSetError(f"{path}: has no column {name!r} (it has {', '.join(table.column_names)})",
                               option=option)
    return table.column(name).to_pylist()


def open_ids(spec: str, limit: int | None = None) -> TokenRows:
    """Pre-tokenized ids [N, L] from ``.npy``/``.npz``/``.h5`` (any array source) or ``.parquet[:column]``."""
    path_s, _, key = str(spec).partition(":") if str(spec).split(":")[0].endswith(".parquet") else (str(spec), "", "")
    if path_s.endswith(".parquet"):
        path = Path(path_s)
        if not path.is_file():
            raise TransferSetError(f"{path}: no such file", option="data")
        col = _parquet_column(path, key or None, "data")
        lengths = {len(r) for r in col if r is not None}
        if None in col or len(lengths) != 1:
            raise TransferSetError(f"{path}: rows of ids must all have one length (got {sorted(lengths)[:5]})",
                                   option="data")
        ids = np.asarray(col, dtype=np.int64)
        fingerprint = _sha(path)
    else:
        from .sources import open_source

        src = open_source(spec, limit=limit)
        if len(src.row_shape) != 1 or np.dtype(src.dtype).kind not in "iu":
            raise TransferSetError(f"{spec}: token ids must be integers [rows, length]; got {np.dtype(src.dtype)} "
                                   f"rows of shape {tuple(src.row_shape)}", option="data")
        ids = src.read(0, src.rows)
        fingerprint = src.fingerprint()
    if limit is not None:
        ids = ids[:limit]
    if ids.ndim != 2 or ids.shape[1] < 1 or ids.shape[0] < 1:
        raise TransferSetError(f"{spec}: token ids must be [rows, length] with at least one of each, got "
                               f"{ids.shape}", option="data")
    ids = _stored_ids(ids, None, str(spec))
    return TokenRows(ids, np.full(len(ids), ids.shape[1], dtype=np.int32),
                     {"data": str(spec), "format": "token-ids", "rows": int(len(ids)), "total_rows": int(len(ids)),
                      "limit": limit, "row_shape": [int(ids.shape[1])], "dtype": ids.dtype.name},
                     fingerprint)


def _documents(path: Path, text_field: str) -> list[str]:
    name = path.name.lower()
    try:
        if name.endswith(".jsonl") or name.endswith(".json"):
            docs = []
            for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
                if not line.strip():
                    continue
                obj = json.loads(line)
                if not isinstance(obj, dict) or not isinstance(obj.get(text_field), str):
                    raise TransferSetError(f"{path}: line {i + 1} has no string field {text_field!r}",
                                           option="text_field")
                docs.append(obj[text_field])
            return docs
        if name.endswith(".txt"):
            text = path.read_text(encoding="utf-8")
            return [d.strip("\n") for d in text.replace("\r\n", "\n").split("\n\n") if d.strip()]
    except (UnicodeDecodeError, ValueError) as e:
        raise TransferSetError(f"{path}: not UTF-8 text / JSON lines ({str(e)[:120]})", option="text") from None
    raise TransferSetError(f"{path}: give a .txt, .jsonl or .parquet[:column] file", option="text")


def load_tokenizer(path: str | os.PathLike):
    """A ``tokenizers`` tokenizer from its tokenizer.json (no network)."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise TransferSetError("needs the tokenizers package; install the 'text' extra "
                               "(pip install 'transferset[text]')", option="tokenizer") from None
    p = Path(path)
    if not p.is_file():
        raise TransferSetError(f"{p}: no such file", option="tokenizer")
    try:
        return Tokenizer.from_file(str(p))
    except Exception as e:  # the Rust side raises its own exception type
        raise TransferSetError(f"{p}: not a tokenizers tokenizer.json ({str(e)[:160]})", option="tokenizer") from None


def _special(tok, names: tuple[str, ...]) -> int | None:
    for n in names:
        i = tok.token_to_id(n)
        if i is not None:
            return int(i)
    return None


def pack_text(text: str, tokenizer: str | os.PathLike, seq_len: int, text_field: str = "text",
              limit: int | None = None) -> TokenRows:
    """Tokenize the documents of ``text`` and pack them into rows of ``seq_len`` (see the module docstring)."""
    if seq_len is None or int(seq_len) < 2:
        raise TransferSetError(f"must be at least 2, got {seq_len}", option="seq_len")
    tok = load_tokenizer(tokenizer)
    spec = str(text)
    path_s, _, column = spec.partition(":") if spec.split(":")[0].lower().endswith(".parquet") else (spec, "", "")
    path = Path(path_s)
    if not path.is_file():
        raise TransferSetError(f"{path}: no such file", option="text")
    docs = _parquet_column(path, column or text_field, "text") if path_s.lower().endswith(".parquet") \
        else _documents(path, text_field)
    eot = _special(tok, EOT_NAMES)
    if eot is None:
        raise TransferSetError(f"{tokenizer}: has no end-of-text token ({', '.join(EOT_NAMES)}); documents are "
                               "packed with it between them", option="tokenizer")
    pad = _special(tok, PAD_NAMES)
    pad = eot if pad is None else pad
    stream: list[int] = []
    for i, d in enumerate(tok.encode_batch([str(d) for d in docs if d])):
        if i:
            stream.append(eot)
        stream += d.ids
    if not stream:
        raise TransferSetError(f"{path}: holds no text", option="text")
    seq_len = int(seq_len)
    n = -(-len(stream) // seq_len)
    ids = np.full(n * seq_len, pad, dtype=np.int64)
    ids[:len(stream)] = stream
    ids = ids.reshape(n, seq_len)
    length = np.full(n, seq_len, dtype=np.int32)
    length[-1] = len(stream) - (n - 1) * seq_len
    if limit is not None:
        ids, length = ids[:limit], length[:limit]
    vocab = int(tok.get_vocab_size())
    ids = _stored_ids(ids, vocab, str(path))
    tok_sha = _sha(Path(tokenizer))
    describe = {"data": spec, "format": "text", "rows": int(len(ids)), "total_rows": int(n), "limit": limit,
                "row_shape": [seq_len], "dtype": ids.dtype.name, "text_field": text_field,
                "tokenizer": {"file": Path(tokenizer).name, "sha256": tok_sha, "vocab_size": vocab,
                              "special_ids": {"end_of_text": eot, "pad": pad}},
                "packing": f"documents joined with id {eot} between them, cut into rows of {seq_len}; the last row "
                           f"padded with id {pad} (its length says where the text ends)",
                "documents": len(docs), "tokens": len(stream)}
    fingerprint = hashlib.sha256(f"{_sha(path)}:{tok_sha}:{seq_len}:{text_field}".encode()).hexdigest()
    return TokenRows(ids, length, describe, fingerprint, vocab)


def open_token_rows(data: str | None = None, text: str | None = None, tokenizer: str | None = None,
                    seq_len: int | None = None, text_field: str = "text", limit: int | None = None, *,
                    option: str = "data"):
    """Token rows from ids (``data``) or from ``text`` packed with ``tokenizer``."""
    if text is not None:
        if tokenizer is None:
            raise TransferSetError("is needed to tokenize text (a tokenizers tokenizer.json)", option="tokenizer")
        return pack_text(text, tokenizer, seq_len, text_field, limit)
    if data is None:
        raise TransferSetError("is needed: token ids or text", option=option)
    return open_ids(str(data), limit)
