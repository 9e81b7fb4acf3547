"""Which part of a label run this process is: the explicit part, else torchrun's or a Slurm job array's.

Under torchrun (``RANK``, ``WORLD_SIZE``) process ``RANK`` is part ``RANK + 1`` of ``WORLD_SIZE``; in a Slurm job
array (``SLURM_ARRAY_TASK_ID``, ``SLURM_ARRAY_TASK_COUNT``, ``SLURM_ARRAY_TASK_MIN``, ``SLURM_ARRAY_TASK_STEP``)
task ``(ID - MIN) / STEP`` is part ``(ID - MIN) / STEP + 1`` of ``COUNT``; a torchrun inside each array task splits
that task's part again (part ``task * WORLD_SIZE + RANK + 1`` of ``COUNT * WORLD_SIZE``). A part given explicitly
wins over all of them. One part in all (``1/1``) is a single run.
"""

from __future__ import annotations

import os
from typing import Mapping

from ..errors import TransferSetError

__all__ = ["resolve_part", "threads_per_process"]


def _env_int(env: Mapping[str, str], name: str, default: int | None = None) -> int | None:
    value = env.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise TransferSetError(f"is not given, and {name}={value!r} in the environment is not a whole number",
                               option="part") from None


def _array_task(env: Mapping[str, str]) -> tuple[int, int] | None:
    """``(0-based task, tasks)`` of a Slurm job array, or None outside one."""
    count = _env_int(env, "SLURM_ARRAY_TASK_COUNT")
    task = _env_int(env, "SLURM_ARRAY_TASK_ID")
    if count is None or task is None:
        return None
    low, step = _env_int(env, "SLURM_ARRAY_TASK_MIN", 0), _env_int(env, "SLURM_ARRAY_TASK_STEP", 1) or 1
    index, off = divmod(task - low, step)
    if off or not 0 <= index < count:
        raise TransferSetError(f"is needed: SLURM_ARRAY_TASK_ID {task} is not one of {count} tasks from {low} in steps "
                               f"of {step} (an array with gaps); number the array 0..N-1 or give each task its part",
                               option="part")
    return index, count


def _environment_part(env: Mapping[str, str]) -> tuple[int, int]:
    world = _env_int(env, "WORLD_SIZE", 1)
    rank = _env_int(env, "RANK", 0) if world > 1 else 0
    task, tasks = _array_task(env) or (0, 1)
    return task * world + rank + 1, tasks * world


def resolve_part(part: tuple[int, int] | None, env: Mapping[str, str] | None = None) -> tuple[int, int] | None:
    """This process's part ``(I, N)`` (1-based), or None for a single run; an explicit ``part`` wins."""
    index, count = part if part is not None else _environment_part(os.environ if env is None else env)
    if not (isinstance(index, int) and isinstance(count, int) and 1 <= index <= count):
        raise TransferSetError(f"must be I/N with 1 <= I <= N, got {index}/{count}", option="part")
    return None if count == 1 else (index, count)


def threads_per_process(threads: int | None, env: Mapping[str, str] | None = None) -> int | None:
    """ONNX Runtime threads per session: ``threads``, else the cores shared among this machine's processes.

    torchrun sets ``LOCAL_WORLD_SIZE``: N processes each taking every core would oversubscribe the CPU.
    None (ONNX Runtime's own default, every core) for a single process.
    """
    if threads is not None:
        return threads
    local = _env_int(os.environ if env is None else env, "LOCAL_WORLD_SIZE", 1) or 1
    return None if local <= 1 else max(1, (os.cpu_count() or 1) // local)
