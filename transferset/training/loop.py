"""Stage 2: train a small student from a transfer set's shards, with no teacher in memory.

The student sees only the manifest and the shards (or, for sets without stored inputs, inputs replayed from the
source). Distributed training goes through ``torchrun`` and DDP: every rank reads its own slice of the epoch plan.

The run in parts: :func:`process_group` (made and ended here under torchrun), :func:`open_training_data` (every
manifest and shard check and the memory estimate, before the student is built), :func:`build_optimizer` (with
:func:`warmup_cosine`) and :class:`Trainer` (resume, one epoch, one step). The options are
:class:`~.options.TrainOptions` (training/options.py) and the run folder :class:`~.run_folder.RunFolder`
(training/run_folder.py: config.json, metrics.jsonl, checkpoint.pt, student.pt, all through :mod:`transferset._io`'s
one atomic writer).
"""

from __future__ import annotations

import gc
import json
import math
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from ..devices import torch_device
from ..errors import FAILED, TransferSetError
from ..format.manifest import manifest_hash
from ..format.parts import read_manifest
from ..format.schema import Manifest, source_format
from ..inputs.photos import open_scored_source
from ..inputs.replay import photo_transform
from ..inputs.sources import read_labels
from ..progress import progress_bar
from .holdout import HoldOut, held_out_rows, open_holdout, skipped_only
from .hint_losses import HintLosses, parse_hint_loss
from .sparse_losses import sparse_training
from .token_losses import token_training
from .losses import add_teacher_noise, build_loss, mean_logits, teacher_log_probs
from .options import TrainOptions, TrainResult
from .reader import InMemoryBatches, TransferSetDataset, fits_in_memory, load_in_memory, loader_batches
from .frame_scoring import frame_source_metrics, is_frame_set
from .run_folder import RunFolder
from .scoring import onnx_token_logits, source_metrics, token_metrics, torch_log_probs, torch_token_logits
from .students import check_positions, count_parameters, create_student

__all__ = ["TrainOptions", "TrainResult", "train_student", "process_group", "TrainingData", "open_training_data",
           "build_optimizer", "fused", "warmup_cosine", "RunFolder", "Trainer"]




@contextmanager
def process_group(device: torch.device) -> Iterator[tuple[int, int]]:
    """``(world_size, rank)``; under torchrun, the process group is made here when the caller has not made one.

    A group made here is also ended here: every rank waits for the others, so none exits while gloo's threads
    still serve a peer (which aborted a rank with "terminate called without an active exception").
    """
    owns = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        live = dist.is_initialized()
        yield (dist.get_world_size(), dist.get_rank()) if live else (1, 0)
        if owns and dist.is_initialized():
            dist.barrier()
    finally:
        if owns and dist.is_initialized():
            dist.destroy_process_group()


# -- the training data ------------------------------------------------------------------------------------------
def _input_norm(o: TrainOptions, manifest: Manifest) -> tuple[float, float, float]:
    """The student's input normalisation: the options, else the teachers' preprocessing, else 1/255 for bytes."""
    pre = manifest.preprocess or {}
    scale = o.input_scale if o.input_scale is not None else pre.get("scale")
    if scale is None:
        scale = 1.0 / 255.0 if manifest.input["dtype"] == "uint8" else 1.0
    mean = o.input_mean if o.input_mean is not None else _scalar(pre.get("mean"), 0.0)
    std = o.input_std if o.input_std is not None else _scalar(pre.get("std"), 1.0)
    return float(scale), float(mean), float(std)


def _scalar(v, default: float) -> float:
    if v is None:
        return default
    if isinstance(v, list):
        return float(np.mean(v)) if v else default
    return float(v)


