"""A training run's folder: config.json, metrics.jsonl, checkpoint.pt and student.pt, each written atomically."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .._io import append_line, atomic_write, atomic_write_bytes, atomic_write_json
from ..errors import TransferSetError
from ..format.manifest import manifest_hash
from ..format.schema import Manifest
from .options import result_options
from .students import export_onnx

__all__ = ["RunFolder", "CHECKPOINT", "RUN_FILES"]

CHECKPOINT = "checkpoint.pt"
#: what marks a folder as holding a run worth keeping: trained weights (config.json and metrics.jsonl alone are
#: the debris of a run that failed before its first checkpoint, which a new run may replace)
RUN_FILES = (CHECKPOINT, "student.pt")


# -- the run folder ---------------------------------------------------------------------------------------------
def _atomic_save(obj, path: Path) -> None:
    """``torch.save`` through the one atomic writer (temporary sibling, fsync, rename)."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


class RunFolder:
    """A run's folder: ``config.json``, ``metrics.jsonl``, ``checkpoint.pt`` and ``student.pt``.

    Every file is written by rank 0 alone (``lead``), atomically; metrics lines are appended with an fsync.
    """

    def __init__(self, path: str | os.PathLike, lead: bool = True) -> None:
        self.path = Path(path)
        self.lead = lead
        self.checkpoint_path = self.path / CHECKPOINT
        self.metrics_path = self.path / "metrics.jsonl"
        self.student_path = self.path / "student.pt"

    def refuse_other_run(self, resume: bool, overwrite: bool) -> None:
        """Refuse a folder that holds a run already unless it is resumed or overwritten; nothing is removed here
        (an overwritten run's files go only once the new run has started, see :meth:`clear_previous`)."""
        held = [n for n in RUN_FILES if (self.path / n).exists()]
        if held and not (resume or overwrite):
            raise TransferSetError(f"{self.path}: holds a run already ({', '.join(held)}); continue it with resume, "
                                   "start over with overwrite, or choose another folder", option="out")

    def create(self) -> None:
        if self.lead:
            try:
                self.path.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise TransferSetError(f"{self.path}: cannot create the folder ({e.strerror or e})", option="out") from None

    def load_checkpoint(self, device: torch.device) -> dict | None:
        """The checkpoint (loaded with ``weights_only=True``), or None when there is none."""
        if not self.checkpoint_path.exists():
            return None
        try:
            return torch.load(self.checkpoint_path, map_location=device, weights_only=True)
        except Exception as e:
            raise TransferSetError(f"{self.checkpoint_path}: unreadable checkpoint ({str(e).splitlines()[0][:200]}); "
                                   "delete it to start over") from None

    def check_resumable(self, config: dict, saved: dict) -> None:
        """Refuse a checkpoint made with options that change the result, another set or another world size."""
        keep = ("options", "manifest_hash", "input_norm", "world_size")
        now = {k: result_options(config[k]) if k == "options" else config[k] for k in keep}
        was = {k: result_options(saved[k]) if k == "options" else saved[k] for k in keep}
        if now != was:
            diff = sorted(k for k in now["options"] if now["options"].get(k) != was["options"].get(k))
            raise TransferSetError(f"{self.path}: the checkpoint there was made with other options or another "
                                   f"transfer set ({', '.join(diff) or 'transfer set / world size'}); choose another "
                                   "run folder, or start over without resuming", option="out")

    def write_config(self, config: dict) -> None:
        if self.lead:
            atomic_write_json(self.path / "config.json", config)

    def clear_previous(self) -> None:
        """A fresh run starts with none of an earlier run's files (config.json is rewritten next)."""
        if self.lead:
            for p in (self.metrics_path, self.checkpoint_path, self.student_path):
                p.unlink(missing_ok=True)

    def rewrite_metrics(self, history: list[dict]) -> None:
        """metrics.jsonl as ``history`` (a kill between a line and its checkpoint would leave a repeated line)."""
        if self.lead:
            atomic_write_bytes(self.metrics_path, "".join(json.dumps(h) + "\n" for h in history).encode())

    def append_metrics(self, line: dict) -> None:
        if self.lead:
            append_line(self.metrics_path, json.dumps(line))

    def save_checkpoint(self, state: dict) -> None:
        if self.lead:
            _atomic_save(state, self.checkpoint_path)

    def save_student(self, model: torch.nn.Module, manifest: Manifest, onnx_path: str | None,
                     device: torch.device, specialist: dict | None = None) -> None:
        """student.pt (weights and spec; a specialist's cluster too), and the ONNX export when asked for."""
        if not self.lead:
            return
        state = {"model": model.state_dict(), "student_spec": model.student_spec,
                 "num_classes": model.student_spec.get("num_classes", manifest.num_classes),
                 "manifest_hash": manifest_hash(manifest)}
        if specialist is not None:
            state["specialist"] = json.dumps(specialist)
        _atomic_save(state, self.student_path)
        if onnx_path:
            model.cpu()
            atomic_write(Path(onnx_path), lambda tmp: export_onnx(model, tmp, manifest.input["shape"],
                                                                  manifest.input["dtype"]))
            model.to(device)


# -- training ---------------------------------------------------------------------------------------------------
