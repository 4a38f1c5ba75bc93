"""Decode speed of the frame readers (picks ``DEFAULT_DECODER``) and throughput of the
training input pipeline, on generated clips.

The ``decode`` section: for each clip it times reading the frames ``sample_frame_indices`` asks for (1 fps,
``--max_frames`` uniform) with: OpenCV sequential grab (the "opencv" decoder), OpenCV
with a seek before each frame, PyAV sequential decode (the "pyav" decoder) and decord's
``get_batch`` when decord is installed. It reports sampled frames/s (and clips/s) of the
decode alone, CPU milliseconds per clip summed over threads, clips/s of the whole
``read_frames`` (decode + resize/crop), and clips/s of ``read_frames`` in ``--workers``
processes at once (every core busy, as in a DataLoader).

The ``loader`` section runs the training input pipeline as ``main_task_retrieval.py``
does: the real ``PairDataset`` (MSR-VTT layout, every caption an item, 224 px frames, audio
from wav files unless ``--audio none``) in a ``DataLoader`` with ``collate_items``, each
batch handed to ``dataloaders.base.video_inputs`` (uint8 frames normalized on the device). Per
worker count it reports frames/s over a pass of ``--batches`` batches (worker start
included) and the seconds to the first batch; the former path (frames normalized in the
workers, shipped as float32) runs beside it with the bytes each ships per batch; on a CUDA
machine both run with and without ``pin_memory``. It also times the start of an epoch:
a fresh loader (what training builds per epoch) against the second epoch of a persistent
loader.

The loader section's measured numbers are in docs/performance.md.

Usage:
    python -m bench.decode_bench [--sections decode loader] [--seconds 30] [--repeats 8]
        [--workers N] [--loader_workers 0 1 2 4] [--batch_size 16] [--batches 8] [--json out.json]

Decode section, measured on the shared 2-core build machine (other jobs running, so wall
times are noisy; CPU ms/clip and the 2-process numbers were stable across runs),
``--repeats 8``, when ``read_frames`` still normalized to float32 in the worker (a few ms of
the clip's time; it now stops at uint8):

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
files docs/design.md §9 recommends), so it is not a dependency.
"""
from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
import os
import resource
import tempfile
import time
import warnings
from typing import Callable, Dict, Tuple

import numpy as np
import torch

from atomic_io import write_json
from dataloaders.base import PairDataset, collate_items, video_inputs
from dataloaders.registry import DataConfig, build_train_dataset
from dataloaders.video import (DECODERS, DEFAULT_DECODER, FrameSamplingConfig, decode_opencv,
                               decode_pyav, normalize_frames, read_frames, sample_frame_indices)
from tests.datagen import make_msrvtt, write_video, write_wav

CLIP_SIZE = (320, 240)
CLIPS = {"30fps": 30, "3fps": 3}
SECTIONS = ("decode", "loader")
CPU = torch.device("cpu")
RECIPE_BATCH = 128  # global batch of the released recipe, for the bytes-per-step line


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