class _Targets:
    """Turns a batch into the loss's teacher input: stored soft targets, or logits recombined/noised."""

    def __init__(self, o: TrainOptions, manifest: Manifest, device: torch.device) -> None:
        self.o = o
        self.rule = o.combine or manifest.combine
        self.weights = torch.tensor(manifest.weights, dtype=torch.float32, device=device)
        self.stored_t = manifest.temperature_index(o.temperature)
        self.generator = None
        if o.teacher_noise > 0:
            self.generator = torch.Generator(device=device).manual_seed(o.seed + 7919)
        if o.alpha == 0:
            self.fields = ("inputs", "labels")
        elif o.loss == "logit-mse" or o.teacher_noise > 0 or self.stored_t is None or self.rule != manifest.combine:
            self.fields = ("inputs", "logits", "labels")
        else:
            self.fields = ("inputs", "soft_targets", "labels")
        self.temperature = o.temperature if "soft_targets" in self.fields else None

    def __call__(self, batch: dict) -> torch.Tensor | None:
        if self.o.alpha == 0:
            return None
        if "soft_targets" in batch:
            return batch["soft_targets"]
        z = batch["logits"]
        if self.generator is not None:
            z = add_teacher_noise(z, self.o.teacher_noise, self.generator)
        if self.o.loss == "logit-mse":
            return mean_logits(z, self.weights)
        return teacher_log_probs(z, self.o.temperature, self.rule, self.weights)


@dataclass
class TrainingData:
    """The opened training data: a reader (in memory or streaming shards) and how one epoch is iterated."""

    reader: InMemoryBatches | TransferSetDataset
    in_memory: bool
    seed: int
    loader_kw: dict = field(default_factory=dict)
    holdout: HoldOut | None = None  #: the held-out rows the student is scored on
    exclude: HoldOut | None = None  #: rows kept out of training: held out, or of files that could not be decoded

    def __len__(self) -> int:
        return len(self.reader)

    def batches(self) -> Iterator[dict[str, torch.Tensor]]:
        """The current epoch's remaining batches (see the reader's ``set_epoch`` and ``mark_consumed``)."""
        if self.in_memory:
            return iter(self.reader)
        # a private generator: a DataLoader iterator otherwise draws its seed from the global RNG, which would
        # shift dropout's random stream between an interrupted-and-resumed run and an uninterrupted one
        if self.loader_kw.get("num_workers"):
            # collect garbage before the workers fork: an object freed in a child instead (an ONNX Runtime session
            # of an earlier `label` in this process, say) can hang it (labelling.ensemble.Ensemble.close)
            gc.collect()
        loader = DataLoader(self.reader, generator=torch.Generator().manual_seed(self.seed), **self.loader_kw)
        if self.exclude is not None:  # the streamed plan keeps its shape; excluded rows are masked out
            return map(self.exclude.mask_batch, loader_batches(loader))
        return loader_batches(loader)


def open_training_data(root: Path, manifest: Manifest, o: TrainOptions, targets: _Targets, device: torch.device,
                       world: int, rank: int) -> TrainingData:
    """The set loaded once (``in_memory`` yes, or auto within the memory budget) or streamed from its shards.

    Either way every shard is checked here (and re-hashed with ``verify``), before any student is built.
    """
    fields, temperature = targets.fields, targets.temperature
    skipped = manifest.skipped_rows()  # a photo set's rows of files that could not be decoded: never trained on
    holdout = open_holdout(root, o.holdout, o.seed, skip_bad_shards=o.skip_bad_shards, skipped=skipped) \
        if o.holdout else None
    exclude = holdout if holdout is not None else skipped_only(skipped) if len(skipped) else None
    in_memory = o.in_memory == "yes" or (
        o.in_memory == "auto" and fits_in_memory(root, manifest, fields, temperature, o.memory_budget_mb << 20))
    if in_memory:
        tensors = load_in_memory(root, fields, temperature, device, verify=o.verify,
                                 skip_bad_shards=o.skip_bad_shards, source_override=o.source)
        if exclude is not None:
            tensors = exclude.drop_from(tensors)
        reader = InMemoryBatches(tensors, o.batch_size, o.seed, world, rank, manifest_hash=manifest_hash(manifest))
        return TrainingData(reader, True, o.seed, holdout=holdout, exclude=exclude)
    reader = TransferSetDataset(root, fields=fields, temperature=temperature, batch_size=o.batch_size, seed=o.seed,
                                world_size=world, rank=rank, verify=o.verify, skip_bad_shards=o.skip_bad_shards,
                                source_override=o.source, buffer_chunks=o.shuffle_chunks)
    loader_kw = dict(batch_size=None, num_workers=o.num_workers, pin_memory=device.type == "cuda")
    if o.num_workers > 0:
        loader_kw["prefetch_factor"] = 4
    return TrainingData(reader, False, o.seed, loader_kw, holdout, exclude)


