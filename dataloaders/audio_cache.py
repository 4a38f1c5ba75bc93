"""Cache of the frozen AST trunk's tokens, one row per video (docs/design.md §1, §10).

The AST trunk never trains, so ``AST.tokens`` is computed once per clip by
preprocess/cache_audio_features.py and training reads it back. A cache directory holds:

- ``tokens.npy``: [N, A, W] float16, read as a memory map (one row per video);
- ``done.npy`` / ``has_audio.npy``: [N] bool, a row counts only once marked done (so an
  interrupted run resumes), ``has_audio`` False for videos cached from the zero input;
- ``index.json``: video_id -> row, the array shape and dtype, and a fingerprint of what
  produced the tokens (checkpoint file name, size and hash of its first MB, fbank
  settings) so a cache built from other weights or settings is refused.

Shapes: N videos, A audio tokens (1213), W AST width (768).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Iterable, Optional, Sequence

import numpy as np

from atomic_io import write_json

TOKENS_FILE = "tokens.npy"
DONE_FILE = "done.npy"
HAS_AUDIO_FILE = "has_audio.npy"
INDEX_FILE = "index.json"
CACHE_DTYPE = np.float16
FORMAT_VERSION = 1
FINGERPRINT_HEAD_BYTES = 1 << 20
BUILD_HINT = "build it with `python -m preprocess.cache_audio_features`"


def checkpoint_fingerprint(path: str) -> dict:
    """File name, size and SHA-1 of the first MB: cheap, and differs between checkpoints."""
    with open(path, "rb") as handle:
        head_sha1 = hashlib.sha1(handle.read(FINGERPRINT_HEAD_BYTES)).hexdigest()
    return {"name": os.path.basename(path), "size": os.path.getsize(path), "head_sha1": head_sha1}


def cache_fingerprint(checkpoint_path: str, fbank_cfg) -> dict:
    """What the cached tokens depend on: the AST checkpoint and the fbank settings.

    Args:
        checkpoint_path: the AST AudioSet checkpoint the tokens are computed with.
        fbank_cfg: the ``dataloaders.audio.FbankConfig`` (any dataclass) of the AST input.
    """
    fingerprint = {"checkpoint": checkpoint_fingerprint(checkpoint_path),
                   "fbank": dataclasses.asdict(fbank_cfg)}
    return json.loads(json.dumps(fingerprint))  # the form it takes once stored


def read_index(directory: str) -> dict:
    """index.json of a cache directory, with a clear error when there is none."""
    path = os.path.join(directory, INDEX_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no AST feature cache in '{directory}' ({INDEX_FILE} missing); "
                                f"{BUILD_HINT}")
    with open(path) as handle:
        return json.load(handle)


def check_fingerprint(directory: str, index: dict, fingerprint: dict) -> None:
    """Refuse a cache built from another checkpoint or other fbank settings."""
    stored = index.get("fingerprint")
    if stored != fingerprint:
        raise ValueError(
            f"stale AST feature cache in '{directory}': built with {stored}, but this run uses "
            f"{fingerprint}; delete the directory or choose another one, then {BUILD_HINT}")


# The fingerprint fields that identify a trunk's weights (the file name may differ between copies).
TRUNK_IDENTITY = ("size", "head_sha1")


def check_cache_trunk(directory: str, trunk_path: str) -> None:
    """Refuse a cache whose tokens were computed by another AST trunk than ``trunk_path`` (the
    checkpoint file the model's trunk comes from), naming both."""
    stored = (read_index(directory).get("fingerprint") or {}).get("checkpoint")
    if not isinstance(stored, dict):
        raise ValueError(f"the AST feature cache '{directory}' does not record which AST checkpoint built it, so "
                         f"its tokens cannot be checked against the trunk in use ({trunk_path}); rebuild it: "
                         f"{BUILD_HINT}")
    actual = checkpoint_fingerprint(trunk_path)
    if any(stored.get(key) != actual[key] for key in TRUNK_IDENTITY):
        raise ValueError(f"the AST feature cache '{directory}' was built with the AST checkpoint {stored}, but this "
                         f"model's trunk is {trunk_path} ({actual}): its tokens are another trunk's. Pass the "
                         f"cache of this trunk, or --audio_path (the wavs), or {BUILD_HINT} --checkpoint "
                         f"{trunk_path}")


class AudioFeatureCache:
    """Read-only view of a cache directory: per-video AST tokens from the memory map.

    The memory map is opened lazily in each process and left out of pickles, so
    DataLoader workers share the page cache instead of copying the file.

    Args:
        directory: the cache directory.
        fingerprint: expected ``cache_fingerprint``; when given, a mismatch raises.
    """

    def __init__(self, directory: str, fingerprint: Optional[dict] = None):
        self.directory = directory
        index = read_index(directory)
        if fingerprint is not None:
            check_fingerprint(directory, index, fingerprint)
        self._rows = index["rows"]
        self.shape = tuple(index["shape"])
        self._done = np.load(os.path.join(directory, DONE_FILE))
        self._has_audio = np.load(os.path.join(directory, HAS_AUDIO_FILE))
        self._tokens = None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_tokens"] = None
        return state

    def _token_map(self) -> np.ndarray:
        if self._tokens is None:
            tokens = np.load(os.path.join(self.directory, TOKENS_FILE), mmap_mode="r")
            if tokens.shape != self.shape or tokens.dtype != CACHE_DTYPE:
                raise ValueError(f"'{self.directory}/{TOKENS_FILE}' holds {tokens.dtype} "
                                 f"{tokens.shape}, index says {CACHE_DTYPE.__name__} "
                                 f"{self.shape}; {BUILD_HINT}")
            self._tokens = tokens
        return self._tokens

    def _row(self, video_id: str) -> int:
        row = self._rows.get(video_id)
        if row is None:
            raise KeyError(f"video '{video_id}' is not in the AST feature cache "
                           f"'{self.directory}'; {BUILD_HINT} with this video listed")
        if not self._done[row]:
            raise KeyError(f"video '{video_id}' is not computed yet in the AST feature cache "
                           f"'{self.directory}'; rerun `python -m preprocess.cache_audio_features` "
                           "to finish it")
        return row

    def __contains__(self, video_id: str) -> bool:
        row = self._rows.get(video_id)
        return row is not None and bool(self._done[row])

    def __len__(self) -> int:
        return int(self._done.sum())

    def tokens(self, video_id: str) -> np.ndarray:
        """AST tokens of one video [A, W] float16 (a copy of its row, not a view)."""
        return np.array(self._token_map()[self._row(video_id)])

    def has_audio(self, video_id: str) -> bool:
        """False when the video's tokens come from the zero input (no usable soundtrack)."""
        return bool(self._has_audio[self._row(video_id)])


class AudioCacheWriter:
    """Creates a cache directory, or reopens one to resume it.

    Args:
        directory: the cache directory (created if needed).
        video_ids: the videos of the cache, in row order; must match on resume.
        fingerprint: ``cache_fingerprint`` of this run; must match on resume.
        num_tokens: A, tokens per video.
        width: W, token width.
    """

    def __init__(self, directory: str, video_ids: Sequence[str], fingerprint: dict,
                 num_tokens: int, width: int):
        if len(set(video_ids)) != len(video_ids):
            raise ValueError(f"duplicate video ids given for the AST feature cache '{directory}'")
        self.directory = directory
        self.video_ids = list(video_ids)
        shape = (len(self.video_ids), num_tokens, width)
        if os.path.isfile(os.path.join(directory, INDEX_FILE)):
            self._check_resumable(fingerprint, shape)
            self._open("r+", shape)
        else:
            os.makedirs(directory, exist_ok=True)
            self._open("w+", shape)
            # Written last: an index marks a fully allocated cache.
            write_json(os.path.join(directory, INDEX_FILE), indent=None, obj={
                "format_version": FORMAT_VERSION,
                "rows": {vid: row for row, vid in enumerate(self.video_ids)},
                "shape": list(shape),
                "dtype": np.dtype(CACHE_DTYPE).name,
                "fingerprint": fingerprint,
            })

    def _check_resumable(self, fingerprint: dict, shape: tuple) -> None:
        index = read_index(self.directory)
        check_fingerprint(self.directory, index, fingerprint)
        rows = {vid: row for row, vid in enumerate(self.video_ids)}
        if index["rows"] != rows or tuple(index["shape"]) != shape:
            raise ValueError(
                f"the AST feature cache '{self.directory}' was started for other videos or another "
                f"token shape ({len(index['rows'])} videos, shape {index['shape']}; now "
                f"{len(rows)} videos, shape {list(shape)}); use a new directory")

    def _open(self, mode: str, shape: tuple) -> None:
        def array(name: str, dtype, array_shape: tuple) -> np.memmap:
            path = os.path.join(self.directory, name)
            if mode == "w+":
                return np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=array_shape)
            return np.load(path, mmap_mode="r+")

        self._tokens = array(TOKENS_FILE, CACHE_DTYPE, shape)
        self._has_audio = array(HAS_AUDIO_FILE, np.bool_, shape[:1])
        self._done = array(DONE_FILE, np.bool_, shape[:1])

    def pending_rows(self) -> np.ndarray:
        """Rows not computed yet, ascending."""
        return np.flatnonzero(~self._done)

    def write(self, rows: Iterable[int], tokens: np.ndarray, has_audio: Iterable[bool]) -> None:
        """Store a batch and only then mark its rows done (so a crash never leaves a half row).

        Args:
            rows: row indices [b].
            tokens: AST tokens [b, A, W] (cast to float16).
            has_audio: per-row soundtrack flags [b].
        """
        rows = np.asarray(list(rows), dtype=np.int64)
        tokens = np.asarray(tokens).astype(CACHE_DTYPE)
        if not np.isfinite(tokens).all():
            bad = [self.video_ids[r] for r, t in zip(rows, tokens) if not np.isfinite(t).all()]
            raise ValueError(f"AST tokens of {bad} are not finite in float16; not cached in "
                             f"'{self.directory}'")
        self._tokens[rows] = tokens
        self._has_audio[rows] = np.asarray(list(has_audio), dtype=np.bool_)
        self._tokens.flush()
        self._has_audio.flush()
        self._done[rows] = True
        self._done.flush()
