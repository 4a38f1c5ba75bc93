"""Decode every video once into a frame cache (dataloaders/frame_cache.py), read with --frame_cache.

    python -m preprocess.cache_frames --video_list MSRVTT_train.9k.csv MSRVTT_JSFUSION_test.csv \
        --features_path data/msrvtt/videos --cache_dir data/msrvtt/frame_cache \
        --max_frames 12 --feature_framerate 1 --slice_framepos 2 --image_size 224 --decoder opencv

The flags must be those of the training run (run.sh's are the defaults); a run with other values
is refused by the loader, naming the flag. Each entry is exactly ``read_frames``' output, made by
calling it. Rerunning the same command resumes an interrupted build: every entry is checked
(video file unchanged, settings, length, CRC-32) and only missing or bad ones are (re)built.
A video that fails to decode is reported here, once, and recorded in its entry: the loader
then raises the decode path's VideoReadError for it (``--skip_bad_videos`` replaces and counts
it). A video id without a file is counted and listed, and gets no entry (the loader's
``--skip_bad_videos`` drops it before the cache is consulted). A write that fails (a full
disk) leaves no entry under a final name; the build stops and names the directory.
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import logging
import multiprocessing
import os
import shutil
import sys
import time
from typing import Dict, Iterable, Optional, Sequence, Tuple

import numpy as np
import torch
from tqdm import tqdm

from atomic_io import TEMP_MARKER, atomic_path
from dataloaders.base import find_video_files
from dataloaders.frame_cache import (ENTRY_SUFFIX, STATUS_OK, STATUS_UNREADABLE, FrameCacheError, encode_entry,
                                     entry_path, entry_problem, sampling_fingerprint, video_fingerprint,
                                     write_index)
from dataloaders.video import DECODERS, DEFAULT_DECODER, FrameSamplingConfig, VideoReadError, read_frames
from preprocess.cache_audio_features import read_video_ids

logger = logging.getLogger("cache_frames")
OUTCOMES = ("built", "kept", "unreadable", "failed_write")


@dataclasses.dataclass(frozen=True)
class Job:
    """One video to check and, when needed, (re)build."""

    video_id: str
    video_path: str
    directory: str
    cfg: FrameSamplingConfig


def write_entry(path: str, header: dict, frames: np.ndarray) -> None:
    """Write one entry atomically (``atomic_io``: temporary name, flushed to disk, renamed)."""
    prefix, data = encode_entry(header, frames)
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        handle.write(prefix)
        handle.write(data.reshape(-1))  # contiguous uint8: written without a copy


def build_entry(job: Job) -> Tuple[str, str, str]:
    """Check the entry of ``job.video_id`` and (re)build it if needed.

    Returns:
        (video_id, outcome, detail): outcome is one of ``OUTCOMES``; detail is why an entry was
        rebuilt, the decode error of an unreadable video, or the write error.
    """
    path = entry_path(job.directory, job.video_id)
    video = video_fingerprint(job.video_path)
    sampling = sampling_fingerprint(job.cfg)
    problem = entry_problem(path, video, sampling, check_crc=True)
    if problem is None:
        return job.video_id, "kept", ""
    header = {"video_id": job.video_id, "video": video, "sampling": sampling, "status": STATUS_OK}
    size = job.cfg.image_size
    try:
        frames, frame_mask = read_frames(job.video_path, job.cfg)
        frames = frames[frame_mask].numpy()  # [K, 3, S, S], the real frames
        outcome, detail = "built", ("" if problem == "missing" else problem)
    except VideoReadError as err:
        frames = np.zeros((0, 3, size, size), dtype=np.uint8)
        header.update(status=STATUS_UNREADABLE, reason=err.reason)
        outcome, detail = "unreadable", err.reason
    try:
        write_entry(path, header, frames)
    except OSError as err:
        return job.video_id, "failed_write", f"{type(err).__name__}: {err}"
    return job.video_id, outcome, detail


def _init_worker() -> None:
    torch.set_num_threads(1)  # one decode per process, as DataLoader workers run


def _run(jobs: Sequence[Job], workers: int) -> Iterable[Tuple[str, str, str]]:
    if workers <= 1:
        _init_worker()
        yield from map(build_entry, jobs)
        return
    with multiprocessing.get_context("fork").Pool(workers, initializer=_init_worker) as pool:
        yield from pool.imap_unordered(build_entry, jobs)


def remove_stale_temporaries(directory: str) -> int:
    """Delete temporaries an interrupted build left (hidden ``.<id>.<pid>.tmp.frames`` files)."""
    leftovers = glob.glob(os.path.join(directory, f".*{TEMP_MARKER}{ENTRY_SUFFIX}"))
    for path in leftovers:
        os.remove(path)
    return len(leftovers)


def build_frame_cache(directory: str, video_files: Dict[str, str], cfg: FrameSamplingConfig,
                      workers: int = 0, missing: Sequence[str] = ()) -> dict:
    """Create or resume the cache of ``video_files`` (video_id -> file) in ``directory``.

    Returns a summary: counts per outcome, the unreadable videos and their errors, entries
    rebuilt and why, ``missing`` (ids without a video file), seconds and bytes written. Raises
    FrameCacheError for a cache built with other settings, OSError when writing fails.
    """
    write_index(directory, sampling_fingerprint(cfg))
    removed = remove_stale_temporaries(directory)
    jobs = [Job(video_id, path, directory, cfg) for video_id, path in video_files.items()]
    counts = dict.fromkeys(OUTCOMES, 0)
    unreadable, rebuilt, failed = {}, {}, {}
    start = time.perf_counter()
    for video_id, outcome, detail in tqdm(_run(jobs, workers), total=len(jobs), desc="frame cache", unit="video"):
        counts[outcome] += 1
        if outcome == "unreadable":
            logger.warning("%s (%s) cannot be decoded: %s; recorded in the frame cache", video_id,
                           video_files[video_id], detail)
            unreadable[video_id] = detail
        elif outcome == "built" and detail:
            rebuilt[video_id] = detail
        elif outcome == "failed_write":
            failed[video_id] = detail
            break  # a full disk fails every later write too
    seconds = time.perf_counter() - start
    if failed:
        video_id, error = next(iter(failed.items()))
        raise OSError(f"writing the frame cache entry of {video_id} in '{directory}' failed ({error}); "
                      f"{shutil.disk_usage(directory).free / 2**30:.1f} GiB free there. No half entry was left: "
                      "free space (or pick another --cache_dir) and rerun the same command to resume")
    return {"cache_dir": directory, "videos": len(jobs), "counts": counts, "unreadable": unreadable,
            "rebuilt": rebuilt, "missing": list(missing), "stale_temporaries_removed": removed,
            "seconds": round(seconds, 3), "bytes": cache_bytes(directory, video_files)}


def cache_bytes(directory: str, video_ids: Iterable[str]) -> int:
    """Bytes on disk of the entries of ``video_ids`` that exist."""
    paths = (entry_path(directory, v) for v in video_ids)
    return sum(os.path.getsize(p) for p in paths if os.path.isfile(p))


def locate_videos(video_ids: Sequence[str], features_path: str) -> Tuple[Dict[str, str], list]:
    """(video_id -> file for the ids with a file, ids without one), as the loaders find files."""
    files = find_video_files(features_path)
    return {v: files[v] for v in video_ids if v in files}, [v for v in video_ids if v not in files]


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    defaults = FrameSamplingConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--video_list", nargs="+", required=True,
                        help=".csv files with a video_id column or text files with one id per line")
    parser.add_argument("--features_path", required=True, help="directory of <video_id>.mp4 files")
    parser.add_argument("--cache_dir", required=True, help="cache directory to create or resume")
    parser.add_argument("--max_frames", type=int, default=defaults.max_frames, help="frames per video F")
    parser.add_argument("--feature_framerate", type=float, default=defaults.framerate,
                        help="frames sampled per second")
    parser.add_argument("--slice_framepos", type=int, choices=(0, 1, 2), default=defaults.slice_framepos,
                        help="more frames than --max_frames: 0 head, 1 tail, 2 uniform")
    parser.add_argument("--image_size", type=int, default=defaults.image_size,
                        help="side of the CLIP input (224 for ViT-B/32 and ViT-B/16)")
    parser.add_argument("--decoder", choices=DECODERS, default=DEFAULT_DECODER, help="video decoding library")
    parser.add_argument("--num_workers", type=int, default=max(1, (os.cpu_count() or 1) // 2),
                        help="decoding processes (1: in this process)")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Create or resume the cache; returns the summary of ``build_frame_cache``."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    args = parse_args(argv)
    cfg = FrameSamplingConfig(max_frames=args.max_frames, framerate=args.feature_framerate,
                              slice_framepos=args.slice_framepos, image_size=args.image_size, decoder=args.decoder)
    video_files, missing = locate_videos(read_video_ids(args.video_list), args.features_path)
    if missing:
        logger.warning("%d listed videos have no file in %s and get no entry: %s", len(missing),
                       args.features_path, ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else ""))
    summary = build_frame_cache(args.cache_dir, video_files, cfg, args.num_workers, missing)
    logger.info("frame cache %s: %s, %d missing files, %.1f MiB, %.1f s", args.cache_dir, summary["counts"],
                len(missing), summary["bytes"] / 2**20, summary["seconds"])
    return summary


if __name__ == "__main__":
    try:
        main()
    except (FrameCacheError, OSError) as err:
        print(f"cache_frames: {err}", file=sys.stderr)
        sys.exit(2)