def _open_eval(o: TrainOptions, manifest: Manifest, root: Path, data: TrainingData):
    """The evaluation source and its labels, or ``(None, None)``; with ``holdout``, the held-out rows.

    For a set labelled from photos, a photo folder or list is opened with the set's own transform and each photo
    is evaluated in its clean view (resize, centre crop), the view ``label`` makes and ``evaluate`` uses.
    """
    if data.holdout is not None:
        rows = held_out_rows(root, data.holdout, source_override=o.source, skip_bad_shards=o.skip_bad_shards)
        return rows, rows.labels
    if not o.eval_data:
        return None, None
    photos = photo_transform(manifest) if source_format(manifest) == "photos" else None
    src = open_scored_source(o.eval_data, photos, option="eval_data")
    labels = read_labels(o.eval_labels, rows=src.rows) if o.eval_labels else src.labels
    if labels is None:
        raise TransferSetError(f"is needed: {o.eval_data} carries no labels", option="eval_labels")
    return src, labels


def _open_frame_eval(o: TrainOptions, manifest: Manifest):
    """Per-frame sets: the evaluation rows (an array source) and their frame labels [N, T] (-1: none)."""
    if not o.eval_data:
        return None, None
    from ..inputs.sources import frame_labels, open_source

    if not o.eval_labels:
        raise TransferSetError("is needed: per-frame evaluation takes frame labels [rows, frames]", option="eval_labels")
    src = open_source(o.eval_data, option="eval_data")
    return src, frame_labels(o.eval_labels, src.rows, manifest.positions, manifest.num_classes)[0]


def _open_token_eval(o: TrainOptions, manifest: Manifest):
    """Per-position sets: the evaluation rows (ids, or text packed with ``tokenizer`` into the set's positions)."""
    if not o.eval_data:
        return None, None
    from ..inputs.tokens import open_token_rows

    if o.tokenizer is not None:
        return open_token_rows(text=o.eval_data, tokenizer=o.tokenizer, seq_len=manifest.positions), None
    return open_token_rows(data=o.eval_data, option="eval_data"), None


def _evaluate_tokens(model, rows, o: TrainOptions) -> dict:
    ref = onnx_token_logits(o.reference) if o.reference else None
    return token_metrics(torch_token_logits(model), rows, ref=ref)


def _evaluate_student(model, source, labels, device, batch_size: int = 2048) -> dict:
    return source_metrics(torch_log_probs(model, source, device, batch_size), labels, source)


def _specialist_data(o: TrainOptions, root: Path, manifest: Manifest, device: torch.device, world: int, rank: int):
    """``(loss, targets, data, SpecialistData)`` of ``--specialist plan.json:I`` (always in memory)."""
    from .specialists import specialist_setup

    if o.holdout:
        raise TransferSetError("a specialist trains on its cluster's rows; evaluate it with --eval-data instead",
                               option="holdout")
    if o.loss != "kd" or o.teacher_noise > 0:
        raise TransferSetError("a specialist trains with kd on folded targets, without teacher noise; "
                               "leave the loss and the teacher noise at their defaults", option="specialist")
    spec = specialist_setup(o.specialist, root, manifest, o.temperature, o.alpha, o.combine, device,
                            memory_budget_mb=o.memory_budget_mb, source_override=o.source)
    reader = InMemoryBatches(spec.tensors, o.batch_size, o.seed, world, rank, manifest_hash=manifest_hash(manifest))
    targets = _FoldedTargets(o.alpha)
    return build_loss("kd", o.alpha, o.temperature), targets, TrainingData(reader, True, o.seed), spec


