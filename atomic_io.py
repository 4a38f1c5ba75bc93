"""Atomic file writes: every file is written under a temporary name beside its final path,
flushed to disk, then renamed over the final path. A reader (or a resumed run after a
crash or preemption) sees the old file or the new one, never half of one; a failed write
leaves nothing behind.

    with atomic_path("sim_matrix.npy") as tmp:   # any writer that takes a path
        np.save(tmp, sim)
    write_json("metrics.json", metrics)
    save_torch(state, "training_state.pt")
"""
from __future__ import annotations

import contextlib
import json
import os
import re
from typing import Any, Iterator

# In every temporary name; cleanup code and tests look for it.
TEMP_MARKER = ".tmp"


def temp_path(final_path: str) -> str:
    """Hidden per-process temporary name next to ``final_path``, keeping its extension (writers
    such as ``np.save`` or ffmpeg choose their format by it)."""
    folder, name = os.path.split(final_path)
    stem, ext = os.path.splitext(name)
    return os.path.join(folder, f".{stem}.{os.getpid()}{TEMP_MARKER}{ext}")


TEMP_NAME = re.compile(r"^\..+\.\d+" + re.escape(TEMP_MARKER) + r"(\.[^.]+)?$")


def stale_temporaries(directory: str) -> list:
    """Names of the temporaries that writers killed mid-write left in ``directory`` (sorted)."""
    return sorted(name for name in os.listdir(directory) if TEMP_NAME.match(name))


def _flush_to_disk(path: str) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


@contextlib.contextmanager
def atomic_path(final_path: str) -> Iterator[str]:
    """Yield a temporary path (its folder created if missing); when the block succeeds, the file
    written there replaces ``final_path``; when it raises, the temporary file is deleted."""
    final_path = os.fspath(final_path)
    os.makedirs(os.path.dirname(os.path.abspath(final_path)), exist_ok=True)
    tmp = temp_path(final_path)
    try:
        yield tmp
        _flush_to_disk(tmp)
        os.replace(tmp, final_path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text(path: str, text: str) -> None:
    with atomic_path(path) as tmp, open(tmp, "w") as handle:
        handle.write(text)


def write_json(path: str, obj: Any, indent: int | None = 2, default=str) -> None:
    """JSON (``indent`` None = one line; objects JSON cannot encode go through ``default``)."""
    with atomic_path(path) as tmp, open(tmp, "w") as handle:
        json.dump(obj, handle, indent=indent, default=default)


def save_torch(obj: Any, path: str) -> None:
    """``torch.save`` (imported here so that torch-free callers need no torch)."""
    import torch
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
