"""The one exception type for failures a user can act on, and the one warning the command line says its own way."""

from __future__ import annotations

__all__ = ["TransferSetError", "ReplayVersionWarning", "USAGE", "FAILED", "printable"]

USAGE = 2  #: exit code for bad usage or bad input
FAILED = 1  #: exit code for a run that failed (I/O error, corrupt shard, diverging teacher)


class TransferSetError(Exception):
    """A failure with a message that names the culprit and what to do.

    ``option`` names the option at fault as data (the library's name, e.g. ``"batch_size"``); the message then
    reads as what follows the option's name. ``str(error)`` spells it the library's way (``batch_size must be
    >= 1``); the CLI spells it as its flag (``--batch-size must be >= 1``) and prints one line on stderr, exiting
    with ``error.exit_code``. The library never names a command-line flag itself.
    """

    def __init__(self, message: str, exit_code: int = USAGE, option: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code
        self.option = option

    def spelled(self, name: str | None) -> str:
        """The message with the option written as ``name`` (a flag, say), or as the bare message."""
        return f"{name} {self.message}" if name else self.message

    def __str__(self) -> str:
        return self.spelled(self.option)


class ReplayVersionWarning(UserWarning):
    """A photo set is replayed with other Pillow / libjpeg-turbo versions than decoded it: pixels may differ.

    Here, beside the exception, so that the command line filters it by class without importing the replay (it says
    each note once its command has succeeded instead, :func:`transferset.inputs.replay.take_version_notes`)."""


def printable(text) -> str:
    """``text`` with every non-printable character (ANSI escapes, newlines, bidi controls) written as an escape.

    Strings from a transfer set (class names, file names, shard paths) pass through this before they reach a
    terminal, so a shared set cannot move the cursor, recolour the screen or forge extra output lines.
    """
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))
