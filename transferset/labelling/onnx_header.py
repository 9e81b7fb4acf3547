"""What ``label`` needs to know of an ONNX file before it opens a session, read without the onnx package.

An ONNX file is one protobuf ``ModelProto``. Its metadata (``producer_name``, ``producer_version``,
``opset_import``) and its graph's interface (the inputs, the outputs and their ranks and element types, the
initializers' names) are a few small fields; the weights are nearly all of the file. This module reads those
fields by walking the protobuf's wire format and seeking past everything else, so that a teacher of hundreds of
MB is never parsed or held whole, and ``label`` does not import the onnx package (about 0.65 s a process, most of
it ml_dtypes). The graph extensions (per-token and per-frame sets, hints) still use onnx: they rewrite graphs.

Any file whose top level does not walk (truncated, a group or an unknown wire type, a length past the end, a
name that is not UTF-8) raises :class:`HeaderError`; callers treat that as "not ONNX" and leave the verdict to
ONNX Runtime. Field numbers are onnx.proto's.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from typing import NamedTuple

__all__ = ["HeaderError", "ValueInfo", "GraphInterface", "model_meta", "graph_interface", "FLOAT_ELEM_TYPES"]

# ModelProto
_PRODUCER_NAME, _PRODUCER_VERSION, _GRAPH, _OPSET_IMPORT = 2, 3, 7, 8
# OperatorSetIdProto
_OPSET_DOMAIN, _OPSET_VERSION = 1, 2
# GraphProto
_INITIALIZER, _INPUT, _OUTPUT = 5, 11, 12
# TensorProto.name; ValueInfoProto.name / .type; TypeProto.tensor_type; TypeProto.Tensor.elem_type / .shape;
# TensorShapeProto.dim
_TENSOR_NAME, _VI_NAME, _VI_TYPE, _TENSOR_TYPE, _ELEM_TYPE, _SHAPE, _DIM = 8, 1, 2, 1, 1, 2, 1


#: onnx.TensorProto's element type numbers of the floating-point tensors a frame teacher may take
FLOAT_ELEM_TYPES = frozenset({1, 10, 11})  # FLOAT, FLOAT16, DOUBLE


class HeaderError(ValueError):
    """The file's protobuf does not walk (see the module docstring)."""


class ValueInfo(NamedTuple):
    """A graph input or output: its name, onnx.TensorProto's element type number and its rank (0 and 0 where it
    is not a tensor)."""

    name: str
    elem_type: int
    rank: int


@dataclass
class GraphInterface:
    """A graph's inputs and outputs (:class:`ValueInfo`), in declaration order, and its initializers' names."""

    inputs: list = field(default_factory=list)
    outputs: list = field(default_factory=list)
    initializers: set = field(default_factory=set)


def _varint(f) -> int:
    value = shift = 0
    while True:
        b = f.read(1)
        if not b:
            raise HeaderError("truncated varint")
        value |= (b[0] & 0x7F) << shift
        if not b[0] & 0x80:
            return value
        shift += 7
        if shift > 63:
            raise HeaderError("varint too long")


def _fields(f, end: int, read: set = frozenset(), spans: set = frozenset()) -> dict[int, list]:
    """The fields of the message lying in ``f`` from its position to ``end``: for a number in ``read`` each value
    in order (an int for a varint, as int64; the bytes of a length-delimited field), for one in ``spans`` each
    length-delimited field's ``(offset, size)``; everything else is skipped by its length."""
    out: dict[int, list] = {}
    while f.tell() < end:
        key = _varint(f)
        number, kind = key >> 3, key & 7
        if kind == 0:
            value = _varint(f)
            if number in read:
                out.setdefault(number, []).append(value - (1 << 64) if value >= 1 << 63 else value)
        elif kind == 2:
            size = _varint(f)
            at = f.tell()
            if size > end - at:  # checked before any read: a crafted length reads nothing
                raise HeaderError("a field runs past its message")
            if number in read:
                out.setdefault(number, []).append(f.read(size))
            else:
                if number in spans:
                    out.setdefault(number, []).append((at, size))
                f.seek(at + size)
        elif kind in (1, 5):
            width = 8 if kind == 1 else 4
            if width > end - f.tell():
                raise HeaderError("a field runs past its message")
            f.seek(width, 1)
        else:
            raise HeaderError(f"wire type {kind}")
    if f.tell() != end:
        raise HeaderError("a field runs past its message")
    return out