class _FoldedTargets:
    """A specialist's teacher input: the folded log-probabilities its in-memory tensors already hold."""

    generator = None

    def __init__(self, alpha: float) -> None:
        self.alpha = alpha

    def __call__(self, batch: dict) -> torch.Tensor | None:
        return batch["soft_targets"] if self.alpha > 0 else None


def _init_weights(model: torch.nn.Module, path: str, spec: str, classes: list[int] | None = None) -> None:
    """Start from another student's weights (``--init-from student.pt``): every tensor whose name and shape match.

    A specialist started from its generalist (as the paper does) also takes the generalist's output rows of its
    cluster's classes, and for its dustbin the mean of the other rows' weights and the log-sum-exp of their biases,
    so it starts close to the generalist's own view of the cluster rather than from a random head."""
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
        saved = ck["model"]
        saved_spec = ck["student_spec"]["spec"]
    except FileNotFoundError:
        raise TransferSetError(f"{path}: no such checkpoint", option="init_from") from None
    except Exception as e:
        raise TransferSetError(f"{path}: not a transferset student checkpoint ({str(e).splitlines()[0][:160]})",
                               option="init_from") from None
    if saved_spec != spec:
        raise TransferSetError(f"{path} holds a {saved_spec!r} student and this run trains {spec!r}; start from a "
                               f"checkpoint of a {spec!r} student", option="init_from")
    own = model.state_dict()
    taken = {k: v for k, v in saved.items() if k in own and tuple(own[k].shape) == tuple(v.shape)}
    if classes is not None:
        taken.update(_specialist_head(own, saved, classes))
    if not taken:
        raise TransferSetError(f"{path}: no tensor matches this student's", option="init_from")
    model.load_state_dict(taken, strict=False)


def _specialist_head(own: dict, saved: dict, classes: list[int]) -> dict:
    """The output layer of a specialist from its generalist's (the last weight/bias pair whose class axis is
    ``len(classes) + 1`` here and the generalist's class count there)."""
    k = len(classes)
    for name in reversed(list(own)):
        if not name.endswith("weight") or name not in saved or own[name].dim() != 2:
            continue
        bias = name[:-len("weight")] + "bias"
        w, sw = own[name], saved[name]
        if w.shape[0] != k + 1 or sw.shape[1] != w.shape[1] or bias not in saved or sw.shape[0] <= max(classes):
            continue
        rest = torch.ones(sw.shape[0], dtype=torch.bool)
        rest[classes] = False
        idx = torch.as_tensor(classes)
        sb = saved[bias]
        return {name: torch.cat([sw[idx], sw[rest].mean(0, keepdim=True)]),
                bias: torch.cat([sb[idx], torch.logsumexp(sb[rest], 0, keepdim=True)])}
    return {}


# -- optimiser and schedule -------------------------------------------------------------------------------------
def warmup_cosine(total_steps: int, warmup: float):
    """The learning-rate factor per step: linear warm-up over ``warmup`` of all steps, then cosine to 0."""
    warm = max(1, int(round(total_steps * warmup))) if warmup > 0 else 0

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, total_steps - warm)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def build_optimizer(model: torch.nn.Module, o: TrainOptions, total_steps: int):
    """``(optimizer, scheduler)``: AdamW (lr 1e-3) or Nesterov SGD (lr 0.05) by default, warm-up then cosine."""
    lr = o.lr if o.lr is not None else (0.05 if o.optimizer == "sgd" else 1e-3)
    if o.optimizer == "sgd":
        opt = fused(torch.optim.SGD, model, lr=lr, momentum=o.momentum, weight_decay=o.weight_decay, nesterov=True)
    else:
        opt = fused(torch.optim.AdamW, model, lr=lr, weight_decay=o.weight_decay)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(total_steps, o.warmup))


