"""float32 -> float16 at memory speed, for the fields a set stores in float16.

numpy's ``astype(np.float16)`` converts about one value every 3 ns (no F16C path); ONNX Runtime's ``Cast`` takes
about 0.1 ns, and both round the same way (to nearest, ties to even; subnormals kept, overflow to infinity, NaN
kept), so the stored bytes do not depend on which one ran (tests/test_targets.py checks it bit for bit). At 1,000
classes the cast was more of the writer's time than the soft targets' maths.
"""

from __future__ import annotations

import threading

import numpy as np

__all__ = ["to_float16", "cast_stored"]

_LOCK = threading.Lock()
_SESSION: list = []  # one session a process, made on first use (pickled workers make their own)
_SMALL = 4096  # values below which numpy is quicker than a session call


#: the one-node model ``Cast(float32 -> float16)`` (opset 13, IR 7), serialised: what ``onnx.helper`` builds
#: for it (tests/test_targets.py compares), kept as bytes so that labelling never imports the onnx package
#: (about 0.65 s of every ``transferset label`` process, most of it ml_dtypes)
CAST_MODEL = bytes.fromhex("08073a350a170a01781201792204436173742a090a02746f180aa00102120468616c665a090a01781204"
                           "0a02080162090a017912040a02080a42040a00100d")


def _session():
    with _LOCK:
        if not _SESSION:
            import onnxruntime as ort

            from .ensemble import session_options

            _SESSION.append(ort.InferenceSession(CAST_MODEL, session_options(1), providers=["CPUExecutionProvider"]))
        return _SESSION[0]


def to_float16(a: np.ndarray) -> np.ndarray:
    """``a`` as float16, rounded exactly as ``a.astype(np.float16)`` rounds (ONNX Runtime for float32 arrays)."""
    a = np.asarray(a)
    if a.dtype != np.float32 or a.size < _SMALL:
        return a.astype(np.float16)
    return _session().run(None, {"x": np.ascontiguousarray(a)})[0]


def cast_stored(arrays: dict[str, np.ndarray], layout: dict[str, tuple[tuple, np.dtype]]) -> dict[str, np.ndarray]:
    """Each of ``arrays`` in the dtype ``layout`` (``schema.shard_layout``) stores it in, float16 through
    :func:`to_float16`."""
    out = {}
    for name, a in arrays.items():
        dt = layout[name][1] if name in layout else a.dtype
        out[name] = to_float16(a) if dt == np.float16 and a.dtype != np.float16 else a.astype(dt, copy=False)
    return out
