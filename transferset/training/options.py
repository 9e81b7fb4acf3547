"""The options of ``transferset train-student``, declared once, and which of them decide a run's result."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import TransferSetError
from ..options import option
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
    """Every option of ``transferset train-student``, declared once: the CLI builds each flag from its field."""

    student: str = option("mlp:800,800", "mlp:W1,W2[,dropout=P] | cnn | resnet8 | resnet20 | timm:NAME[,key=value] | "
                          "package.module:factory")
    loss: str = option("kd", "kd: alpha T^2 KL(teacher || student) + (1 - alpha) CE (Hinton et al.); logit-mse: match "
                       "the mean member logits (Ba & Caruana); per-position sets also reverse-kl, jsd (with --beta), "
                       "tvd.", choices=LOSS_NAMES)
    beta: float = option(0.5, "Per-position sets: the generalized JSD's beta.")
    loss_chunk: int = option(1024, "Per-position sets: positions per chunk of the student's output layer in the loss.")
    alpha: float = option(0.9, "Soft-term weight; 0 trains on hard labels alone.")
    temperature: float = option(4.0, "Softmax temperature of the soft targets and the student in the soft term (T=4 "
                                "and alpha 0.9 were chosen from sweeps, docs/RESULTS.md; `transferset sweep` tries "
                                "others for your student).", short="-T")
    combine: str | None = option(None, "Recombine the stored member logits with this rule (default: the set's own).",
                                 choices=COMBINE_RULES)
    teacher_noise: float = option(0.0, "Gaussian noise on the teacher logits (Sau & Balasubramanian 2016).")
    optimizer: str = option("adamw", "AdamW, or SGD with Nesterov momentum.", choices=OPTIMIZERS)
    lr: float | None = option(None, "Peak learning rate (default 1e-3 adamw, 0.05 sgd).")
    momentum: float = option(0.9, "SGD momentum (AdamW ignores it).")
    weight_decay: float = option(1e-4, "Decoupled weight decay.")
    epochs: int = option(10, "Passes over the transfer set.")
    batch_size: int = option(256, "Rows per step on each rank.")
    warmup: float = option(0.05, "Warm-up as a fraction of all steps, then cosine.")
    clip_grad: float | None = option(5.0, "Max gradient norm (0 = off).", parse="zero_off")
    seed: int = option(0, "Seed of the student's weights and the epoch order.")
    device: str = option("auto", "auto, cpu, cuda or cuda:N.")
    amp: str = option("auto", "bf16 autocast (auto: on a GPU).", choices=AMP)
    in_memory: str = option("auto", "Load the set into memory (auto: when it fits --memory-budget-mb), or stream it "
                            "from the shards.", choices=IN_MEMORY)
    memory_budget_mb: int = option(2048, "Largest set --in-memory auto loads.")
    num_workers: int = option(0, "DataLoader workers for streaming.")
    threads: int | None = option(None, "torch intra-op threads (default: torch's, every core).")
    shuffle_chunks: int = option(8, "Streaming: HDF5 chunks whose rows are shuffled together (raise it for "
                                 "class-sorted sources).")
    checkpoint_every: int = option(0, "Also checkpoint every N steps.")
    resume: bool = option(False, "Continue from RUN/checkpoint.pt.")
    overwrite: bool = option(False, "Start over in a folder that holds another run (its files are removed once the "
                             "new run has opened its data and built its student).")
    eval_data: str | None = option(None, "Held-out source scored after each epoch (errors, NLL, ECE; per-position "
                                   "sets: token ids, or text with --tokenizer: perplexity, next-token accuracy).")
    eval_labels: str | None = option(None, "Labels of --eval-data, when the source does not carry them.")
    holdout: float | None = option(None, "Keep a seeded fraction F of the set's source rows (all their views) out of "
                                   "training and score on them (instead of --eval-data).", metavar="F")
    tokenizer: str | None = option(None, "Per-position sets: --eval-data is text, tokenized with this.")
    reference: str | None = option(None, "Per-position sets: a teacher .onnx; report top-1 agreement and KL to it "
                                   "each epoch.")
    export_onnx: str | None = option(None, "Also write the student as ONNX.", path=True)
    input_scale: float | None = option(None, "Student input scale (default: the teachers', or 1/255 for uint8).")
    input_mean: float | None = option(None, "Subtracted from the student's scaled input (default: the teachers').")
    input_std: float | None = option(None, "Divides the student's input (default: the teachers').")
    verify: bool = option(False, "Re-hash every shard before training.")
    skip_bad_shards: bool = option(False, "Leave out unreadable shards (loudly) instead of stopping.")
    source: str | None = option(None, "The source's new location, for sets without stored inputs.")
    max_steps: int | None = option(None, "Stop after this many steps (smoke runs).")
    specialist: str | None = option(None, "Train the specialist of cluster I of a plan (`transferset specialists "
                                    "plan`): its classes and a dustbin, on its rows, with the targets folded.",
                                    metavar="PLAN.json:I")
    init_from: str | None = option(None, "Start from a student's weights (every tensor whose name and shape match; a "
                                   "specialist from its generalist).", path=True, metavar="student.pt")
    hint_loss: tuple[str, ...] = option((), "A feature loss (fitnet, at, ab, rkd, mmd) between the set's hint HINT "
                                        "(hint_<k> or its tensor) and the student's module MODULE (repeat).",
                                        metavar="KIND:HINT=MODULE[:weight=W]")
    hint_epochs: int = option(0, "FitNets' two stages: the hint losses alone for N epochs, then the KD loss alone.")
    quiet: bool = option(False, "No progress bar and no per-epoch lines.", short="-q")

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
        for name, ok, message in checks:
            if not ok:
                raise TransferSetError(message, option=name)


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
