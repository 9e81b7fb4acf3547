"""The one exception type for failures a user can act on."""

from __future__ import annotations

__all__ = ["TransferSetError", "USAGE", "FAILED", "printable"]

USAGE = 2  #: exit code for bad usage or bad input
FAILED = 1  #: exit code for a run that failed (I/O error, corrupt shard, diverging teacher)


class TransferSetError(Exception):
    """A failure with a message that names the culprit and what to do.

    The CLI prints ``str(error)`` as one line on stderr and exits with ``error.exit_code``.
    """

    def __init__(self, message: str, exit_code: int = USAGE) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def printable(text) -> str:
    """``text`` with every non-printable character (ANSI escapes, newlines, bidi controls) written as an escape.

    Strings from a transfer set (class names, file names, shard paths) pass through this before they reach a
    terminal, so a shared set cannot move the cursor, recolour the screen or forge extra output lines.
    """
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))
