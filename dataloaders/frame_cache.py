"""Cache of the loader's frames, one file per video (issue 20; docs/design.md §1 Frames, §10).

``read_frames`` decodes, samples, resizes and crops a clip every time a training item asks for
it: with every caption a sample (MSR-VTT, ``--expand_msrvtt_sentences``) that is ~20 decodes of
each clip per epoch. The frame cache stores once exactly what ``read_frames`` returns, its real
frames uint8 [K, 3, S, S], and the loader copies them back from a memory map, bit for bit.
It is built by ``python -m preprocess.cache_frames`` (or prepare_data's ``frame_cache`` stage)
and read with ``--frame_cache DIR``. A cache directory holds:

- ``index.json``: the sampling fingerprint (``--max_frames``, ``--feature_framerate``,
  ``--slice_framepos``, the image size, the decoder and the versions of the decoding and
  resizing libraries); a run with other settings is refused, naming the flag.
- ``<video_id>.frames``, one entry per video: an 8-byte magic, the header length (uint32 LE),
  a JSON header (the video file's fingerprint, the sampling fingerprint, the frame count, the
  CRC-32 of the frame bytes, or the decode error of an unreadable video), padding to a 64-byte
  boundary, then the frames. Entries are written under a hidden temporary name and renamed,
  so a crash or a full disk never leaves a half entry under a final name.

An entry counts only if its video file still has the recorded size, mtime and sampled content
(``video_fingerprint``), its sampling fingerprint is the cache's, and its file has the length
its header promises; reading also checks the CRC-32. Anything else is refused with the video
and the command that rebuilds it (the builder rebuilds exactly those entries). An unreadable
video's entry makes the read raise the ``VideoReadError`` that decoding it would raise, so the
loader's fallback is the decode path's (``--skip_bad_videos``: replaced and counted).

Frame sampling is deterministic (no flag varies it per epoch), so the cache holds all the
frames a run can ask for. Shapes: F = max_frames, K <= F real frames, S = image_size.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import struct
import zlib
from typing import Dict, Optional, Tuple

import av
import cv2
import numpy as np
import torch
import torchvision

from atomic_io import write_json
from dataloaders.video import FrameSamplingConfig, VideoReadError

INDEX_FILE = "index.json"
ENTRY_SUFFIX = ".frames"
FORMAT_VERSION = 1
MAGIC = b"AVGFRM1\n"
PREFIX = struct.Struct("<8sI")  # magic, header length
DATA_ALIGN = 64
STATUS_OK, STATUS_UNREADABLE = "ok", "unreadable"
# Content sample of a video file: blocks at evenly spaced offsets (first and last included).
# Cheap enough to check every video when a loader opens (16 KiB read per video), and the
# head / tail blocks hold the mp4 index, which changes with any re-encode.
SAMPLE_BLOCKS = 4
SAMPLE_BLOCK_BYTES = 4096
BUILD_HINT = "python -m preprocess.cache_frames"
NAMES_SHOWN = 5
# What each sampling-fingerprint field is called on the command line, for refusals.
FLAG_OF = {
    "format_version": "the cache format version (rebuild the cache)",
    "max_frames": "--max_frames",
    "framerate": "--feature_framerate",
    "slice_framepos": "--slice_framepos",
    "image_size": "the image size (the CLIP model's input resolution; --image_size of the builder)",
    "decoder": "--decoder",
    "decoder_version": "the decoder library version (opencv-python-headless / av)",
    "resize_version": "the torchvision version (resize and crop)",
}
DECODER_VERSIONS = {"opencv": lambda: f"opencv {cv2.__version__}", "pyav": lambda: f"av {av.__version__}"}


class FrameCacheError(ValueError):
    """A frame cache that cannot serve this run: missing, foreign, stale, truncated or corrupt."""


def sampling_fingerprint(cfg: FrameSamplingConfig) -> dict:
    """Everything besides the video file that changes the cached frames."""
    fingerprint = {"format_version": FORMAT_VERSION, **dataclasses.asdict(cfg),
                   "decoder_version": DECODER_VERSIONS[cfg.decoder](),
                   "resize_version": f"torchvision {torchvision.__version__}"}
    return json.loads(json.dumps(fingerprint))  # the form it takes once stored


def video_fingerprint(path: str) -> dict:
    """File name, size, mtime (ns) and SHA-1 of ``SAMPLE_BLOCKS`` blocks spread over the file."""
    stat = os.stat(path)
    sha1 = hashlib.sha1()
    last = max(stat.st_size - SAMPLE_BLOCK_BYTES, 0)
    with open(path, "rb") as handle:
        for offset in sorted({last * k // (SAMPLE_BLOCKS - 1) for k in range(SAMPLE_BLOCKS)}):
            handle.seek(offset)
            sha1.update(handle.read(SAMPLE_BLOCK_BYTES))
    return {"name": os.path.basename(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
            "sample_sha1": sha1.hexdigest()}


def entry_path(directory: str, video_id: str) -> str:
    """Where the entry of ``video_id`` lives; ids that are not plain file names are refused."""
    if not video_id or video_id.startswith(".") or os.sep in video_id or "/" in video_id:
        raise FrameCacheError(f"video id {video_id!r} cannot name a frame cache entry in '{directory}' "
                              "(empty, hidden or with a path separator)")
    return os.path.join(directory, video_id + ENTRY_SUFFIX)


def data_offset(header_bytes: int) -> int:
    """Byte offset of the frames: after the prefix and header, rounded up to ``DATA_ALIGN``."""
    return -(-(PREFIX.size + header_bytes) // DATA_ALIGN) * DATA_ALIGN


def encode_entry(header: dict, frames: np.ndarray) -> Tuple[bytes, np.ndarray]:
    """(prefix + padded JSON header, contiguous frame bytes) of one entry; adds shape and CRC-32."""
    frames = np.ascontiguousarray(frames, dtype=np.uint8)
    header = {**header, "shape": list(frames.shape), "crc32": zlib.crc32(frames)}
    raw = json.dumps(header).encode()
    raw = raw.ljust(data_offset(len(raw)) - PREFIX.size, b" ")  # JSON ignores trailing spaces
    return PREFIX.pack(MAGIC, len(raw)) + raw, frames


def read_header(path: str) -> Tuple[dict, int]:
    """(header, data offset) of an entry; FrameCacheError when it is not a complete header."""
    with open(path, "rb") as handle:
        prefix = handle.read(PREFIX.size)
        if len(prefix) < PREFIX.size or prefix[:len(MAGIC)] != MAGIC:
            raise FrameCacheError(f"'{path}' is not a frame cache entry (bad magic or truncated header)")
        length = PREFIX.unpack(prefix)[1]
        raw = handle.read(length)
    if len(raw) < length:
        raise FrameCacheError(f"'{path}' is truncated inside its header")
    try:
        return json.loads(raw), PREFIX.size + length
    except json.JSONDecodeError as err:
        raise FrameCacheError(f"'{path}' has a damaged header ({err})") from err


def entry_bytes(header: dict, offset: int) -> int:
    """Length the entry's file must have."""
    return offset + int(np.prod(header["shape"]))


