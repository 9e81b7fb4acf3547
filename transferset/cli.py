"""The command line: parses options, calls one library function, maps errors to exit codes. No logic."""

from __future__ import annotations

import json
import os
import sys
import warnings
from dataclasses import Field, fields
from typing import Callable, get_args, get_type_hints


#: Commands whose numpy work is element by element (no matrix products) beside ONNX Runtime or h5py. numpy's
#: OpenBLAS starts a thread per core at import and lets them spin, which only takes CPU from these commands:
#: with one BLAS thread, ``import numpy`` in two processes started at once took 0.076 s instead of 0.142 s, and
#: bench_parts measured 1 process 9,954 -> 10,682 rows/s and 2 claiming workers 8,862 -> 9,948 rows/s
#: (docs/BENCHMARKS.md). Training commands keep the default: torch's own BLAS is not OpenBLAS on x86, but may be
#: elsewhere, and students do matrix products.
ELEMENTWISE_COMMANDS = frozenset({"label", "verify", "merge", "recode", "info", "inspect", "export"})


def one_blas_thread(argv: list[str]) -> bool:
    """Ask numpy's OpenBLAS for one thread when ``argv``'s command is in :data:`ELEMENTWISE_COMMANDS` and numpy is
    not imported yet (the variable is read once, when the library loads). A value the user set is kept. True when
    the variable was set here."""
    command = next((a for a in argv if not a.startswith("-")), None)
    if command not in ELEMENTWISE_COMMANDS or "numpy" in sys.modules or "OPENBLAS_NUM_THREADS" in os.environ:
        return False
    os.environ["OPENBLAS_NUM_THREADS"] = "1"
    return True


def _run_as_transferset(argv0: str) -> bool:
    """True when this process is the ``transferset`` command (its console script, or ``python -m transferset``), not
    another program that imports this module and happens to have an argument named like a command."""
    name = os.path.basename(argv0)
    return name.startswith("transferset") or (
        name == "__main__.py" and os.path.basename(os.path.dirname(os.path.abspath(argv0))) == "transferset")


if sys.argv and _run_as_transferset(sys.argv[0]):
    one_blas_thread(sys.argv[1:])  # before the imports below load numpy

import click  # noqa: E402

from . import __version__  # noqa: E402
from .errors import ReplayVersionWarning, TransferSetError, printable  # noqa: E402
from .labelling.options import LAYOUTS, NORMS, LabelOptions  # noqa: E402
from .targets import COMBINE_RULES  # noqa: E402
from .training.options import IN_MEMORY, OPTIMIZERS, TrainOptions  # noqa: E402
from .wording import plural, size  # noqa: E402

__all__ = ["main", "cli"]


def _floats(text: str | None, name: str) -> tuple[float, ...] | None:
    if text is None or text == "":
        return None
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, got {text!r}", param_hint=name) from None


def _part(text: str | None, flag: str = "--part") -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        index, count = (int(v) for v in text.split("/"))
    except ValueError:
        raise click.BadParameter(f"expected I/N such as 1/4, got {text!r}", param_hint=flag) from None
    return index, count


#: how a flag's text becomes its field's value, by the field's declared ``parse`` (transferset.options.PARSERS)
_PARSE: dict[str, Callable] = {
    "floats": _floats,
    "floats_tuple": lambda text, flag: _floats(text, flag) or (),
    "part": _part,
    "auto": lambda text, flag: None if text == "auto" else text,
    "zero_off": lambda value, flag: value or None,
    "as_given": lambda value, flag: value,
}


def _flag(f: Field) -> str:
    """The long flag of a declared option field."""
    return f.metadata.get("flag", "--" + f.name.replace("_", "-"))


def _click_option(f: Field, hint) -> Callable:
    """The click option of one declared field: flag, type, default, choices and help, all from the field."""
    meta, parse = f.metadata, f.metadata.get("parse")
    names = [_flag(f), *([meta["short"]] if "short" in meta else []), f.name]
    base = next((a for a in get_args(hint) if a is not type(None)), hint) if type(None) in get_args(hint) else hint
    kw = {"default": meta.get("cli_default", "auto" if parse == "auto" else f.default), "help": meta["help"],
          "metavar": meta.get("metavar"), "show_default": True}
    if base is bool and f.default is False:
        kw.update(is_flag=True, show_default=False)
    elif base is bool:
        names[0] = f"{names[0]}/--no-{names[0][2:]}"
    elif parse is None and getattr(base, "__origin__", None) is tuple:
        kw["multiple"] = True
    if "choices" in meta:
        kw["type"] = click.Choice((("auto",) if parse == "auto" else ()) + tuple(meta["choices"]))
    elif meta.get("path"):
        kw["type"] = click.Path()
    elif parse is None and base in (int, float):
        kw["type"] = base
    return click.option(*names, **kw)


