"""The options of ``transferset train-student``, declared once, and which of them decide a run's result."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import TransferSetError
from ..targets import COMBINE_RULES
from ..wording import plural

__all__ = ["TrainOptions", "TrainResult", "RUNTIME_OPTIONS", "result_options", "LOSS_NAMES", "OPTIMIZERS",
           "IN_MEMORY", "AMP"]

#: the choices of the options that take one (the CLI's choices come from here; COMBINE_RULES from targets)
LOSS_NAMES = ("kd", "logit-mse", "reverse-kl", "jsd", "tvd")  #: kd and logit-mse for rows; per-position sets: TOKEN_LOSSES
OPTIMIZERS = ("sgd", "adamw")
IN_MEMORY = ("auto", "yes", "no")
AMP = ("auto", "on", "off")


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
    overwrite: bool = False
    eval_data: str | None = None
    eval_labels: str | None = None
    holdout: float | None = None
    export_onnx: str | None = None
    input_scale: float | None = None
    input_mean: float | None = None
    input_std: float | None = None
    verify: bool = False
    skip_bad_shards: bool = False
    source: str | None = None
    quiet: bool = False
    max_steps: int | None = None
    beta: float = 0.5  #: per-position sets: the generalized JSD's beta
    loss_chunk: int = 1024  #: per-position sets: positions per chunk of the student's output layer in the loss
    tokenizer: str | None = None  #: per-position sets: eval_data is text, tokenized with this tokenizer.json
    reference: str | None = None  #: per-position sets: a teacher .onnx to report agreement and KL with
    specialist: str | None = None
    init_from: str | None = None
    hint_loss: tuple[str, ...] = ()  #: ``KIND:HINT=MODULE[:weight=W]`` each (training.hint_losses)
    hint_epochs: int = 0  #: FitNets' first stage: this many epochs of the hint losses alone, then the KD loss alone

    def validate(self) -> None:
        """Refuse a bad value once, naming its option (the CLI spells it as the flag)."""
        o = self
        checks = [
            ("epochs", o.epochs >= 1, f"must be >= 1, got {o.epochs}"),
            ("batch_size", o.batch_size >= 1, f"must be >= 1, got {o.batch_size}"),
            ("lr", o.lr is None or (math.isfinite(o.lr) and o.lr > 0), f"must be positive, got {o.lr}"),
            ("momentum", math.isfinite(o.momentum), f"must be a finite number, got {o.momentum}"),
            ("weight_decay", math.isfinite(o.weight_decay) and o.weight_decay >= 0, f"must be >= 0, got {o.weight_decay}"),
            ("warmup", 0 <= o.warmup < 1, f"is a fraction of all steps in [0, 1), got {o.warmup}"),
            ("clip_grad", o.clip_grad is None or o.clip_grad > 0, f"must be positive, got {o.clip_grad}"),
            ("optimizer", o.optimizer in OPTIMIZERS, f"{o.optimizer!r}: choose {' or '.join(OPTIMIZERS)}"),
            ("in_memory", o.in_memory in IN_MEMORY, f"{o.in_memory!r}: choose {', '.join(IN_MEMORY)}"),
            ("amp", o.amp in AMP, f"{o.amp!r}: choose {', '.join(AMP)}"),
            ("num_workers", o.num_workers >= 0, f"must be >= 0, got {o.num_workers}"),
            ("threads", o.threads is None or o.threads >= 1, f"must be >= 1, got {o.threads}"),
            ("shuffle_chunks", o.shuffle_chunks >= 1, f"must be >= 1, got {o.shuffle_chunks}"),
            ("checkpoint_every", o.checkpoint_every >= 0, f"must be >= 0, got {o.checkpoint_every}"),
            ("seed", o.seed >= 0, f"must be >= 0, got {o.seed}"),
            ("teacher_noise", o.teacher_noise >= 0 and math.isfinite(o.teacher_noise), f"must be >= 0, got {o.teacher_noise}"),
            ("combine", o.combine is None or o.combine in COMBINE_RULES,
             f"{o.combine!r}: choose {', '.join(COMBINE_RULES)}"),
            ("overwrite", not (o.overwrite and o.resume), "starts over and resume continues: choose one"),
            ("loss_chunk", o.loss_chunk >= 1, f"must be >= 1, got {o.loss_chunk}"),
            ("eval_labels", o.eval_labels is None or o.eval_data is not None,
             "is given without the data to evaluate on; give that source as well"),
            ("holdout", o.holdout is None or (math.isfinite(o.holdout) and 0 < o.holdout < 1),
             f"is a fraction of the source rows in (0, 1), got {o.holdout}"),
            ("holdout", o.holdout is None or o.eval_data is None,
             "scores on held-out source rows of the set; give it or evaluation data, not both"),
            ("hint_epochs", 0 <= o.hint_epochs < o.epochs, f"must be >= 0 and below --epochs, got {o.hint_epochs}"),
            ("hint_epochs", o.hint_epochs == 0 or bool(o.hint_loss), "needs at least one --hint-loss"),
        ]
        for option, ok, message in checks:
            if not ok:
                raise TransferSetError(message, option=option)


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
        ev = f", eval accuracy {last['eval_accuracy']:.4f} ({last['eval_errors']} errors)" if "eval_errors" in last else ""
        if "eval_frame_accuracy" in last:
            ev = f", eval frame accuracy {last['eval_frame_accuracy']:.4f} ({last['eval_frame_errors']} frames wrong)"
        if "eval_perplexity" in last:
            ev = f", eval perplexity {last['eval_perplexity']:.2f}, next-token accuracy {last['eval_accuracy']:.4f}"
        if self.status == "already-complete":
            return f"{self.out}: already trained ({plural(len(self.metrics), 'epoch')}); nothing to do{ev}"
        return (f"{self.out}: trained {plural(len(self.metrics), 'epoch')} in {self.seconds:.1f} s; "
                f"{self.parameters:,} parameters{ev}; weights in {self.out / 'student.pt'}")


# -- distributed set-up -----------------------------------------------------------------------------------------


# Options that change how a run goes, not what it computes: a resume may change them.
RUNTIME_OPTIONS = ("resume", "overwrite", "quiet", "threads", "checkpoint_every", "verify", "eval_data", "eval_labels",
                    "export_onnx", "tokenizer", "reference")


def result_options(options: dict) -> dict:
    """The options that decide a run's result (a resume must match them), with defaults filled in."""
    # an option added since a checkpoint was written takes its default there, so older runs still resume
    full = {**asdict(TrainOptions()), **options}
    return {k: v for k, v in full.items() if k not in RUNTIME_OPTIONS}
