"""``python -m transferset``: the same as the ``transferset`` command."""

from .cli import main

main()
