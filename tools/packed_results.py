"""Per-query 0/1 vectors of a results dict, stored bit-packed beside its JSON.

A study's JSON keeps its tables and summaries; the per-query hit vectors (one 0/1 per query,
per row, seed, protocol and subset) would make it megabytes. ``pack_bits`` moves every list
stored under a given key into arrays packed 8 per byte and leaves a reference in its place,
``{"packed": <array name>, "count": <length>}``; ``unpack_bits`` puts the lists back, so
code that reads the results sees the same dict either way. ``write_npz`` writes the arrays
with fixed zip timestamps: unchanged results rewrite identical bytes.
"""
from __future__ import annotations

import copy
import io
import zipfile
from typing import Dict, Tuple

import numpy as np

from atomic_io import atomic_path

# Zip entries carry a modification time; a fixed one keeps the archive's bytes reproducible.
FIXED_ZIP_TIME = (1980, 1, 1, 0, 0, 0)


def _references(node, path: str, field: str):
    """Yield (container, array name) for every ``field`` entry below ``node``."""
    if isinstance(node, dict):
        for key, value in node.items():
            name = f"{path}/{key}" if path else str(key)
            if key == field:
                yield node, name
            else:
                yield from _references(value, name, field)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _references(value, f"{path}/{i}", field)


def pack_bits(results: dict, field: str) -> Tuple[dict, Dict[str, np.ndarray]]:
    """A copy of ``results`` whose ``field`` lists are references, and the packed arrays.

    Args:
        results: a JSON-like dict; every value under key ``field`` is a list of 0/1 (or bools).
        field: the key of the per-query vectors (e.g. "t2v_hits_R@1").

    Returns:
        (results with ``{"packed": name, "count": n}`` in place of each list,
         {name: uint8 array [ceil(n / 8)]}).
    """
    out = copy.deepcopy(results)
    arrays = {}
    for container, name in _references(out, "", field):
        bits = np.asarray(container[field])
        if bits.ndim != 1 or not np.isin(bits, (0, 1)).all():
            raise ValueError(f"tools/packed_results.py: {name} must be a list of 0/1 values to be packed")
        arrays[name] = np.packbits(bits.astype(bool))
        container[field] = {"packed": name, "count": int(bits.size)}
    return out, arrays


def unpack_bits(results: dict, arrays: Dict[str, np.ndarray], field: str) -> dict:
    """``results`` with each ``field`` reference replaced by its list of 0/1 ints (a copy)."""
    out = copy.deepcopy(results)
    for container, name in _references(out, "", field):
        ref = container[field]
        if isinstance(ref, list):  # already a list (results written before packing)
            continue
        if ref["packed"] not in arrays:
            raise KeyError(f"tools/packed_results.py: array {ref['packed']} is missing from the .npz "
                           "beside the results JSON; rewrite both with the study's writer")
        container[field] = np.unpackbits(arrays[ref["packed"]], count=ref["count"]).astype(int).tolist()
    return out


def write_npz(path: str, arrays: Dict[str, np.ndarray]) -> None:
    """Like ``np.savez_compressed`` (``np.load`` reads it), with sorted entries and fixed times."""
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as archive:
        for name in sorted(arrays):
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, np.asarray(arrays[name]), allow_pickle=False)
            archive.writestr(zipfile.ZipInfo(f"{name}.npy", date_time=FIXED_ZIP_TIME), buffer.getvalue(),
                             compress_type=zipfile.ZIP_DEFLATED)


def read_npz(path: str) -> Dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return {name: data[name] for name in data.files}
