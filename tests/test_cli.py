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


_BLAS_PROBE = ("import os, sys; sys.argv = [os.environ.get('PROBE_ARGV0', 'transferset')] + sys.argv[1:]; "
               "import transferset.cli, numpy; "
               "print(os.environ.get('OPENBLAS_NUM_THREADS'), "
               "len(os.listdir('/proc/self/task')) if os.path.isdir('/proc/self/task') else -1)")


@pytest.mark.parametrize("argv, preset, expect, argv0", [
    (["label", "--help"], None, "1", "transferset"),
    (["verify", "x"], None, "1", "/venv/bin/transferset"),
    (["label", "--help"], None, "1", "/src/transferset/__main__.py"),  # python -m transferset
    (["train-student", "--help"], None, None, "transferset"),
    (["demo"], None, None, "transferset"),
    (["label", "--help"], "3", "3", "transferset"),  # what the user set is kept
    (["label"], None, None, "my_script.py"),  # another program that imports transferset.cli
])
def test_elementwise_commands_load_numpy_with_one_blas_thread(argv, preset, expect, argv0):
    """label and the other numpy-only commands start numpy's OpenBLAS with one thread (no spinning threads beside
    ONNX Runtime); training commands keep the default; a value in the environment is the user's; a program that
    only imports the module is left alone."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    env["PROBE_ARGV0"] = argv0
    if preset is not None:
        env["OPENBLAS_NUM_THREADS"] = preset
    out = subprocess.run([sys.executable, "-c", _BLAS_PROBE, *argv], env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    assert out[0] == str(expect)
    if expect == "1" and out[1] != "-1":
        assert out[1] == "1"  # no OpenBLAS thread started beside the main one (Linux)


def test_one_blas_thread_does_nothing_once_numpy_is_loaded(monkeypatch):
    from transferset.cli import one_blas_thread

    monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
    assert not one_blas_thread(["label"])  # numpy is loaded in this process: too late to matter, so left alone
    assert "OPENBLAS_NUM_THREADS" not in __import__("os").environ
