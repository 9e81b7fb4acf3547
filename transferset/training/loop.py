"""Stage 2: train a small student from a transfer set's shards, with no teacher in memory.

The student sees only the manifest and the shards (or, for sets without stored inputs, inputs replayed from the
source). Distributed training goes through ``torchrun`` and DDP: every rank reads its own slice of the epoch plan.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from ..errors import FAILED, TransferSetError
from .losses import add_teacher_noise, build_loss, mean_logits, teacher_log_probs
from ..format.manifest import load_manifest, manifest_hash
from .reader import InMemoryBatches, TransferSetDataset, estimate_bytes, load_in_memory, stored_temperature_index
from .students import count_parameters, create_student, export_onnx
from .sparse_losses import sparse_training  # codecs hook

__all__ = ["TrainOptions", "TrainResult", "train_student", "resolve_device"]

CHECKPOINT = "checkpoint.pt"


@dataclass
class TrainOptions:
    """Every option of ``transferset train-student`` (the CLI maps its flags onto this one to one)."""

    student: str = "mlp:800,800"
    loss: str = "kd"
    alpha: float = 0.9
    temperature: float = 4.0
    combine: str | None = None
    teacher_noise: float = 0.0
    optimizer: str = "adamw"
    lr: float | None = None
    momentum: float = 0.9
    weight_decay: float = 1e-4
    epochs: int = 10
    batch_size: int = 256
    warmup: float = 0.05
    clip_grad: float | None = 5.0
    seed: int = 0
    device: str = "auto"
    amp: str = "auto"
    in_memory: str = "auto"
    memory_budget_mb: int = 2048
    num_workers: int = 0
    threads: int | None = None
    shuffle_chunks: int = 8
    checkpoint_every: int = 0
    resume: bool = False
    eval_data: str | None = None
    eval_labels: str | None = None
    export_onnx: str | None = None
    input_scale: float | None = None
    input_mean: float | None = None
    input_std: float | None = None
    verify: bool = False
    skip_bad_shards: bool = False
    source: str | None = None
    quiet: bool = False
    max_steps: int | None = None


@dataclass
class TrainResult:
    """Where the run wrote its files, and its last epoch's metrics."""

    out: Path
    metrics: list = field(default_factory=list)
    parameters: int = 0
    seconds: float = 0.0
    status: str = "trained"

    def summary_line(self) -> str:
        last = self.metrics[-1] if self.metrics else {}
        ev = f", eval accuracy {last['eval_accuracy']:.4f} ({last['eval_errors']} errors)" if "eval_accuracy" in last else ""
        if self.status == "already-complete":
            return f"{self.out}: already trained ({len(self.metrics)} epochs); nothing to do{ev}"
        return (f"{self.out}: trained {len(self.metrics)} epochs in {self.seconds:.1f} s; "
                f"{self.parameters:,} parameters{ev}; weights in {self.out / 'student.pt'}")


