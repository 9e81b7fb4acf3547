"""Each option of label and train-student is declared once, on its options dataclass: the CLI's flags are built
from those fields, one flag a field, and a command given no option builds the dataclass's defaults."""

from __future__ import annotations

from dataclasses import fields

import click
import pytest

from transferset.cli import _options_from, cli, flag_for, main
from transferset.labelling.options import LabelOptions
from transferset.options import option
from transferset.targets import COMBINE_RULES
from transferset.training.options import TrainOptions

#: the flags of a command that are not options of its dataclass (the library function's own arguments)
_OWN = {"label": {"ensemble", "more_members", "data", "out"}, "train-student": {"transfer_set", "out"}}
#: the bare command line of each command: its required arguments, nothing else
_BARE = {"label": ["--ensemble", "a.onnx", "--out", "o"], "train-student": ["--transfer-set", "t", "--out", "o"]}
_CASES = [("label", LabelOptions), ("train-student", TrainOptions)]


@pytest.mark.parametrize("command, options", _CASES)
def test_every_field_is_exactly_one_flag_and_every_flag_a_field(command, options):
    params = cli.commands[command].params
    names = [p.name for p in params]
    assert len(names) == len(set(names))
    assert set(names) - _OWN[command] == {f.name for f in fields(options)}
    flags = [o for p in params for o in p.opts + p.secondary_opts]
    assert len(flags) == len(set(flags)), "two options share a flag"
    for f in fields(options):
        assert f.metadata.get("help"), f"{f.name} is declared without help"


@pytest.mark.parametrize("command, options", _CASES)
def test_a_bare_command_builds_the_dataclass_defaults(command, options):
    ctx = cli.commands[command].make_context(command, list(_BARE[command]))
    got = _options_from(options, {k: v for k, v in ctx.params.items() if k not in _OWN[command]})
    want = options()
    for f in fields(options):
        if f.metadata.get("parse") == "as_given":  # kept as the flag spells it (a set's definition hash holds it)
            assert getattr(got, f.name) == f.metadata["cli_default"], f.name
        else:
            assert getattr(got, f.name) == getattr(want, f.name), f.name


def test_flags_are_read_as_their_fields_declare():
    ctx = cli.commands["label"].make_context("label", _BARE["label"] + [
        "--temperatures", "1,3", "--mean", "0.5", "--part", "2/3", "--output-kind", "logits", "--hint", "a",
        "--hint", "b:member=1", "--no-clean-view", "-q", "--compression", "gzip"])
    o = _options_from(LabelOptions, {k: v for k, v in ctx.params.items() if k not in _OWN["label"]})
    assert (o.temperatures, o.mean, o.part, o.output_kind, o.hints) == ((1.0, 3.0), (0.5,), (2, 3), "logits",
                                                                        ("a", "b:member=1"))
    assert (o.clean_view, o.quiet, o.compression) == (False, True, "gzip")
    ctx = cli.commands["train-student"].make_context("train-student", _BARE["train-student"] + [
        "--clip-grad", "0", "-T", "2", "--hint-loss", "fitnet:hint_0=fc", "--lr", "0.01"])
    o = _options_from(TrainOptions, {k: v for k, v in ctx.params.items() if k not in _OWN["train-student"]})
    assert (o.clip_grad, o.temperature, o.hint_loss, o.lr) == (None, 2.0, ("fitnet:hint_0=fc",), 0.01)


def test_a_declared_flag_spelling_reaches_error_messages_and_a_bad_declaration_is_refused():
    assert flag_for("hints") == "--hint" and flag_for("hint_loss") == "--hint-loss"
    with pytest.raises(TypeError, match="choises"):
        option(None, "help", choises=("a",))


def test_a_bad_part_names_its_flag(capsys):
    with pytest.raises(SystemExit) as e:
        main(["label"] + _BARE["label"] + ["--part", "x"])
    assert e.value.code == 2 and "--part" in capsys.readouterr().err


def test_combine_choices_are_the_combination_rules_everywhere():
    for command in ("label", "train-student", "evaluate"):
        combine = next(p for p in cli.commands[command].params if p.name == "combine")
        assert isinstance(combine.type, click.Choice) and tuple(combine.type.choices) == COMBINE_RULES
