"""How a command's option is declared once: a dataclass field that carries its help and its command-line spelling.

The options dataclasses (``LabelOptions``, ``TrainOptions``) declare each option with :func:`option`; the CLI builds
every flag from those fields (name, type, default, choices, help), so adding an option is one edit. The library
still parses nothing: the metadata is data the CLI reads.
"""

from __future__ import annotations

from dataclasses import Field, field
from typing import Any

__all__ = ["option", "CLI_KEYS", "PARSERS"]

#: what the command line may say about an option beyond its help, and what each key means
CLI_KEYS = {
    "flag": "the long flag when it is not -- + the field's name with dashes (``hints`` -> ``--hint``)",
    "short": "a one-letter alias such as -q",
    "choices": "the values allowed (a table from the library, never typed twice)",
    "metavar": "how the help names the value",
    "path": "the value is a file or folder (shown as PATH)",
    "parse": "how the flag's text becomes the field's value: one of PARSERS",
}
#: the readings a flag's text may need before it is the field's value (the CLI holds the functions)
PARSERS = (
    "floats",        # "1,2.5" -> (1.0, 2.5); empty -> None
    "floats_tuple",  # as floats, but empty -> ()
    "part",          # "I/N" -> (I, N)
    "auto",          # the choices gain "auto", the default flag value; "auto" -> None
    "zero_off",      # 0 -> None (the option is off)
    "as_given",      # kept as the flag's text even where the default differs (see ``cli_default``)
)


def option(default: Any, help: str, *, cli_default: Any = None, **cli: Any) -> Field:
    """A dataclass field with ``default`` and the option's ``help``; ``cli`` takes the keys of :data:`CLI_KEYS`.

    ``cli_default`` is the flag's own default where the command line spells it otherwise than the library (for
    example ``"1,2,4,8,20"`` for a tuple of temperatures); parsed, it must give the field's default, except where
    ``parse="as_given"`` says the text is kept as it is.
    """
    unknown = sorted(set(cli) - set(CLI_KEYS))
    if unknown or cli.get("parse", "floats") not in PARSERS:
        raise TypeError(f"option(): unknown keys {unknown} or parse {cli.get('parse')!r}")
    meta = {"help": help, **cli}
    if cli_default is not None:
        meta["cli_default"] = cli_default
    return field(default=default, metadata=meta)