def fused(cls, model: torch.nn.Module, **kw) -> torch.optim.Optimizer:
    """``cls`` (AdamW or SGD) with its fused kernel where this torch has one for the parameters' device (CPU from
    torch 2.4, CUDA), else its default (for-each) implementation.

    The fused step updates every parameter in one pass instead of several for-each passes: for ``mlp:800,800``
    at batch 256 on 2 CPU cores, AdamW's step took 1.1 ms of CPU against 5.4 ms, a fifth of the whole training
    step (docs/BENCHMARKS.md). It is elementwise, so the result does not depend on the number of threads, and its
    state (``exp_avg``, ``momentum_buffer``, ...) is the same as the for-each optimizer's, so a checkpoint resumes
    with either."""
    params = [p for p in model.parameters()]
    try:
        return cls(params, fused=True, **kw)
    except (RuntimeError, TypeError, ValueError):  # no fused kernel for this device, dtype or torch version
        return cls(params, **kw)


# -- the run folder ---------------------------------------------------------------------------------------------
def _say_epoch(epoch: int, epochs: int, line: dict) -> None:
    """One line per epoch on stderr: the training loss and, with eval data, its errors, NLL and ECE."""
    parts = [f"epoch {epoch}/{epochs}", f"loss {line['loss']:.4f}"]
    if "eval_errors" in line:
        parts.append(f"eval errors {line['eval_errors']} / {line.get('eval_n', '?')}")
        if line.get("eval_skipped_files"):
            parts.append(f"{line['eval_skipped_files']} undecodable photos left out")
    for key in ("eval_nll", "eval_ece"):
        if key in line:
            parts.append(f"{key[5:].upper()} {line[key]:.4f}")
    if "eval_frame_accuracy" in line:
        parts.append(f"eval frame accuracy {line['eval_frame_accuracy']:.4f} ({line['eval_frame_errors']} of "
                     f"{line['eval_frames']} frames wrong)")
    if "eval_perplexity" in line:
        parts.append(f"eval perplexity {line['eval_perplexity']:.2f}, next-token accuracy {line['eval_accuracy']:.4f}")
    if "eval_reference_agreement" in line:
        parts.append(f"teacher agreement {line['eval_reference_agreement']:.4f}, KL to teacher "
                     f"{line['eval_kl_to_reference']:.4f}")
    print("train-student: " + ", ".join(parts), file=sys.stderr, flush=True)


