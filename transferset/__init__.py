"""transferset: offline knowledge distillation through shareable transfer sets.

The public API, importable from here (each loads its stage lazily, so ``import transferset`` stays light):
``label`` (stage 1), ``train_student`` (stage 2), ``open_transfer_set`` (read a set) and ``evaluate``.
"""

from .errors import TransferSetError

__version__ = "0.1.0"
SCHEMA_VERSION = 4  #: the newest schema this version reads and writes (every new set 4; it reads 1 to 3 as before)

__all__ = ["TransferSetError", "__version__", "SCHEMA_VERSION", "open_transfer_set", "label", "train_student",
           "evaluate"]

_LAZY = {"open_transfer_set": "training.reader", "label": "labelling.pipeline", "train_student": "training.loop",
         "evaluate": "evaluate"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'transferset' has no attribute {name!r}")