def _sub(data, read: set) -> dict[int, list]:
    if not isinstance(data, bytes):  # a message field written with another wire type
        raise HeaderError("a message field that is not length-delimited")
    return _fields(io.BytesIO(data), len(data), read)


def _text(data) -> str:
    if not isinstance(data, bytes):
        raise HeaderError("a string field that is not length-delimited")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise HeaderError("a name that is not UTF-8") from None


def _int(value) -> int:
    if not isinstance(value, int):
        raise HeaderError("an integer field that is length-delimited")
    return value


def _open(path: str | os.PathLike):
    f = open(path, "rb")  # noqa: SIM115 (closed by the callers' with)
    end = f.seek(0, 2)
    f.seek(0)
    return f, end


def model_meta(path: str | os.PathLike) -> tuple[int | None, str]:
    """``(opset, producer)``: the version of the first ``opset_import`` entry of the default domain ("" or
    "ai.onnx"; None if there is none) and ``"producer_name producer_version"`` stripped."""
    f, end = _open(path)
    with f:
        top = _fields(f, end, read={_PRODUCER_NAME, _PRODUCER_VERSION, _OPSET_IMPORT})
    opset = None
    for entry in top.get(_OPSET_IMPORT, []):
        sub = _sub(entry, {_OPSET_DOMAIN, _OPSET_VERSION})
        domain = _text(sub[_OPSET_DOMAIN][-1]) if _OPSET_DOMAIN in sub else ""
        if domain in ("", "ai.onnx"):
            opset = _int(sub[_OPSET_VERSION][-1]) if _OPSET_VERSION in sub else 0
            break
    name = _text(top[_PRODUCER_NAME][-1]) if _PRODUCER_NAME in top else ""
    version = _text(top[_PRODUCER_VERSION][-1]) if _PRODUCER_VERSION in top else ""
    return opset, f"{name} {version}".strip()


def _value_info(data: bytes) -> ValueInfo:
    vi = _sub(data, {_VI_NAME, _VI_TYPE})
    name = _text(vi[_VI_NAME][-1]) if _VI_NAME in vi else ""
    elem, rank = 0, 0
    if _VI_TYPE in vi:
        ty = _sub(vi[_VI_TYPE][-1], {_TENSOR_TYPE})
        if _TENSOR_TYPE in ty:
            tensor = _sub(ty[_TENSOR_TYPE][-1], {_ELEM_TYPE, _SHAPE})
            elem = _int(tensor[_ELEM_TYPE][-1]) if _ELEM_TYPE in tensor else 0
            if _SHAPE in tensor:
                rank = len(_sub(tensor[_SHAPE][-1], {_DIM}).get(_DIM, []))
    return ValueInfo(name, elem, rank)


def graph_interface(path: str | os.PathLike) -> GraphInterface:
    """The main graph's inputs, outputs and initializer names (the weights themselves are skipped)."""
    f, end = _open(path)
    with f:
        top = _fields(f, end, spans={_GRAPH})
        out = GraphInterface()
        for at, size in top.get(_GRAPH, []):  # a repeated message field is merged: every occurrence counts
            f.seek(at)
            g = _fields(f, at + size, read={_INPUT, _OUTPUT}, spans={_INITIALIZER})
            out.inputs += [_value_info(v) for v in g.get(_INPUT, [])]
            out.outputs += [_value_info(v) for v in g.get(_OUTPUT, [])]
            for t_at, t_size in g.get(_INITIALIZER, []):
                f.seek(t_at)
                names = _fields(f, t_at + t_size, read={_TENSOR_NAME}).get(_TENSOR_NAME, [b""])
                out.initializers.add(_text(names[-1]))
    return out