def _declared_options(options_cls: type) -> Callable:
    """Decorate a command with a flag for every field of ``options_cls``, in the fields' order."""
    hints = get_type_hints(options_cls)

    def decorate(fn: Callable) -> Callable:
        for f in reversed(fields(options_cls)):  # click lists the last-applied decorator first
            fn = _click_option(f, hints[f.name])(fn)
        return fn

    return decorate


def _options_from(options_cls: type, params: dict):
    """``options_cls`` from a command's parsed flags, each read as its field declares."""
    return options_cls(**{f.name: _PARSE[f.metadata["parse"]](params[f.name], _flag(f)) if "parse" in f.metadata
                          else params[f.name] for f in fields(options_cls)})


#: library option names whose flag is not ``--`` + the name with dashes (the library never spells flags)
_FLAGS = {"source_override": "--source", "ensemble": "--ensemble", "data": "--data",
          **{f.name: _flag(f) for cls in (LabelOptions, TrainOptions) for f in fields(cls) if "flag" in f.metadata}}


def _example(*lines: str) -> str:
    """A command's help epilog: one example, kept as written (click's ``\\b`` stops re-wrapping)."""
    return "\b\nExample:\n" + "\n".join("  " + ln for ln in lines)


def flag_for(option: str | None) -> str | None:
    """The command-line flag of a library option name (``batch_size`` -> ``--batch-size``)."""
    if not option:
        return None
    return _FLAGS.get(option, "--" + option.replace("_", "-"))


def _safe(text) -> str:
    """Strings from a manifest are shown escaped: no terminal control sequences reach the screen."""
    return printable(text) if text is not None else "-"


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="transferset")
def cli() -> None:
    """transferset: label a transfer set with an ONNX ensemble; train small students from it."""


@cli.command("label", epilog=_example(
    'transferset label --ensemble a.onnx b.onnx --data data/mnist/train-images.idx3-ubyte.gz \\',
    '    --labels data/mnist/train-labels.idx1-ubyte.gz --scale 0.00392156862745098 \\',
    '    --augment jitter:2 --views 3 --out mnist-ts'))
@click.option("--ensemble", "ensemble", multiple=True, required=True, metavar="A.onnx [B.onnx ...]",
              help="ONNX teachers (repeat the flag, or list files after it).")
@click.argument("more_members", nargs=-1, type=click.Path(), metavar="")
@click.option("--data", default=None, help="Source: file.npy, file.npz[:key], file.h5:dataset, IDX (.gz), a photo "
              "folder (one sub-folder per class, or flat) or a photo list (list.txt or list.csv: path[,label]); for a "
              "language-model teacher, token ids [N, L] (.npy, .h5, .parquet[:column]).")
@click.option("--out", required=True, type=click.Path(), help="Transfer-set folder to write (resumed if it exists).")
@_declared_options(LabelOptions)
def label_cmd(ensemble, more_members, data, out, **options) -> None:
    """Run an ONNX ensemble over a data source and write a transfer set (HDF5 shards + manifest)."""
    from .labelling.pipeline import label

    opts = _options_from(LabelOptions, options)
    result = label(list(ensemble) + list(more_members), data, out, opts)
    click.echo(result.summary_line())


@cli.command("verify", epilog=_example('transferset verify mnist-ts --reteach 64 --teachers models/'))
@click.argument("folder", type=click.Path())
@click.option("--quick", is_flag=True, help="Check rows and shapes only; skip re-hashing.")
@click.option("--reteach", type=int, default=None, metavar="N",
              help="Also re-run the teachers on N sampled rows and compare with the stored logits.")
@click.option("--teachers", multiple=True, metavar="DIR | A.onnx ...",
              help="For --reteach: a folder holding the teachers under their recorded names, or each file (repeat).")
