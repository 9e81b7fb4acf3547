"""The CLI agrees with the options dataclasses: every field has its flag, with the dataclass's default (or the
CLI's spelling of it), and the choices come from the library's tables."""

from __future__ import annotations

from dataclasses import fields

import pytest

from transferset.cli import cli
from transferset.labelling.options import LabelOptions
from transferset.targets import COMBINE_RULES
from transferset.training.options import TrainOptions

#: flags whose parameter is named otherwise than the field
_PARAM = {"license": "license_", "export_onnx": "export_path"}
#: what the CLI reads differently from the library, on purpose: "auto" means None, a comma list a tuple, and a
#: set's definition hash records the CLI's "none" compression
_CLI_DEFAULTS = {("label", "compression"): "none", ("label", "output_kind"): "auto",
                 ("label", "temperatures"): "1,2,4,8,20"}


@pytest.mark.parametrize("command, options", [("label", LabelOptions), ("train-student", TrainOptions)])
def test_every_option_field_is_one_flag_with_the_dataclass_default(command, options):
    params = {p.name: p for p in cli.commands[command].params}
    for f in fields(options):
        p = params.get(_PARAM.get(f.name, f.name))
        assert p is not None, f"{command} has no flag for {f.name}"
        want = _CLI_DEFAULTS.get((command, f.name), f.default)
        default = False if getattr(p, "is_flag", False) and not p.secondary_opts and p.default is not True \
            else p.default  # a plain flag is False when not given
        if getattr(p, "multiple", False) and not isinstance(p.default, (list, tuple)):
            default = ()  # a repeatable flag not given is an empty tuple
        assert default == want, f.name


def test_combine_choices_are_the_combination_rules_everywhere():
    for command in ("label", "train-student", "evaluate"):
        combine = next(p for p in cli.commands[command].params if p.name == "combine")
        assert tuple(combine.type.choices) == COMBINE_RULES
