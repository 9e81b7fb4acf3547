"""transferset: offline knowledge distillation through shareable transfer sets."""

from .errors import TransferSetError

__version__ = "0.1.0"
SCHEMA_VERSION = 1

__all__ = ["TransferSetError", "__version__", "SCHEMA_VERSION", "open_transfer_set"]


def open_transfer_set(path, **kwargs):
    """Open a transfer-set folder: returns ``(manifest, dataset)``; see :mod:`transferset.stream`."""
    from .stream import open_transfer_set as _open

    return _open(path, **kwargs)