class Trainer:
    """One run: the data opened and checked, then the student, its optimiser and the run folder; then epochs."""

    def __init__(self, o: TrainOptions, root: Path, manifest: Manifest, folder: RunFolder, device: torch.device,
                 world: int, rank: int) -> None:
        self.o, self.root, self.manifest, self.folder = o, root, manifest, folder
        self.device, self.world, self.rank = device, world, rank
        self.num_classes, specialist, hint_specs = manifest.num_classes, None, []
        self.positions = manifest.positions is not None  # a per-position set: per-token losses and metrics
        if o.specialist:  # a specialist: its cluster's rows, targets folded to the cluster's classes + a dustbin
            specialist = _specialist_data(o, root, manifest, device, world, rank)
            self.loss_fn, self.targets, self.data = specialist[:3]
            self.num_classes = specialist[3].num_classes
        else:
            if self.positions:
                self.loss_fn, self.targets = token_training(o, manifest.to_json())
            else:  # a sparse set (topk:K, sample:K) has its own loss and teacher fields; None for a dense set
                sparse = sparse_training(o, manifest.to_json(), device)
                self.loss_fn, self.targets = sparse or (build_loss(o.loss, o.alpha, o.temperature),
                                                        _Targets(o, manifest, device))
            hint_specs = [parse_hint_loss(h) for h in o.hint_loss]
            if hint_specs and not manifest.hints:
                raise TransferSetError(f"{root} stores no hints; label it with --hint first", option="hint_loss")
            if hint_specs:  # the hint fields are read beside the teacher's
                self.targets.fields = tuple(self.targets.fields) + tuple(
                    dict.fromkeys(h["field"] for h in manifest.hints))
            self.data = open_training_data(root, manifest, o, self.targets, device, world, rank)
        self.norm = _input_norm(o, manifest)
        self.frames = self.positions and is_frame_set(manifest)  # per-frame teachers (image lines, signals)
        self.eval_source, self.eval_labels = _open_frame_eval(o, manifest) if self.frames else \
            _open_token_eval(o, manifest) if self.positions else _open_eval(o, manifest, root, self.data)
        if specialist is not None and self.eval_labels is not None:
            from .specialists import fold_labels

            self.eval_labels = fold_labels(torch.as_tensor(np.asarray(self.eval_labels)),
                                           specialist[3].record["classes"]).numpy()
        torch.manual_seed(o.seed)
        self.model = create_student(o.student, manifest.input["shape"], self.num_classes, *self.norm).to(device)
        if self.positions:  # before any step: a student must give the teachers' frame count
            check_positions(self.model, o.student, manifest.input["shape"], manifest.input["dtype"],
                            manifest.positions)
        if o.init_from:
            _init_weights(self.model, o.init_from, o.student, specialist[3].record["classes"] if specialist else None)
        # hooks and regressors (built from the shapes of one forward pass), trained with the student
        self.hints = HintLosses(hint_specs, manifest.hints, self.model, manifest.input["shape"],
                                manifest.input["dtype"]).to(device) if hint_specs else None
        self.steps_per_epoch = len(self.data)
        self.total_steps = self.steps_per_epoch * o.epochs
        if o.max_steps:
            self.total_steps = min(self.total_steps, o.max_steps)
        trained = self.model if self.hints is None else torch.nn.ModuleList([self.model, self.hints])
        self.opt, self.sched = build_optimizer(trained, o, self.total_steps)
        self.amp = o.amp == "on" or (o.amp == "auto" and device.type == "cuda")
        # the options as a resume reads them back (tuples become lists)
        self.config = {"options": json.loads(json.dumps(asdict(o))), "transfer_set": str(root), "manifest_hash": manifest_hash(manifest),
                       "num_classes": manifest.num_classes, "input": manifest.input, "input_norm": list(self.norm),
                       "device": str(device), "in_memory": self.data.in_memory, "world_size": world,
                       "torch": torch.__version__}
        if specialist is not None:
            self.config["specialist"] = specialist[3].record
        self.step, self.history, self.resumed = 0, [], False
        self.net = self.model

    # -- resume and checkpoints ------------------------------------------------------------------------------
    def resume(self) -> tuple[int, int]:
        """Restore the checkpoint when resuming (model, optimiser, schedule, RNGs, reader position, history).

        Returns ``(epoch, batch)`` to start from; ``(0, 0)`` for a fresh run.
        """
        ck = self.folder.load_checkpoint(self.device) if self.o.resume else None
        if ck is None:
            self.folder.clear_previous()  # the data, eval data and student opened cleanly: now the old run goes
            return 0, 0
        self.resumed = True
        self.folder.check_resumable(self.config, json.loads(ck["config"]))
        self.model.load_state_dict(ck["model"])
        if self.hints is not None:
            self.hints.load_state_dict(ck["hint_regressors"])
        self.opt.load_state_dict(ck["optimizer"])
        self.sched.load_state_dict(ck["scheduler"])
        torch.set_rng_state(ck["rng"])
        if self.targets.generator is not None and "noise_rng" in ck:
            self.targets.generator.set_state(ck["noise_rng"])
        reader = self.data.reader
        reader.load_state_dict(ck["data"])
        self.step = ck["step"]
        self.history = [h for h in json.loads(ck["history"]) if h["epoch"] < reader.epoch]
        self.folder.rewrite_metrics(self.history)
        return reader.epoch, reader.batches_done

    def checkpoint(self, epoch: int, batches_done: int) -> None:
        """Record the reader's position on every rank; rank 0 writes the checkpoint."""
        self.data.reader.set_epoch(epoch)
        self.data.reader.mark_consumed(batches_done)
        if not self.folder.lead:
            return
        state = {"model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
                 "scheduler": self.sched.state_dict(), "rng": torch.get_rng_state(),
                 "data": self.data.reader.state_dict(), "step": self.step, "config": json.dumps(self.config),
                 "history": json.dumps(self.history)}
        if self.targets.generator is not None:
            state["noise_rng"] = self.targets.generator.get_state()
        if self.hints is not None:
            state["hint_regressors"] = self.hints.state_dict()
        self.folder.save_checkpoint(state)

    # -- steps and epochs ------------------------------------------------------------------------------------
    def train_step(self, batch: dict) -> dict:
        """One optimiser step on one batch; returns the loss terms."""
        batch = {name: t.to(self.device, non_blocking=True) for name, t in batch.items()}
        teacher = self.targets(batch)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            if self.positions:  # the loss runs the student's output layer a chunk of positions at a time
                net = self.model if self.net is self.model else self.net
                res = self.loss_fn(net, batch["inputs"], teacher, batch["labels"], batch["length"], batch["mask"])
            else:
                logits = self.net(batch["inputs"])
        if not self.positions:
            res = self.loss_fn(logits.float(), teacher, batch.get("labels"), batch["mask"])
        if self.hints is not None:
            res["hint"] = self.hints(batch)
            first_stage = self.step < self.steps_per_epoch * self.o.hint_epochs
            # FitNets: hints alone, then KD alone; without --hint-epochs, hints beside KD all along
            res["loss"] = res["hint"] if first_stage else res["loss"] + (0 if self.o.hint_epochs else res["hint"])
        if not torch.isfinite(res["loss"]):  # stop before a NaN reaches the weights, so none is ever saved
            raise TransferSetError(
                f"training stopped at step {self.step + 1}: the loss is {float(res['loss'].detach())}; the last checkpoint "
                "(if any) and the weights before this step are kept, and no student is saved; check the set with "
                "`transferset verify` or lower the learning rate", FAILED)
        self.opt.zero_grad(set_to_none=True)
        res["loss"].backward()
        if self.o.clip_grad:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.o.clip_grad)
        self.opt.step()
        self.sched.step()
        self.step += 1
        res["rows"] = int(res.pop("positions")) if self.positions else int(batch["mask"].sum())
        return res

    def run_epoch(self, epoch: int, start_batch: int, bar) -> bool:
        """Train epoch ``epoch`` from batch ``start_batch``; log and checkpoint it. True when the last step ran."""
        reader = self.data.reader
        reader.set_epoch(epoch)
        if start_batch:
            reader.mark_consumed(start_batch)
        k, finished = start_batch, False
        sums = {"loss": 0.0, "soft": 0.0, "hard": 0.0, "hint": 0.0, "rows": 0}
        t_epoch, cpu_epoch = time.perf_counter(), time.process_time()
        for batch in self.data.batches():
            res = self.train_step(batch)
            k += 1
            for key in ("loss", "soft", "hard", "hint"):
                if key in res:
                    sums[key] += float(res[key].detach()) * res["rows"]
            sums["rows"] += res["rows"]
            if bar is not None:
                bar.update(1)
                bar.set_postfix(epoch=epoch, loss=f"{float(res['loss']):.4f}")
            if self.o.checkpoint_every and self.step % self.o.checkpoint_every == 0 and k < self.steps_per_epoch:
                self.checkpoint(epoch, k)
            if self.step >= self.total_steps:
                finished = True
                break
        self._log_epoch(epoch, sums, time.perf_counter() - t_epoch, time.process_time() - cpu_epoch)
        self.checkpoint(epoch + 1, 0)
        return finished

    def _log_epoch(self, epoch: int, sums: dict, seconds: float, cpu_seconds: float) -> None:
        rows = max(sums["rows"], 1)
        line = {"epoch": epoch, "steps": self.step, "loss": sums["loss"] / rows, "soft": sums["soft"] / rows,
                "hard": sums["hard"] / rows, **({"hint": sums["hint"] / rows} if self.hints is not None else {}),
                "samples_per_s": sums["rows"] * self.world / max(seconds, 1e-9),
                "seconds": seconds, "cpu_seconds": cpu_seconds, "lr": self.sched.get_last_lr()[0]}
        if self.eval_source is not None and self.folder.lead:
            ev = (frame_source_metrics(self.model, self.eval_source, self.eval_labels, self.device) if self.frames
                  else _evaluate_tokens(self.model, self.eval_source, self.o) if self.positions else
                  _evaluate_student(self.model, self.eval_source, self.eval_labels, self.device))
            line.update({f"eval_{k}": v for k, v in ev.items()})
            if not self.o.quiet:  # the curve as it happens: patient training shows whether more epochs help
                _say_epoch(epoch + 1, self.o.epochs, line)
        self.history.append(line)
        self.folder.append_metrics(line)

    def fit(self, t0: float) -> TrainResult:
        """Resume or start, train the remaining epochs, save the student."""
        self.folder.create()
        params = count_parameters(self.model)
        start_epoch, start_batch = self.resume()
        if self.resumed and (start_epoch >= self.o.epochs or self.step >= self.total_steps):
            if not self.folder.student_path.exists():  # killed after the last checkpoint, before the weights
                self.folder.save_student(self.model, self.manifest, self.o.export_onnx, self.device,
                                 self.config.get("specialist"))
            return TrainResult(self.folder.path, self.history, params, time.perf_counter() - t0, "already-complete")
        self.folder.write_config(self.config)
        if dist.is_initialized():
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        bar = progress_bar(self.total_steps, desc="train-student", unit="step", initial=self.step,
                           quiet=self.o.quiet or not self.folder.lead)
        self.model.train()
        for epoch in range(start_epoch, self.o.epochs):
            if self.run_epoch(epoch, start_batch if epoch == start_epoch else 0, bar):
                break
        if bar is not None:
            bar.close()
        if self.hints is not None:  # the regressors and hooks stay out of student.pt and the ONNX export
            self.hints.remove()
        self.folder.save_student(self.model, self.manifest, self.o.export_onnx, self.device,
                                 self.config.get("specialist"))
        return TrainResult(self.folder.path, self.history, params, time.perf_counter() - t0)


def _complete_manifest(root: Path) -> Manifest:
    manifest = read_manifest(root)
    if not manifest.complete:
        raise TransferSetError(f"{root}: the transfer set is incomplete ({manifest.rows} of {manifest.expected_rows} "
                               "rows); finish it by re-running the same label command")
    return manifest


def train_student(transfer_set: str | os.PathLike, out: str | os.PathLike, options: TrainOptions | None = None) -> TrainResult:
    """Train a student on ``transfer_set`` into the run folder ``out`` (see the module docstring)."""
    o = options or TrainOptions()
    o.validate()
    t0 = time.perf_counter()
    RunFolder(out).refuse_other_run(o.resume, o.overwrite)
    root = Path(transfer_set)
    manifest = _complete_manifest(root)
    device = torch_device(o.device)
    if o.threads is not None:  # torch's default (every core) thrashes on a shared machine; see docs/BENCHMARKS.md
        torch.set_num_threads(o.threads)
    with process_group(device) as (world, rank):
        if device.type == "cuda":
            torch.cuda.set_device(device)
        trainer = Trainer(o, root, manifest, RunFolder(out, lead=rank == 0), device, world, rank)
        return trainer.fit(t0)