def entry_problem(path: str, video: dict, sampling: dict, check_crc: bool) -> Optional[str]:
    """None when the entry at ``path`` serves the video and settings given, else why not.

    Args:
        path: the entry file.
        video: ``video_fingerprint`` of the video file now.
        sampling: ``sampling_fingerprint`` of the run.
        check_crc: also read the frames and compare their CRC-32 (the builder's full check).
    """
    if not os.path.isfile(path):
        return "missing"
    try:
        header, offset = read_header(path)
    except FrameCacheError as err:
        return f"damaged ({err})"
    if header.get("sampling") != sampling:
        return "foreign (built with other sampling settings)"
    if header.get("video") != video:
        return f"stale (the video file changed: recorded {header.get('video')}, now {video})"
    size, expected = os.path.getsize(path), entry_bytes(header, offset)
    if size != expected:
        return f"truncated ({size} bytes, its header promises {expected})"
    if check_crc and header["status"] == STATUS_OK:
        frames = np.memmap(path, dtype=np.uint8, mode="r", offset=offset, shape=tuple(header["shape"]))
        if zlib.crc32(frames) != header["crc32"]:
            return "corrupt (CRC-32 of the frames differs from its header)"
    return None


def read_index(directory: str) -> dict:
    """index.json of a frame cache, with a clear error when there is none."""
    path = os.path.join(directory, INDEX_FILE)
    if not os.path.isfile(path):
        raise FrameCacheError(f"no frame cache in '{directory}' ({INDEX_FILE} missing); build it with "
                              f"`{BUILD_HINT}`")
    with open(path) as handle:
        return json.load(handle)


def check_sampling(directory: str, stored: dict, sampling: dict) -> None:
    """Refuse a cache built with other settings, naming each flag that differs."""
    differing = [f"{FLAG_OF.get(key, key)}: cache {stored.get(key)!r}, this run {sampling.get(key)!r}"
                 for key in sorted(set(stored) | set(sampling)) if stored.get(key) != sampling.get(key)]
    if differing:
        raise FrameCacheError(f"the frame cache '{directory}' was built with other settings ("
                              + "; ".join(differing) + "): pass the cache's values, or build a cache for "
                              f"these settings in another directory with `{BUILD_HINT}`")


