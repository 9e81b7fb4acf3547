"""Device choice, once for both stages: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``, honouring ``LOCAL_RANK``.

Under torchrun (or any launcher that sets ``LOCAL_RANK``), ``auto`` and a bare ``cuda`` mean this process's GPU,
``cuda:LOCAL_RANK`` (modulo the devices present), so N processes on one machine use N GPUs without each naming
its own. Nothing here imports torch or ONNX Runtime at module level: the CUDA check asks the driver directly, so
a CPU-only machine never sees provider error spam.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass

from .errors import TransferSetError
from .wording import plural

__all__ = ["Device", "parse_device", "cuda_usable", "cuda_device_count", "local_rank", "torch_device",
           "ort_providers", "session_options"]


@dataclass(frozen=True)
class Device:
    """A resolved device: ``kind`` is ``cpu`` or ``cuda``; ``index`` is the GPU number (None on CPU)."""

    kind: str
    index: int | None = None

    def __str__(self) -> str:
        return self.kind if self.index is None else f"{self.kind}:{self.index}"


def _driver():
    for name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    return None


def cuda_device_count() -> int:
    """GPUs the CUDA driver reports (0 when there is no driver or it fails to start)."""
    lib = _driver()
    if lib is None:
        return 0
    try:
        if lib.cuInit(0) != 0:
            return 0
        count = ctypes.c_int(0)
        return count.value if lib.cuDeviceGetCount(ctypes.byref(count)) == 0 else 0
    except AttributeError:
        return 0


def cuda_usable() -> bool:
    """True only when a CUDA driver is loadable and reports at least one device."""
    return cuda_device_count() > 0


def local_rank() -> int | None:
    """This process's ``LOCAL_RANK`` under a launcher, else None."""
    v = os.environ.get("LOCAL_RANK")
    try:
        return int(v) if v is not None else None
    except ValueError:
        return None


def parse_device(spec: str | None, *, gpus: int | None = None) -> Device:
    """Resolve ``spec`` to a :class:`Device`; ``gpus`` overrides the driver's count (for tests and torch)."""
    spec = (spec or "auto").strip().lower()
    n = cuda_device_count() if gpus is None else gpus
    if spec == "cpu":
        return Device("cpu")
    if spec == "auto" and n == 0:
        return Device("cpu")
    if spec in ("auto", "cuda"):
        if n == 0:
            raise TransferSetError(f"{spec}: no usable CUDA GPU here; use cpu or auto", option="device")
        return Device("cuda", (local_rank() or 0) % n)
    if spec.startswith("cuda:"):
        try:
            idx = int(spec.split(":", 1)[1])
        except ValueError:
            raise TransferSetError(f"{spec!r}: expected auto, cpu, cuda or cuda:N", option="device") from None
        if n == 0:
            raise TransferSetError(f"{spec}: no usable CUDA GPU here; use cpu or auto", option="device")
        if not 0 <= idx < n:
            raise TransferSetError(f"{spec}: this machine has {plural(n, 'GPU')}, numbered 0 to {n - 1}", option="device")
        return Device("cuda", idx)
    raise TransferSetError(f"{spec!r}: expected auto, cpu, cuda or cuda:N", option="device")


def torch_device(spec: str | None):
    """The ``torch.device`` for ``spec`` (asks torch, not the driver, how many GPUs it can use)."""
    import torch

    d = parse_device(spec, gpus=torch.cuda.device_count() if torch.cuda.is_available() else 0)
    return torch.device(d.kind, d.index) if d.index is not None else torch.device("cpu")


def ort_providers(spec: str | None) -> tuple[list, int | None]:
    """ONNX Runtime providers for ``spec``: ``(providers, cuda_device_id or None)``.

    The CUDA provider is asked for only when ONNX Runtime has it and the driver reports a GPU; ``auto`` falls back
    to the CPU quietly, an explicit ``cuda`` without either is refused.
    """
    import onnxruntime as ort

    has_provider = "CUDAExecutionProvider" in ort.get_available_providers()
    if not has_provider and (spec or "auto").strip().lower().startswith("cuda"):
        raise TransferSetError(f"{spec}: this onnxruntime has no CUDA provider (pip install onnxruntime-gpu); use cpu "
                               "or auto", option="device")
    d = parse_device(spec, gpus=cuda_device_count() if has_provider else 0)
    if d.kind == "cpu":
        return ["CPUExecutionProvider"], None
    return [("CUDAExecutionProvider", {"device_id": d.index}), "CPUExecutionProvider"], d.index


def session_options(threads: int | None = None):
    """ONNX Runtime SessionOptions that let several sessions share a CPU: spinning off, one intra-op pool size."""
    import onnxruntime as ort

    ort.set_default_logger_severity(3)  # keep provider probing quiet on CPU-only machines
    so = ort.SessionOptions()
    so.intra_op_num_threads = int(threads or os.cpu_count() or 1)
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    so.log_severity_level = 3
    return so