@click.option("--source", default=None, help="For --reteach on a set without stored inputs: its source.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the --reteach row sample.")
@click.option("--device", default="auto", show_default=True, help="For --reteach: auto, cpu, cuda or cuda:N.")
def verify_cmd(folder, quick, reteach, teachers, source, seed, device) -> None:
    """Re-hash every shard and check rows and schema; exit 1 naming each bad shard."""
    from .format import read_manifest, verify_transfer_set
    from .format.parts import unmerged_parts

    parts = unmerged_parts(folder)  # a set labelled in parts, not merged yet: its parts' shards are verified
    m = read_manifest(folder) if parts is None else None
    shards = m.shards if m is not None else parts.shards
    bad = verify_transfer_set(folder, rehash=not quick)
    for path, reason in bad:
        click.echo(f"BAD {_safe(path)}: {reason}", err=True)
    if bad:
        n_bad = sum(not path.startswith("manifest") for path, _ in bad)
        raise TransferSetError(f"{folder}: {n_bad} bad of {plural(len(shards), 'shard')}"
                               f"{'' if n_bad == len(bad) else ', and the manifest disagrees with itself'}; "
                               "restore the set from where it came, or relabel it (label --overwrite)", 1)
    state = (f"not complete: {parts.describe()}" if parts is not None else "complete" if m.complete
             else "incomplete (resume with the same label command)")
    click.echo(f"{folder}: {plural(len(shards), 'shard')}, {plural(sum(s.rows for s in shards), 'row')} verified; "
               f"{state}")
    if reteach is not None:
        _reteach(folder, reteach, teachers, source, seed, device)


@cli.command("merge", epilog=_example('transferset merge mnist-ts'))
@click.argument("folder", type=click.Path())
def merge_cmd(folder) -> None:
    """Write the one manifest.json of a set labelled in parts, once every part is done (the last part does this
    by itself; merge is for parts that ran apart or a last part that was stopped)."""
    from .format.parts import merge_parts

    m = merge_parts(folder)
    click.echo(f"{_safe(folder)}: complete: {plural(m.rows, 'row')} in {plural(len(m.shards), 'shard')}")


def _reteach(folder, rows, teachers, source, seed, device) -> None:
    from .labelling.reteach import reteach

    if not teachers:
        raise TransferSetError("is needed with --reteach: the teachers' folder or files", option="teachers")
    res = reteach(folder, rows, list(teachers), source_override=source, seed=seed, device=device)
    if res.first_bad:
        raise TransferSetError(f"{folder}: reteach disagrees at {res.first_bad}", 1)
    click.echo(f"{folder}: reteach: {res.rows} sampled rows match the teachers (max |logit difference| "
               f"{res.max_abs_diff:.3g})")


