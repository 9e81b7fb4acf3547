"""The command line's help: every option says what it does, every command shows one example."""

from __future__ import annotations

import click
import pytest

from transferset.cli import cli, main


def test_every_option_has_help_and_every_command_an_example():
    for name, cmd in cli.commands.items():
        bare = [p.opts[0] for p in cmd.params if isinstance(p, click.Option) and not p.help]
        assert not bare, f"{name}: options without help: {bare}"
        assert cmd.epilog and f"transferset {name}" in cmd.epilog, name


@pytest.mark.parametrize("command", ["label", "train-student", "report"])
def test_help_shows_the_example_as_written(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and f"Example:\n    transferset {command} " in out
    assert "\\\\" not in out  # continuation lines end in one backslash, as a shell wants