def write_index(directory: str, sampling: dict) -> None:
    """Create ``directory`` with its index, or check the index already there."""
    path = os.path.join(directory, INDEX_FILE)
    if os.path.isfile(path):
        check_sampling(directory, read_index(directory)["sampling"], sampling)
        return
    os.makedirs(directory, exist_ok=True)
    write_json(path, {"format_version": FORMAT_VERSION, "sampling": sampling}, indent=None)


def _names(items) -> str:
    items = list(items)
    shown = ", ".join(items[:NAMES_SHOWN])
    return shown + (f" and {len(items) - NAMES_SHOWN} more" if len(items) > NAMES_SHOWN else "")


@dataclasses.dataclass(frozen=True)
class _Entry:
    path: str
    offset: int
    shape: Tuple[int, ...]
    crc32: int
    reason: Optional[str]  # the decode error of an unreadable video, else None


class FrameCache:
    """Read-only view of a frame cache for the videos of a split.

    Opening checks, once, that the cache was built with ``cfg`` and that every video has a valid
    entry (present, built from the video file as it is now, of the promised length); any problem
    raises ``FrameCacheError`` listing the videos and how to rebuild them. The object is small
    and picklable (DataLoader workers get a copy; each read maps the entry file anew).

    Args:
        directory: the cache directory.
        cfg: the run's frame settings.
        video_files: video_id -> video file of every video the loader may read.
    """

    def __init__(self, directory: str, cfg: FrameSamplingConfig, video_files: Dict[str, str]):
        self.directory = directory
        self.cfg = cfg
        self.video_files = dict(video_files)
        sampling = sampling_fingerprint(cfg)
        check_sampling(directory, read_index(directory)["sampling"], sampling)
        problems = {}
        for video_id, video_path in self.video_files.items():
            problem = entry_problem(entry_path(directory, video_id), video_fingerprint(video_path), sampling,
                                    check_crc=False)
            if problem is not None:
                problems[video_id] = problem
        if problems:
            first = next(iter(problems))
            raise FrameCacheError(
                f"the frame cache '{directory}' cannot serve {len(problems)} of {len(self.video_files)} videos "
                f"({_names(problems)}; e.g. {first}: {problems[first]}): rerun `{BUILD_HINT}` with these videos "
                "in --video_list and the same flags; it builds or rebuilds exactly these entries")
        self._entries = {video_id: self._entry(video_id) for video_id in self.video_files}

    def _entry(self, video_id: str) -> _Entry:
        path = entry_path(self.directory, video_id)
        header, offset = read_header(path)
        return _Entry(path, offset, tuple(header["shape"]), header["crc32"],
                      header.get("reason") if header["status"] == STATUS_UNREADABLE else None)

    def read(self, video_id: str) -> Tuple[torch.Tensor, torch.Tensor]:
        """The ``read_frames`` output of one video: frames uint8 [F, 3, S, S] (zeros past the real
        frames) and frame_mask bool [F]; raises the decode path's VideoReadError for a video
        recorded as unreadable, FrameCacheError for an entry damaged since the cache was opened."""
        entry = self._entries.get(video_id)
        if entry is None:
            raise KeyError(f"video {video_id!r} was not given to the frame cache '{self.directory}'")
        if entry.reason is not None:
            raise VideoReadError(self.video_files[video_id], f"{entry.reason} (recorded by the frame cache "
                                                             f"'{self.directory}' when it was built)")
        count, size = entry.shape[0], self.cfg.image_size
        frames = torch.zeros(self.cfg.max_frames, 3, size, size, dtype=torch.uint8)
        real = frames[:count].numpy()
        with open(entry.path, "rb") as handle:  # size and map from one descriptor: the same file
            expected, found = entry.offset + real.nbytes, os.fstat(handle.fileno()).st_size
            if found != expected:
                raise FrameCacheError(f"frame cache entry '{entry.path}' is truncated (now {found} bytes, "
                                      f"{expected} expected): rerun `{BUILD_HINT}` to rebuild it")
            np.copyto(real, np.memmap(handle, dtype=np.uint8, mode="r", offset=entry.offset, shape=entry.shape))
        if zlib.crc32(real) != entry.crc32:
            raise FrameCacheError(f"frame cache entry '{entry.path}' is corrupt (CRC-32 mismatch): rerun "
                                  f"`{BUILD_HINT}` to rebuild it")
        frame_mask = torch.zeros(self.cfg.max_frames, dtype=torch.bool)
        frame_mask[:count] = True
        return frames, frame_mask
