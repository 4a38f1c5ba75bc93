"""CPU decode speed of the frame readers on generated clips (picks ``DEFAULT_DECODER``).

For each clip it times reading the frames ``sample_frame_indices`` asks for (1 fps,
``--max_frames`` uniform) with: OpenCV sequential grab (the "opencv" decoder), OpenCV
with a seek before each frame, PyAV sequential decode (the "pyav" decoder) and decord's
``get_batch`` when decord is installed. It reports sampled frames/s (and clips/s) of the
decode alone, CPU milliseconds per clip summed over threads, clips/s of the whole
``read_frames`` (decode + CLIP transform), and clips/s of ``read_frames`` in ``--workers``
processes at once (what a DataLoader with every core busy gets).

Usage:
    .venv/bin/python bench/decode_bench.py [--seconds 30] [--repeats 8] [--workers N]

Measured on the shared 2-core build machine (other jobs running, so wall times are noisy;
CPU ms/clip and the 2-process numbers were stable across runs), ``--repeats 8``:

    clip (30 s, 320x240)   method            CPU ms/clip   2-process read_frames
    30 fps, 900 frames     opencv grab       381           3.17 clips/s (38.0 frames/s)
                           opencv seek       608
                           pyav              388           2.72 clips/s (32.6 frames/s)
                           decord 0.6.0      345
    3 fps, 90 frames       opencv grab       145           5.39 clips/s (64.7 frames/s)
                           opencv seek       898
                           pyav              148           4.91 clips/s (58.9 frames/s)
                           decord 0.6.0      151

OpenCV's sequential grab is the default decoder: ~10% more loader throughput than PyAV and
no more CPU per clip. Seeking before each frame costs 1.6-6x more (every seek decodes from
the previous keyframe). decord is not faster overall (less CPU on 30 fps, more on the 3 fps
files DESIGN §9 recommends), so it is not a dependency.
"""
from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
import os
import sys
import tempfile
import time
from typing import Callable, Dict, Tuple

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from dataloaders.video import (DECODERS, FrameSamplingConfig, decode_opencv, decode_pyav,  # noqa: E402
                               read_frames, sample_frame_indices)
from tests.datagen import write_video  # noqa: E402

CLIP_SIZE = (320, 240)
CLIPS = {"30fps": 30, "3fps": 3}


def _decord_reader() -> Callable:
    """decord's reader as a decode function, or None when decord is not installed."""
    try:
        import decord
    except ImportError:
        return None

    def decode(path, plan):
        reader = decord.VideoReader(path, ctx=decord.cpu(0))
        return reader.get_batch(list(plan(len(reader), reader.get_avg_fps()))).asnumpy()
    return decode


def _time(fn: Callable[[], object], repeats: int) -> Tuple[float, float]:
    """Best-of-``repeats`` wall seconds and CPU seconds (all threads) of one call, after a warm-up."""
    fn()
    best_wall = best_cpu = float("inf")
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        best_wall = min(best_wall, time.perf_counter() - wall)
        best_cpu = min(best_cpu, time.process_time() - cpu)
    return best_wall, best_cpu


def bench_clip(path: str, cfg: FrameSamplingConfig, repeats: int) -> Dict[str, Tuple[float, float]]:
    """(wall, CPU) seconds per clip for each decode method and for the full reader."""
    def plan(n, fps):
        return sample_frame_indices(n, fps, cfg)
    methods = {
        "opencv_grab": lambda: decode_opencv(path, plan),
        "opencv_seek": lambda: decode_opencv(path, plan, seek=True),
        "pyav": lambda: decode_pyav(path, plan),
    }
    decord_decode = _decord_reader()
    if decord_decode is not None:
        methods["decord"] = lambda: decord_decode(path, plan)
    for decoder in DECODERS:
        reader_cfg = dataclasses.replace(cfg, decoder=decoder)
        methods[f"read_frames[{decoder}]"] = lambda c=reader_cfg: read_frames(path, c)
    return {name: _time(fn, repeats) for name, fn in methods.items()}


def _read_clips(job: Tuple[str, FrameSamplingConfig, int]) -> None:
    path, cfg, clips = job
    for _ in range(clips):
        read_frames(path, cfg)


def loader_throughput(path: str, cfg: FrameSamplingConfig, workers: int, clips: int) -> Dict[str, float]:
    """Clips/s of ``read_frames`` with ``workers`` processes reading ``clips`` clips each, as
    DataLoader workers do (every core busy, each decoder's own threads competing)."""
    result = {}
    # One torch thread per process, as DataLoader workers run (a forked OpenMP pool hangs).
    with multiprocessing.get_context("fork").Pool(workers, initializer=torch.set_num_threads,
                                                  initargs=(1,)) as pool:
        for decoder in DECODERS:
            reader_cfg = dataclasses.replace(cfg, decoder=decoder)
            pool.map(_read_clips, [(path, reader_cfg, 1)] * workers)  # warm-up
            start = time.perf_counter()
            pool.map(_read_clips, [(path, reader_cfg, clips)] * workers)
            result[decoder] = workers * clips / (time.perf_counter() - start)
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=30.0, help="clip duration")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per method (best is kept)")
    parser.add_argument("--max_frames", type=int, default=12)
    parser.add_argument("--workers", type=int, default=os.cpu_count(),
                        help="processes of the loader-throughput test")
    parser.add_argument("--clips", type=int, default=6, help="clips per process in that test")
    args = parser.parse_args(argv)
    cfg = FrameSamplingConfig(max_frames=args.max_frames)
    with tempfile.TemporaryDirectory() as tmp:
        for name, fps in CLIPS.items():
            path = os.path.join(tmp, f"{name}.mp4")
            total = write_video(path, args.seconds, fps, CLIP_SIZE, pattern="texture")
            sampled = len(sample_frame_indices(total, fps, cfg))
            print(f"clip {name}: {args.seconds:g} s, {CLIP_SIZE[0]}x{CLIP_SIZE[1]}, {fps} fps, "
                  f"{total} frames, {sampled} sampled")
            for method, (wall, cpu) in bench_clip(path, cfg, args.repeats).items():
                print(f"  {method:20s} {sampled / wall:8.1f} sampled frames/s ({1.0 / wall:6.2f} clips/s)"
                      f"  {total / wall:8.1f} video frames/s  {1e3 * cpu:7.1f} CPU ms/clip")
            for decoder, rate in loader_throughput(path, cfg, args.workers, args.clips).items():
                print(f"  {args.workers} processes, read_frames[{decoder}]: {rate:6.2f} clips/s "
                      f"({rate * sampled:7.1f} sampled frames/s)")
    print(f"numpy {np.__version__}; timings are best of {args.repeats} on this CPU")


if __name__ == "__main__":
    main()