def loader_dataset(root: str, args: argparse.Namespace) -> PairDataset:
    """A training set as users have it: MSR-VTT layout, ``--loader_videos`` textured clips of
    ``--loader_seconds`` at ``--loader_fps`` (320x240) and their wav files, enough captions
    for ``--batches`` batches."""
    captions = -(-args.batches * args.batch_size // args.loader_videos)
    paths = make_msrvtt(root, n_videos=args.loader_videos + 1, captions_per_video=captions, n_test=1,
                        with_audio=True, seconds=0.2)
    for number, video_id in enumerate(paths["train_ids"]):  # replace datagen's flat clips
        write_video(os.path.join(paths["features_path"], f"{video_id}.mp4"), args.loader_seconds,
                    args.loader_fps, CLIP_SIZE, pattern="texture", seed=number)
        write_wav(os.path.join(paths["audio_path"], f"{video_id}.wav"), args.loader_seconds)
    cfg = DataConfig(datatype="msrvtt", data_path=paths["data_path"], features_path=paths["features_path"],
                     audio_path=paths["audio_path"] if args.audio == "wav" else None,
                     frames=FrameSamplingConfig(max_frames=args.max_frames, decoder=args.decoder),
                     expand_sentences=True)
    return build_train_dataset(cfg)


def collate_float(items: list) -> dict:
    """The former worker output: frames CLIP-normalized in the worker, float32 [B, F, 3, S, S]."""
    batch = collate_items(items)
    batch["frames"] = normalize_frames(batch["frames"], batch["frame_mask"], CPU)
    return batch


def consume_float(batch: dict, device: torch.device) -> dict:
    """The former ``video_inputs``: float frames only moved to the device."""
    audio = batch.get("fbank", batch.get("audio_tokens"))
    return {"frames": batch["frames"].to(device, non_blocking=True),
            "frame_mask": batch["frame_mask"].to(device, non_blocking=True),
            "audio": None if audio is None else audio.to(device, non_blocking=True)}


PATHS = {"uint8": (collate_items, video_inputs), "float32 (former)": (collate_float, consume_float)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cpu_seconds() -> float:
    """CPU seconds of this process plus its finished children (DataLoader workers, once joined)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def loader_pass(dataset: PairDataset, path: str, workers: int, args: argparse.Namespace,
                device: torch.device, pin_memory: bool) -> Dict[str, float]:
    """One pass of ``--batches`` batches: frames/s, seconds to the first batch, CPU seconds per
    clip (all processes; steadier than wall time on a shared machine), bytes per batch."""
    collate, consume = PATHS[path]
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=False,
                                         num_workers=workers, collate_fn=collate, pin_memory=pin_memory)
    frames = batches = 0
    cpu = _cpu_seconds()
    start = time.perf_counter()
    for batch in loader:  # the exhausted iterator joins its workers, so their CPU time counts
        consume(batch, device)
        if batches == 0:
            _sync(device)
            first = time.perf_counter() - start
            frame_bytes = batch["frames"].nbytes
            batch_bytes = sum(v.nbytes for v in batch.values())
        frames += int(batch["frame_mask"].sum())
        batches += 1
    _sync(device)
    wall = time.perf_counter() - start
    cpu = _cpu_seconds() - cpu
    return {"frames_per_s": frames / wall, "first_s": first, "cpu_ms_per_clip": 1e3 * cpu / len(dataset),
            "frame_bytes": frame_bytes, "batch_bytes": batch_bytes, "batches": batches}


def epoch_start(dataset: PairDataset, workers: int, args: argparse.Namespace,
                rounds: int = 3) -> Tuple[float, float]:
    """Seconds to the first batch of a later epoch, best of ``rounds``: a fresh loader (what
    training builds per epoch) vs a persistent loader whose workers already run. Epochs here
    are one batch per worker, and each is drained untimed, so no worker is still decoding
    while the other loader is timed."""
    epoch = torch.utils.data.Subset(dataset, range(min(len(dataset), workers * args.batch_size)))

    def loader(persistent: bool) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(epoch, batch_size=args.batch_size, num_workers=workers,
                                           collate_fn=collate_items, persistent_workers=persistent)

    def first_batch(source: torch.utils.data.DataLoader) -> float:
        start = time.perf_counter()
        batches = iter(source)
        next(batches)
        elapsed = time.perf_counter() - start
        for _ in batches:
            pass
        return elapsed

    persistent = loader(True)
    first_batch(persistent)  # starts its workers
    fresh = kept = float("inf")
    for _ in range(rounds):
        fresh = min(fresh, first_batch(loader(False)))
        kept = min(kept, first_batch(persistent))
    return fresh, kept


def run_loader_section(args: argparse.Namespace) -> dict:
    """Prints the loader table; returns its rows (``passes``) and the epoch-start times."""
    # More workers than cores is part of the sweep; torch's warning about it would repeat per pass.
    warnings.filterwarnings("ignore", message="This DataLoader will create")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    pins = (False, True) if device.type == "cuda" else (False,)
    with tempfile.TemporaryDirectory() as tmp:
        dataset = loader_dataset(tmp, args)
        per_item = args.max_frames * 3 * 224 * 224
        print(f"loader: PairDataset, {args.loader_videos} clips of {args.loader_seconds:g} s at "
              f"{args.loader_fps:g} fps {CLIP_SIZE[0]}x{CLIP_SIZE[1]}, audio {args.audio}, decoder "
              f"{args.decoder}, batch {args.batch_size} x {args.max_frames} frames, {args.batches} "
              f"batches per pass; batches consumed on {device}"
              + ("" if device.type == "cuda" else " (no CUDA here: pin_memory not measured)"))
        print(f"  frames per global step of {RECIPE_BATCH}: uint8 {RECIPE_BATCH * per_item / 2**20:.0f} MiB, "
              f"float32 {4 * RECIPE_BATCH * per_item / 2**20:.0f} MiB")
        passes = []
        for workers in args.loader_workers:
            for pin in pins:
                for path in PATHS:
                    r = loader_pass(dataset, path, workers, args, device, pin)
                    passes.append({"workers": workers, "path": path, "pin_memory": pin, **r})
                    pinned = f" pin_memory {pin!s:5s}" if len(pins) > 1 else ""
                    print(f"  workers {workers}  {path:17s}{pinned} {r['frames_per_s']:7.1f} frames/s  "
                          f"first batch {r['first_s']:5.2f} s  {r['cpu_ms_per_clip']:5.0f} CPU ms/clip  "
                          f"frames {r['frame_bytes'] / 2**20:6.1f} MiB/batch  "
                          f"batch {r['batch_bytes'] / 2**20:6.1f} MiB")
        workers = max(1, min(args.loader_workers[-1], os.cpu_count() or 1))
        fresh, kept = epoch_start(dataset, workers, args)
        print(f"  epoch start, {workers} workers, best of 3: first batch {fresh:.2f} s from a fresh "
              f"loader, {kept:.2f} s from a persistent one")
    return {"device": device.type, "passes": passes,
            "epoch_start": {"workers": workers, "fresh_s": fresh, "persistent_s": kept}}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--seconds", type=float, default=30.0, help="clip duration (decode section)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per method (best is kept)")
    parser.add_argument("--max_frames", type=int, default=12)
    parser.add_argument("--workers", type=int, default=os.cpu_count(),
                        help="processes of the decode section's throughput test")
    parser.add_argument("--clips", type=int, default=6, help="clips per process in that test")
    parser.add_argument("--loader_workers", type=int, nargs="+", default=[0, 1, 2, 4],
                        help="DataLoader worker counts of the loader section")
    parser.add_argument("--batch_size", type=int, default=16, help="loader batch (one rank's share)")
    parser.add_argument("--batches", type=int, default=8, help="batches per loader pass")
    parser.add_argument("--loader_videos", type=int, default=8, help="distinct clips of the loader section")
    parser.add_argument("--loader_seconds", type=float, default=15.0, help="their duration")
    parser.add_argument("--loader_fps", type=float, default=3.0,
                        help="their frame rate (3: the compressed files of docs/design.md §9; 30: raw)")
    parser.add_argument("--audio", choices=("wav", "none"), default="wav",
                        help="items carry the fbank of a wav file (the --audio_path recipe) or no audio")
    parser.add_argument("--decoder", choices=DECODERS, default=DEFAULT_DECODER)
    parser.add_argument("--json", default=None, help="also write the loader section's numbers here")
    args = parser.parse_args(argv)
    if "decode" in args.sections:
        run_decode_section(args)
    loader = run_loader_section(args) if "loader" in args.sections else None
    if args.json:
        write_json(args.json, {"loader": loader})
    print(f"torch {torch.__version__}, numpy {np.__version__}, {os.cpu_count()} CPUs")


def run_decode_section(args: argparse.Namespace) -> None:
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
    print(f"timings are best of {args.repeats} on this CPU")


if __name__ == "__main__":
    main()