def resolve_device(device: str) -> torch.device:
    """``auto`` picks CUDA when usable (this rank's ``LOCAL_RANK`` device under torchrun), else CPU."""
    device = (device or "auto").lower()
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
        return torch.device("cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise TransferSetError(f"--device {device}: no usable CUDA GPU here; use --device cpu or auto")
    try:
        return torch.device(device)
    except RuntimeError:
        raise TransferSetError(f"--device {device!r}: expected auto, cpu, cuda or cuda:N") from None


def _validate(o: TrainOptions) -> None:
    checks = [
        (o.epochs >= 1, f"--epochs must be >= 1, got {o.epochs}"),
        (o.batch_size >= 1, f"--batch-size must be >= 1, got {o.batch_size}"),
        (o.lr is None or (math.isfinite(o.lr) and o.lr > 0), f"--lr must be positive, got {o.lr}"),
        (math.isfinite(o.weight_decay) and o.weight_decay >= 0, f"--weight-decay must be >= 0, got {o.weight_decay}"),
        (0 <= o.warmup < 1, f"--warmup is a fraction of all steps in [0, 1), got {o.warmup}"),
        (o.clip_grad is None or o.clip_grad > 0, f"--clip-grad must be positive, got {o.clip_grad}"),
        (o.optimizer in ("sgd", "adamw"), f"--optimizer {o.optimizer!r}: choose sgd or adamw"),
        (o.in_memory in ("auto", "yes", "no"), f"--in-memory {o.in_memory!r}: choose auto, yes or no"),
        (o.amp in ("auto", "on", "off"), f"--amp {o.amp!r}: choose auto, on or off"),
        (o.num_workers >= 0, f"--num-workers must be >= 0, got {o.num_workers}"),
        (o.threads is None or o.threads >= 1, f"--threads must be >= 1, got {o.threads}"),
        (o.shuffle_chunks >= 1, f"--shuffle-chunks must be >= 1, got {o.shuffle_chunks}"),
        (o.checkpoint_every >= 0, f"--checkpoint-every must be >= 0, got {o.checkpoint_every}"),
        (o.seed >= 0, f"--seed must be >= 0, got {o.seed}"),
        (o.teacher_noise >= 0 and math.isfinite(o.teacher_noise), f"--teacher-noise must be >= 0, got {o.teacher_noise}"),
        (o.combine in (None, "mean-probs", "mean-logits", "geometric"), f"--combine {o.combine!r}: choose mean-probs, mean-logits or geometric"),
        ((o.eval_labels is None) or (o.eval_data is not None), "--eval-labels needs --eval-data"),
    ]
    for ok, msg in checks:
        if not ok:
            raise TransferSetError(msg)


def _input_norm(o: TrainOptions, manifest: dict) -> tuple[float, float, float]:
    """The student's input normalisation: the options, else the teachers' preprocessing, else 1/255 for bytes."""
    pre = manifest.get("preprocess") or {}
    scale = o.input_scale if o.input_scale is not None else pre.get("scale")
    if scale is None:
        scale = 1.0 / 255.0 if manifest["input"]["dtype"] == "uint8" else 1.0
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

    def __init__(self, o: TrainOptions, manifest: dict, device: torch.device) -> None:
        self.o = o
        self.rule = o.combine or manifest["combine"]
        self.weights = torch.tensor(manifest["weights"], dtype=torch.float32, device=device)
        self.stored_t = stored_temperature_index(manifest, o.temperature)
        self.generator = None
        if o.teacher_noise > 0:
            self.generator = torch.Generator(device=device).manual_seed(o.seed + 7919)
        if o.alpha == 0:
            self.fields = ("inputs", "labels")
        elif o.loss == "logit-mse" or o.teacher_noise > 0 or self.stored_t is None or self.rule != manifest["combine"]:
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


def _schedule(total_steps: int, warmup: float):
    warm = max(1, int(round(total_steps * warmup))) if warmup > 0 else 0

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, total_steps - warm)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        torch.save(obj, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise TransferSetError(f"cannot write {path}: {e.strerror or e}", FAILED) from None


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise TransferSetError(f"cannot write {path}: {e.strerror or e}", FAILED) from None


def _batches(loader):
    """Iterate a loader; a TransferSetError raised in a DataLoader worker comes back as its own one line."""
    try:
        yield from loader
    except TransferSetError as e:
        text = str(e)
        if not text.startswith("Caught TransferSetError"):
            raise
        # torch re-raises a worker's exception as type(e)(message + traceback); keep the original message
        last = [ln for ln in text.splitlines() if ln.startswith("transferset.errors.TransferSetError: ")]
        raise TransferSetError(last[-1].split(": ", 1)[1] if last else text.splitlines()[0], FAILED) from None


def _evaluate_student(model, source, labels, device, batch_size: int = 2048) -> dict:
    from ..evaluate import metrics, torch_log_probs

    return metrics(torch_log_probs(model, source, device, batch_size), labels)


# Options that change how a run goes, not what it computes: a resume may change them.
_RUNTIME_OPTIONS = ("resume", "quiet", "threads", "checkpoint_every", "verify", "eval_data", "eval_labels",
                    "export_onnx")


def _result_options(options: dict) -> dict:
    # an option added since a checkpoint was written takes its default there, so older runs still resume
    full = {**asdict(TrainOptions()), **options}
    return {k: v for k, v in full.items() if k not in _RUNTIME_OPTIONS}


def _config_json(o: TrainOptions, manifest: dict, root: Path, norm, device, in_memory: bool, world: int) -> dict:
    return {"options": asdict(o), "transfer_set": str(root), "manifest_hash": manifest_hash(manifest),
            "num_classes": manifest["num_classes"], "input": manifest["input"], "input_norm": list(norm),
            "device": str(device), "in_memory": in_memory, "world_size": world,
            "torch": torch.__version__}


def train_student(transfer_set: str | os.PathLike, out: str | os.PathLike, options: TrainOptions | None = None) -> TrainResult:
    """Train a student on ``transfer_set`` into the run folder ``out`` (see the module docstring).

    Under torchrun the process group is created here when the caller has not made one, and then also ended
    here: every rank waits for the others, so none exits while gloo's threads still serve a peer (which
    aborted a rank with "terminate called without an active exception").
    """
    owns_group = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized()
    try:
        result = _train_student(transfer_set, out, options)
        if owns_group and dist.is_initialized():
            dist.barrier()
        return result
    finally:
        if owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _train_student(transfer_set: str | os.PathLike, out: str | os.PathLike, options: TrainOptions | None) -> TrainResult:
    o = options or TrainOptions()
    _validate(o)
    t0 = time.perf_counter()
    root, out = Path(transfer_set), Path(out)
    manifest = load_manifest(root)
    if not manifest["complete"]:
        raise TransferSetError(f"{root}: the transfer set is incomplete ({sum(s['rows'] for s in manifest['shards'])} "
                               f"of {manifest.get('expected_rows')} rows); finish it by re-running the same label command")
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    device = resolve_device(o.device)
    if o.threads is not None:  # torch's default (every core) thrashes on a shared machine; see docs/BENCHMARKS.md
        torch.set_num_threads(o.threads)
    if distributed and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    if device.type == "cuda":
        torch.cuda.set_device(device)
    lead = rank == 0
    sparse = sparse_training(o, manifest, device)  # codecs hook: a sparse set's loss and targets, None if dense
    loss_fn, targets = sparse or (build_loss(o.loss, o.alpha, o.temperature), _Targets(o, manifest, device))
    norm = _input_norm(o, manifest)

    torch.manual_seed(o.seed)
    model = create_student(o.student, manifest["input"]["shape"], manifest["num_classes"], *norm).to(device)
    params = count_parameters(model)

    fields = targets.fields
    in_memory = o.in_memory == "yes" or (
        o.in_memory == "auto" and estimate_bytes(manifest, fields, targets.temperature) <= o.memory_budget_mb * (1 << 20))
    if in_memory:
        tensors = load_in_memory(root, fields, targets.temperature, device, verify=o.verify,
                                 skip_bad_shards=o.skip_bad_shards, source_override=o.source)
        data = InMemoryBatches(tensors, o.batch_size, o.seed, world, rank, manifest_hash=manifest_hash(manifest))
        loader_of = lambda: data  # noqa: E731
    else:
        data = TransferSetDataset(root, fields=fields, temperature=targets.temperature, batch_size=o.batch_size,
                                  seed=o.seed, world_size=world, rank=rank, verify=o.verify,
                                  skip_bad_shards=o.skip_bad_shards, source_override=o.source,
                                  buffer_chunks=o.shuffle_chunks)
        loader_kw = dict(batch_size=None, num_workers=o.num_workers, pin_memory=device.type == "cuda")
        if o.num_workers > 0:
            loader_kw["prefetch_factor"] = 4
        # a private generator: a DataLoader iterator otherwise draws its seed from the global RNG, which would
        # shift dropout's random stream between an interrupted-and-resumed run and an uninterrupted one
        loader_of = lambda: DataLoader(data, generator=torch.Generator().manual_seed(o.seed), **loader_kw)  # noqa: E731
    steps_per_epoch = len(data)
    total_steps = steps_per_epoch * o.epochs
    if o.max_steps:
        total_steps = min(total_steps, o.max_steps)

    lr = o.lr if o.lr is not None else (0.05 if o.optimizer == "sgd" else 1e-3)
    if o.optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=o.momentum, weight_decay=o.weight_decay, nesterov=True)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=o.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(total_steps, o.warmup))
    amp = o.amp == "on" or (o.amp == "auto" and device.type == "cuda")

    eval_src = eval_y = None
    if o.eval_data:
        from ..labelling.sources import open_source, read_labels

        eval_src = open_source(o.eval_data)
        eval_y = read_labels(o.eval_labels, rows=eval_src.rows) if o.eval_labels else eval_src.labels
        if eval_y is None:
            raise TransferSetError(f"--eval-data {o.eval_data}: carries no labels; give --eval-labels")

    if lead:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise TransferSetError(f"--out {out}: cannot create the folder ({e.strerror or e})") from None
    config = _config_json(o, manifest, root, norm, device, in_memory, world)
    ckpt_path = out / CHECKPOINT
    start_epoch, start_batch, step, history = 0, 0, 0, []
    if o.resume and ckpt_path.exists():
        try:
            ck = torch.load(ckpt_path, map_location=device, weights_only=True)
        except Exception as e:
            raise TransferSetError(f"{ckpt_path}: unreadable checkpoint ({str(e).splitlines()[0][:200]}); "
                                   "delete it to start over") from None
        old = json.loads(ck["config"])
        keep = ("options", "manifest_hash", "input_norm", "world_size")
        now = {k: _result_options(config[k]) if k == "options" else config[k] for k in keep}
        was = {k: _result_options(old[k]) if k == "options" else old[k] for k in keep}
        if now != was:
            diff = sorted(k for k in now["options"] if now["options"].get(k) != was["options"].get(k))
            raise TransferSetError(f"{out}: the checkpoint was made with other options or another transfer set "
                                   f"({', '.join(diff) or 'transfer set / world size'}); use another --out or drop --resume")
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        torch.set_rng_state(ck["rng"])
        if targets.generator is not None and "noise_rng" in ck:
            targets.generator.set_state(ck["noise_rng"])
        data.load_state_dict(ck["data"])
        start_epoch, start_batch, step = data.epoch, data.batches_done, ck["step"]
        history = [h for h in json.loads(ck["history"]) if h["epoch"] < start_epoch]
        if lead:  # a kill between appending an epoch's line and its checkpoint would leave a repeated line
            _atomic_write_text(out / "metrics.jsonl", "".join(json.dumps(h) + "\n" for h in history))
        if start_epoch >= o.epochs or step >= total_steps:
            if lead and not (out / "student.pt").exists():  # killed after the last checkpoint, before the weights
                _save_student(model, manifest, out, o, device)
            return TrainResult(out, history, params, time.perf_counter() - t0, "already-complete")
    elif lead:
        (out / "metrics.jsonl").unlink(missing_ok=True)
    if lead:
        _atomic_write_text(out / "config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")

    net = model
    if dist.is_initialized():
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    def checkpoint(epoch: int, batches_done: int) -> None:
        data.set_epoch(epoch)
        data.mark_consumed(batches_done)
        if not lead:
            return
        state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                 "rng": torch.get_rng_state(), "data": data.state_dict(), "step": step,
                 "config": json.dumps(config), "history": json.dumps(history)}
        if targets.generator is not None:
            state["noise_rng"] = targets.generator.get_state()
        _atomic_save(state, ckpt_path)

    bar = None
    if lead and not o.quiet and sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=total_steps, initial=step, unit="step", desc="train-student", dynamic_ncols=True)
    model.train()
    finished = False
    for epoch in range(start_epoch, o.epochs):
        data.set_epoch(epoch)
        if epoch == start_epoch and start_batch:
            data.mark_consumed(start_batch)
        k = start_batch if epoch == start_epoch else 0
        sums = {"loss": 0.0, "soft": 0.0, "hard": 0.0, "rows": 0}
        t_epoch, cpu_epoch = time.perf_counter(), time.process_time()
        for batch in _batches(loader_of()):
            batch = {name: t.to(device, non_blocking=True) for name, t in batch.items()}
            teacher = targets(batch)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                logits = net(batch["inputs"])
            res = loss_fn(logits.float(), teacher, batch.get("labels"), batch["mask"])
            opt.zero_grad(set_to_none=True)
            res["loss"].backward()
            if o.clip_grad:
                torch.nn.utils.clip_grad_norm_(model.parameters(), o.clip_grad)
            opt.step()
            sched.step()
            step += 1
            k += 1
            n = int(batch["mask"].sum())
            for key in ("loss", "soft", "hard"):
                sums[key] += float(res[key].detach()) * n
            sums["rows"] += n
            if bar is not None:
                bar.update(1)
                bar.set_postfix(epoch=epoch, loss=f"{float(res['loss']):.4f}")
            if o.checkpoint_every and step % o.checkpoint_every == 0 and k < steps_per_epoch:
                checkpoint(epoch, k)
            if step >= total_steps:
                finished = True
                break
        seconds, cpu_seconds = time.perf_counter() - t_epoch, time.process_time() - cpu_epoch
        rows = max(sums["rows"], 1)
        line = {"epoch": epoch, "steps": step, "loss": sums["loss"] / rows, "soft": sums["soft"] / rows,
                "hard": sums["hard"] / rows, "samples_per_s": sums["rows"] * world / max(seconds, 1e-9),
                "seconds": seconds, "cpu_seconds": cpu_seconds, "lr": sched.get_last_lr()[0]}
        if eval_src is not None and lead:
            ev = _evaluate_student(model, eval_src, eval_y, device)
            line.update({f"eval_{k2}": v for k2, v in ev.items()})
        history.append(line)
        if lead:
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(line) + "\n")
        checkpoint(epoch + 1, 0)
        if finished:
            break
    if bar is not None:
        bar.close()
    if lead:
        _save_student(model, manifest, out, o, device)
    return TrainResult(out, history, params, time.perf_counter() - t0)


def _save_student(model, manifest: dict, out: Path, o: TrainOptions, device: torch.device) -> None:
    _atomic_save({"model": model.state_dict(), "student_spec": model.student_spec,
                  "num_classes": manifest["num_classes"], "manifest_hash": manifest_hash(manifest)},
                 out / "student.pt")
    if o.export_onnx:
        export_onnx(model.cpu(), o.export_onnx, manifest["input"]["shape"], manifest["input"]["dtype"])
        model.to(device)