@cli.command("recode", epilog=_example('transferset recode imagenet-ts imagenet-top20 --codec topk:20'))
@click.argument("src", type=click.Path())
@click.argument("out", type=click.Path())
@click.option("--codec", required=True, metavar="topk:K|sample:K|systematic:K", help="The sparse codec of the new set.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def recode_cmd(src, out, codec, as_json) -> None:
    """Turn a dense transfer set into a sparse one (a new folder); print the mean KL per temperature."""
    from .format.recode import recode

    res = recode(src, out, codec)
    if as_json:
        click.echo(json.dumps(res, sort_keys=True))
        return
    b = res["row_bytes"]
    click.echo(f"{_safe(out)}: {res['rows']} rows as {_safe(codec)}; {b[codec]} bytes a row, dense {b['dense']} "
               f"({b['dense'] / b[codec]:.1f}x smaller)")
    for t, kl in zip(res["temperatures"], res["kl"]):
        click.echo(f"  T={t:g}: mean {res['kl_direction']} = {kl:.6f} nats")


@cli.command("info", epilog=_example('transferset info mnist-ts'))
@click.argument("folder", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def info_cmd(folder, as_json) -> None:
    """Print a transfer set's summary from its manifest."""
    from .format import read_manifest
    from .format.parts import unmerged_parts

    parts = unmerged_parts(folder)
    s = parts.summary() if parts is not None else read_manifest(folder).summary()
    if as_json:
        click.echo(json.dumps(s, sort_keys=True))
        return
    from .info import info_lines

    skipped = s.pop("skipped_files", None)
    for line in info_lines(s, folder):
        click.echo(line)
    if skipped is not None:
        click.echo(f"{'skipped files':>18}: {len(skipped)}")
        for e in skipped:
            click.echo(f"{'':>20}{_safe(e['path'])}: {_safe(e['reason'])}")


@cli.command("inspect", epilog=_example("transferset inspect data/teachers/cnn-0.onnx"))
@click.argument("model", type=click.Path())
@click.option("--no-run", is_flag=True, help="Static shapes only (do not run one zero row).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def inspect_cmd(model, no_run, as_json) -> None:
    """An ONNX model's tensors with their shapes (for label --hint) and the input/output contract label assumes."""
    from .inspect_model import format_inspection, inspect_model

    res = inspect_model(model, run=not no_run)
    if as_json:
        click.echo(json.dumps(res, sort_keys=True))
        return
    for line in format_inspection(res):
        click.echo(_safe(line))


@cli.command("train-student", epilog=_example(
    'transferset train-student --transfer-set mnist-ts --student mlp:800,800 -T 4 --alpha 0.9 \\',
    '    --epochs 5 --out runs/student --eval-data data/mnist/t10k-images.idx3-ubyte.gz \\',
    '    --eval-labels data/mnist/t10k-labels.idx1-ubyte.gz'))
@click.option("--transfer-set", "transfer_set", required=True, type=click.Path(), help="Transfer-set folder.")
@click.option("--out", required=True, type=click.Path(), help="Run folder (config.json, metrics.jsonl, student.pt).")
@_declared_options(TrainOptions)
def train_cmd(transfer_set, out, **options) -> None:
    """Train a small student from a transfer set (no teacher in memory)."""
    from .training.loop import train_student

    opts = _options_from(TrainOptions, options)
    result = train_student(transfer_set, out, opts)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, one line for the run, not one per rank
        click.echo(result.summary_line())
        from .training.sweep import control_comparison

        compared = control_comparison(out)
        if compared:
            click.echo(_safe(compared))


@cli.command("sweep", epilog=_example(
    'transferset sweep --transfer-set mnist-ts --student cnn:16,32,fc=64 --temperatures 1,2,4,8 \\',
    '    --alphas 0,0.5,0.9 --epochs 3 --holdout 0.1 --out sweeps/cnn'))
@click.option("--transfer-set", "transfer_set", required=True, type=click.Path(), help="Transfer-set folder.")
@click.option("--student", default="mlp:800,800", show_default=True, help="Student spec, as for train-student.")
@click.option("--out", required=True, type=click.Path(), help="Sweep folder: a run folder per grid point, "
              "sweep.json and report/ (resumed if it exists).")
@click.option("--temperatures", default="1,2,4,8", show_default=True, help="Temperatures, comma-separated.")
@click.option("--alphas", default="0,0.5,0.9", show_default=True,
              help="Soft-term weights, comma-separated; 0 (the hard-label control) is always run.")
@click.option("--losses", default="kd", show_default=True, help="kd, logit-mse or both, comma-separated.")
@click.option("--epochs", type=int, default=10, show_default=True, help="Epochs of every run.")
@click.option("--lr", type=float, default=None, help="Peak learning rate (default 1e-3 adamw, 0.05 sgd).")
@click.option("--optimizer", type=click.Choice(OPTIMIZERS), default="adamw", show_default=True,
              help="Optimiser of every run.")
@click.option("--weight-decay", type=float, default=1e-4, show_default=True, help="Weight decay of every run.")
@click.option("--batch-size", type=int, default=256, show_default=True, help="Rows per step.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of every run (weights, order) and of the --holdout split.")
@click.option("--eval-data", default=None, help="Score every run on this source.")
@click.option("--eval-labels", default=None, help="Labels of --eval-data, when the source does not carry them.")
@click.option("--holdout", type=float, default=None, metavar="F",
              help="Score on a seeded fraction F of the set's source rows, kept out of every run's training.")
@click.option("--jobs", type=int, default=1, show_default=True, help="Runs trained at once, in worker processes.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--threads", type=int, default=None, help="torch threads per run (default: cores / jobs).")
@click.option("--in-memory", type=click.Choice(IN_MEMORY), default="auto", show_default=True,
              help="Load the set into memory once per run (auto: when it fits the memory budget) or stream it.")
@click.option("--quiet", "-q", is_flag=True, help="No progress lines.")
def sweep_cmd(transfer_set, student, out, temperatures, alphas, losses, epochs, lr, optimizer, weight_decay,
              batch_size, seed, eval_data, eval_labels, holdout, jobs, device, threads, in_memory, quiet) -> None:
    """Train a grid of temperatures x alphas from one transfer set (alpha 0 = hard-label control); print the table."""
    from .training.loop import TrainOptions
    from .training.sweep import SweepOptions, format_sweep, run_sweep

    base = TrainOptions(student=student, epochs=epochs, lr=lr, optimizer=optimizer, weight_decay=weight_decay,
                        batch_size=batch_size, seed=seed, eval_data=eval_data, eval_labels=eval_labels,
                        holdout=holdout, device=device, threads=threads, in_memory=in_memory, quiet=quiet)
    grid = SweepOptions(temperatures=_floats(temperatures, "--temperatures") or (),
                        alphas=_floats(alphas, "--alphas") or (),
                        losses=tuple(x.strip() for x in losses.split(",") if x.strip()), jobs=jobs)
    res = run_sweep(transfer_set, out, base, grid)
    click.echo(format_sweep(res))
    try:
        from .report import report

        page = report(out, os.path.join(out, "report"))
        click.echo(f"report: {_safe(page['index'])}")
    except TransferSetError as e:
        if "matplotlib" not in e.message:
            raise
        click.echo(f"no report page: {e.message}", err=True)


@cli.command("evaluate", epilog=_example(
    'transferset evaluate --model runs/student/student.pt --data data/mnist/t10k-images.idx3-ubyte.gz \\',
    '    --labels data/mnist/t10k-labels.idx1-ubyte.gz'))
@click.option("--model", default=None, type=click.Path(), help="A student: student.pt or an .onnx file.")
@click.option("--ensemble", multiple=True, help="ONNX teachers evaluated as an ensemble (repeat, or list after).")
@click.argument("more_members", nargs=-1, type=click.Path(), metavar="")
@click.option("--data", default=None, help="Source (same formats as label); for a language model, token ids.")
@click.option("--text", default=None, help="Language models: text to score (.txt, .jsonl, .parquet), with --tokenizer.")
@click.option("--tokenizer", default=None, help="Language models: the tokenizer.json for --text.")
@click.option("--seq-len", type=int, default=128, show_default=True, help="Language models: positions per row of --text.")
@click.option("--text-field", default="text", show_default=True, help="The document's field in .jsonl.")
@click.option("--labels", default=None, help="Hard labels (default: those the source carries).")
@click.option("--reference", multiple=True, help="Another model or ensemble: report top-1 agreement with it.")
@click.option("--combine", type=click.Choice(COMBINE_RULES), default="mean-probs",
              show_default=True, help="How an ensemble's members are combined, as for label.")
@click.option("--scale", type=float, default=None, help="Teacher preprocessing, as for label.")
@click.option("--mean", default=None, help="Teacher preprocessing, as for label.")
@click.option("--std", default=None, help="Teacher preprocessing, as for label.")
@click.option("--layout", type=click.Choice(LAYOUTS), default=None, help="The teachers' image layout, as for label.")
@click.option("--norm", type=click.Choice(NORMS), default=None, help="Photos: as for label.")
@click.option("--resize", type=int, default=None, help="Photos: as for label.")
@click.option("--crop", type=int, default=None, help="Photos: as for label (default: the models' input size).")
@click.option("--limit", type=int, default=None, help="Score only the first N rows.")
@click.option("--batch-size", type=int, default=1024, show_default=True, help="Rows per forward pass.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--allow-import", is_flag=True, help="Rebuild a student whose checkpoint names a package.module:factory "
              "(imports that code: only for checkpoints you trust).")
@click.option("--speed/--no-speed", default=True, show_default=True,
              help="Also measure what the model costs: parameters, ONNX file size, rows/s at batch 1 and 256 (ONNX "
                   "Runtime, one CPU thread; a student.pt is exported to ONNX for it).")
@click.option("--generalist", default=None, type=click.Path(), help="A generalist (student.pt or .onnx), combined "
              "with --specialists by the plan (Hinton et al. 2015, section 5).")
@click.option("--specialists", multiple=True, type=click.Path(), metavar="S0 [S1 ...]",
              help="The specialists, in the plan's order (repeat, or list after).")
@click.option("--plan", default=None, type=click.Path(), help="The specialists' plan (plan.json).")
@click.option("--top", type=int, default=1, show_default=True,
              help="A specialist is active when one of its classes is among the generalist's TOP most probable.")
@click.option("--no-dustbin-shift", is_flag=True, help="Use the specialists' dustbin logits as trained (by default "
              "each is shifted by the plan's correction for its oversampled rows).")
@click.option("--export-onnx", "export_path", default=None, type=click.Path(),
              help="With --specialists: also write the generalist, the specialists and their combination as one ONNX "
                   "graph (input -> logits = log q; from student.pt checkpoints) and score it beside the combination.")
def evaluate_cmd(model, ensemble, more_members, data, text, tokenizer, seq_len, text_field, labels, reference, combine,
                 scale, mean, std, layout, norm, resize, crop, limit, batch_size, device, as_json, allow_import,
                 speed, generalist, specialists, plan, top, no_dustbin_shift, export_path) -> None:
    """Accuracy, errors, NLL and calibration (ECE) of a student, a teacher or an ensemble."""
    from .labelling.ensemble import Preprocess
    from .evaluate import evaluate

    members = list(ensemble) + list(more_members)
    if generalist or specialists or plan:
        _evaluate_specialists(generalist, list(specialists) + members, plan, data, labels, top, not no_dustbin_shift,
                              batch_size, device, limit, as_json, model, export_path)
        return
    if export_path:
        raise TransferSetError("is for a generalist combined with --specialists and --plan", option="export_onnx")
    if bool(model) == bool(members):
        raise TransferSetError("give exactly one of --model or --ensemble")
    from .lm_metrics import evaluate_lm, is_language_model

    if text is not None or (model and is_language_model(model)):
        if not model or len(reference) > 1:
            raise TransferSetError("language models are scored one at a time: give --model and at most one "
                                   "--reference teacher")
        res = evaluate_lm(model, data=data, text=text, tokenizer=tokenizer, seq_len=seq_len, text_field=text_field,
                          limit=limit, reference=reference[0] if reference else None)
        if as_json:
            click.echo(json.dumps(res, sort_keys=True))
            return
        line = (f"{_safe(model)}: perplexity {res['perplexity']:.2f}, next-token accuracy {res['accuracy']:.4f} "
                f"over {res['positions']} positions")
        if "reference_agreement" in res:
            line += (f", top-1 agreement with the reference {res['reference_agreement']:.4f}, KL(reference || model) "
                     f"{res['kl_to_reference']:.4f}")
        click.echo(line)
        return
    if data is None:
        raise TransferSetError("is needed", option="data")
    pre = Preprocess(scale, _floats(mean, "--mean"), _floats(std, "--std"), layout)
    res = evaluate([model] if model else members, data, labels, reference=list(reference) or None, preprocess=pre,
                   combine=combine, batch_size=batch_size, device=device, limit=limit, allow_import=allow_import,
                   photo={"norm": norm, "resize": resize, "crop": crop}, speed=speed)
    if as_json:
        click.echo(json.dumps(res, sort_keys=True))
        return
    line = (f"{' + '.join(_safe(m) for m in res['model'])}: accuracy {res['accuracy']:.4f}, {res['errors']:,} errors "
            f"of {res['n']:,}, NLL {res['nll']:.4f}, ECE {res['ece']:.4f}")
    if "agreement" in res:
        line += f", agreement {res['agreement']:.4f}"
    if res.get("skipped_files"):
        line += f"; {plural(res['skipped_files'], 'photo file')} could not be decoded and were left out"
    click.echo(line)
    if speed:
        params = "-" if res["parameters"] is None else f"{res['parameters']:,}"
        click.echo(f"  cost: {params} parameters, ONNX {size(res['onnx_bytes'])}, {res['rows_per_s_1']:,.0f} rows/s at "
                   f"batch 1 and {res['rows_per_s_256']:,.0f} at batch 256 (ONNX Runtime, one CPU thread, this "
                   "machine)")


def _evaluate_specialists(generalist, specialists, plan, data, labels, top, shift, batch_size, device, limit,
                          as_json, model, export_path=None) -> None:
    from .specialist_combine import evaluate_specialists, export_combined_onnx

    if model or not generalist or not specialists or not plan:
        raise TransferSetError("a combination needs --generalist, --specialists and --plan (and no --model)")
    res = evaluate_specialists(generalist, specialists, plan, data, labels, top=top, dustbin_shift=shift,
                               batch_size=batch_size, device=device, limit=limit)
    if export_path:
        from .evaluate import evaluate
        from .inputs.sources import open_source

        dtype = str(open_source(data, limit=1).dtype)
        export_combined_onnx(generalist, specialists, plan, export_path, dtype, top=top, dustbin_shift=shift)
        ev = evaluate([export_path], data, labels, batch_size=batch_size, device=device, limit=limit)
        res["export_onnx"] = {"path": str(export_path), "accuracy": ev["accuracy"], "errors": int(ev["errors"])}
    if as_json:
        click.echo(json.dumps(res, sort_keys=True))
        return
    click.echo(f"generalist: accuracy {res['generalist_accuracy']:.4f}, {res['generalist_errors']} errors of {res['n']}")
    click.echo(f"generalist + {len(res['specialists'])} specialists: accuracy {res['combined_accuracy']:.4f}, "
               f"{res['combined_errors']} errors ({100 * res['relative_error_reduction']:.1f}% fewer)")
    if "export_onnx" in res:
        e = res["export_onnx"]
        click.echo(f"{_safe(e['path'])}: the combination as one ONNX graph: accuracy {e['accuracy']:.4f}, "
                   f"{e['errors']} errors")
    click.echo("active specialists | cases | generalist correct | combined correct | change")
    for r in res["by_active"]:
        click.echo(f"{r['active']:>18} | {r['cases']:>5} | {r['generalist_correct']:>18} | {r['combined_correct']:>16} "
                   f"| {100 * r['relative_accuracy_change']:+.1f}%")


@cli.command("shift-bias", epilog=_example('transferset shift-bias run/student.pt --shift 3=2.75 --out run/student-3.pt'))
@click.argument("model", type=click.Path())
@click.option("--shift", "shifts", multiple=True, required=True, metavar="CLASS=SHIFT",
              help="Add SHIFT to CLASS's logit (its output bias); repeat; all=S shifts every class.")
@click.option("--out", required=True, type=click.Path(), help="The adjusted model (same kind: .pt or .onnx).")
@click.option("--output-name", default=None, help="ONNX: the class-score output, when the model has several.")
def shift_bias_cmd(model, shifts, out, output_name) -> None:
    """Raise or lower class biases of a student (a checkpoint or its ONNX export), as the paper does for a class
    its transfer set lacked."""
    from .class_bias import parse_shifts, shift_class_bias

    res = shift_class_bias(model, out, parse_shifts(shifts), output_name=output_name)
    done = ", ".join(f"{k}: {v:+g}" for k, v in res["shifts"].items()).replace("-1:", "all:")
    click.echo(f"{_safe(res['out'])}: {_safe(res['model'])} with class biases shifted ({done}; {res['classes']} classes)")


@cli.group("specialists", epilog=_example(
    'transferset specialists plan mnist3-ts --count 10 --out plan.json',
    'transferset train-student --transfer-set mnist3-ts --specialist plan.json:0 --init-from gen/student.pt \\',
    '    --out spec0 -T 1'))
def specialists_group() -> None:
    """Specialists over clusters of confused classes (Hinton et al. 2015, section 5)."""


@specialists_group.command("plan", epilog=_example('transferset specialists plan mnist3-ts --count 10 --out plan.json'))
@click.argument("folder", type=click.Path())
@click.option("--count", type=int, required=True, help="k-means clusters (at most one specialist each).")
@click.option("--min-size", type=int, default=2, show_default=True, help="Fewer classes: no specialist.")
@click.option("--temperature", "-T", type=float, default=None,
              help="Stored temperature whose predictions are clustered (default: the stored one nearest 8).")
@click.option("--mass", type=float, default=0.1, show_default=True,
              help="A row is a specialist's own when its teachers put this much on the cluster (lowest stored T).")
@click.option("--others", type=float, default=1.0, show_default=True,
              help="Other rows drawn, as a multiple of the specialist's own (1: half and half, as the paper).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", required=True, type=click.Path(), help="The plan file to write (JSON).")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as one JSON object.")
def specialists_plan_cmd(folder, count, min_size, temperature, mass, others, seed, out, as_json) -> None:
    """Cluster a transfer set's classes for specialists, from its stored soft targets."""
    from .training.specialists import make_plan, plan_summary, write_plan

    plan = make_plan(folder, count, min_size=min_size, temperature=temperature, mass=mass, others=others, seed=seed)
    write_plan(plan, out)
    if as_json:
        click.echo(json.dumps(plan, sort_keys=True))
        return
    for line in plan_summary(plan):
        click.echo(_safe(line))
    click.echo(f"{'plan':>18}: {_safe(out)}")


@cli.command("demo", epilog=_example(
    'transferset demo --quick && transferset report transferset-demo --out transferset-demo/report'))
@click.option("--quick", is_flag=True, help="A smaller budget that finishes in under a minute.")
@click.option("--train-teachers", is_flag=True,
              help="Train the teacher ensemble here (2 epochs each) instead of using the shipped teachers.")
@click.option("--out", default="transferset-demo", show_default=True, type=click.Path(), help="Demo folder (reused).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--quiet", "-q", is_flag=True, help="Print the table only.")
def demo_cmd(quick, train_teachers, out, device, quiet) -> None:
    """Label a transfer set with an MNIST teacher ensemble, distil a student; print the comparison."""
    from .demo import DemoConfig, run_demo

    run_demo(DemoConfig.for_mode(quick, out, device=device, quiet=quiet, train_teachers=train_teachers))


@cli.command("report", epilog=_example('transferset report runs/student --out runs/student/report'))
@click.argument("path", type=click.Path())
@click.option("--out", required=True, type=click.Path(), help="Folder for the PNGs and index.html.")
@click.option("--sample-rows", type=int, default=20000, show_default=True,
              help="Most rows read for a set's plots or evaluated for a reliability diagram.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the row sample.")
@click.option("--eval-data", default=None, help="Run folders: held-out data for the reliability diagram "
              "(default: the run's own --eval-data).")
@click.option("--eval-labels", default=None, help="Labels of --eval-data, when the source does not carry them.")
def report_cmd(path, out, sample_rows, seed, eval_data, eval_labels) -> None:
    """Plots and one index.html for a transfer set, a train-student run folder or a demo folder."""
    from .report import report

    res = report(path, out, sample_rows=sample_rows, seed=seed, eval_data=eval_data, eval_labels=eval_labels)
    click.echo(f"{_safe(path)}: {res['kind']} report with {plural(len(res['pngs']), 'plot')} in {_safe(res['index'])}")


@cli.command("export", epilog=_example('transferset export mnist-ts --out mnist-parquet --temperatures 4'))
@click.argument("folder", type=click.Path())
@click.option("--format", "fmt", type=click.Choice(["parquet"]), default="parquet", show_default=True,
              help="The file format written (Parquet only, for now).")
@click.option("--out", required=True, type=click.Path(), help="Output folder (data/*.parquet and README.md).")
@click.option("--temperatures", default=None, help="Stored temperatures to export, comma-separated (default: all).")
@click.option("--logits/--no-logits", "include_logits", default=False, show_default=True,
              help="Also export every member's logits.")
@click.option("--inputs/--no-inputs", "include_inputs", default=True, show_default=True,
              help="Export the stored inputs (flattened; the shape is in the file's metadata).")
@click.option("--row-group-rows", type=int, default=None, help="Rows per Parquet row group (default: ~64 MiB read).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def export_cmd(folder, fmt, out, temperatures, include_logits, include_inputs, row_group_rows, quiet) -> None:
    """Export a transfer set to Parquet (pyarrow, Hugging Face datasets), one row per set row."""
    from .export import export_parquet

    res = export_parquet(folder, out, temperatures=_floats(temperatures, "--temperatures"),
                         include_logits=include_logits, include_inputs=include_inputs,
                         row_group_rows=row_group_rows, quiet=quiet)
    click.echo(f"{_safe(folder)}: {plural(res['rows'], 'row')} in {plural(res['row_groups'], 'row group')} -> "
               f"{_safe(res['path'])}; "
               f"card {_safe(res['card'])}")


def main(argv: list[str] | None = None) -> None:
    """Console entry point: one line on stderr and exit 2 (bad input) or 1 (failed run) for known failures."""
    # a photo replay's version note is said once the command has succeeded (_version_notes), not on opening
    warnings.filterwarnings("ignore", category=ReplayVersionWarning)
    try:
        cli.main(args=argv, prog_name="transferset", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("transferset: aborted", err=True)
        sys.exit(130)
    except click.UsageError as e:
        if type(e).__name__ == "NoArgsIsHelpError" or e.ctx is None:  # no command: click shows the help
            e.show()
            sys.exit(e.exit_code)
        cmd = e.ctx.command_path
        click.echo(f"{cmd}: error: {printable(e.format_message())} (see '{cmd} --help')", err=True)
        sys.exit(e.exit_code)
    except click.ClickException as e:
        click.echo(f"transferset: error: {printable(e.format_message())}", err=True)
        sys.exit(e.exit_code)
    except TransferSetError as e:
        click.echo(f"transferset: error: {printable(e.spelled(flag_for(e.option)))}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("transferset: interrupted", err=True)
        sys.exit(130)
    except BrokenPipeError:
        sys.exit(1)
    _version_notes()
    sys.exit(0)


def _version_notes() -> None:
    """After a command that succeeded: one warning line for each photo set it replayed with other Pillow /
    libjpeg-turbo versions than the set's (printed at the end, so that a command that fails says one line only)."""
    replay = sys.modules.get("transferset.inputs.replay")
    for note in replay.take_version_notes() if replay is not None else ():
        click.echo(f"transferset: WARNING: {printable(note)}", err=True)


if __name__ == "__main__":
    main()
