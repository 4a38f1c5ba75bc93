"""Frame cache vs decoding (issue 20): loader clips/s per core, bytes per clip, build cost.

On generated textured clips (320x240, ``--fps``; docs/design.md §9 recommends 3 fps copies) in the
MSR-VTT layout, every caption an item (``--expand_msrvtt_sentences``), 224 px frames:

- ``build``: ``preprocess.cache_frames`` over the clips at ``--max_frames`` 12 and 32 (run.sh's
  and the 32-frame setting of the Charades recipes): bytes on disk per clip and CPU seconds per
  clip of the build, extrapolated to MSR-VTT's 10,000 clips.
- ``parts``: CPU ms per clip of each loader part alone, in this process: ``read_frames``
  (decode + resize/crop), the fbank of a wav (``load_ast_input``), a frame cache read and an
  AST token cache read (1213 x 768 fp16, random values: speed does not depend on them).
- ``loader``: the real ``PairDataset`` in a ``DataLoader`` (``collate_items``) with 0/1/2 workers,
  for three sources: decode + wav fbank (``--audio_path``, no cache), decode + AST token cache,
  frame cache + AST token cache. CPU ms per clip counts every process (the main one and its
  workers); clips/s per core = 1000 / CPU ms per clip, steadier than wall time on a shared
  machine. Decode passes read ``--batches`` batches, cached ones ``--cache_batches``.

Reads are warm (page cache): the cache of a real run (18 GB at 12 frames for MSR-VTT) fits in the
RAM of a typical training node; docs/performance.md covers a cache larger than RAM.

Usage (the default run: about 3 minutes on a shared 2-core machine):
    python -m bench.frame_cache_bench [--json out.json] [--clips 8] [--seconds 15] [--fps 3]
        [--workers 0 1 2] [--batch_size 16] [--batches 2] [--cache_batches 16]
Numbers and the epoch-time model built from them: docs/performance.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import tempfile
import time
from typing import Callable, Dict

import numpy as np
import torch


from atomic_io import write_json
from dataloaders.audio import load_ast_input
from dataloaders.audio_cache import AudioCacheWriter, AudioFeatureCache
from dataloaders.base import collate_items
from dataloaders.frame_cache import FrameCache, entry_path
from dataloaders.registry import DataConfig, build_train_dataset
from dataloaders.video import FrameSamplingConfig, read_frames
from preprocess.cache_frames import build_frame_cache
from tests.datagen import make_msrvtt, write_video, write_wav

CLIP_SIZE = (320, 240)
FRAME_COUNTS = (12, 32)
MSRVTT_CLIPS = 10_000
AST_TOKENS, AST_WIDTH = 1213, 768
SOURCES = {"decode + wav fbank": (False, False), "decode + AST cache": (False, True),
           "frame cache + AST cache": (True, True)}
MIB = 1 << 20


def cpu_seconds() -> float:
    """CPU seconds of this process and its finished children (DataLoader workers, once joined)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def write_clips(root: str, args: argparse.Namespace) -> dict:
    """MSR-VTT layout with ``--clips`` textured training clips of ``--seconds`` and their wavs, enough
    captions per clip for the longest loader pass; plus ``--long_clips`` of ``--long_seconds`` (long
    enough for 32 frames at 1 fps) for the 32-frame build."""
    items = 2 * max(args.batches, args.cache_batches) * args.batch_size
    paths = make_msrvtt(root, n_videos=args.clips + 1, captions_per_video=-(-items // args.clips), n_test=1,
                        with_audio=True, seconds=0.2)
    for number, video_id in enumerate(paths["train_ids"]):  # replace datagen's flat clips
        write_video(os.path.join(paths["features_path"], f"{video_id}.mp4"), args.seconds, args.fps, CLIP_SIZE,
                    pattern="texture", seed=number)
        write_wav(os.path.join(paths["audio_path"], f"{video_id}.wav"), args.seconds)
    long_dir = os.path.join(root, "long_videos")
    os.makedirs(long_dir)
    paths["long_files"] = {f"long{k}": os.path.join(long_dir, f"long{k}.mp4") for k in range(args.long_clips)}
    for number, path in enumerate(paths["long_files"].values()):
        write_video(path, args.long_seconds, args.fps, CLIP_SIZE, pattern="texture", seed=100 + number)
    return paths


def video_files(paths: dict) -> Dict[str, str]:
    return {v: os.path.join(paths["features_path"], f"{v}.mp4") for v in paths["train_ids"]}


def build_cache(directory: str, files: Dict[str, str], frames: int) -> dict:
    """One frame cache: bytes, real frames and build CPU seconds per clip."""
    cfg = FrameSamplingConfig(max_frames=frames)
    cpu = cpu_seconds()
    summary = build_frame_cache(directory, files, cfg, workers=0)
    cpu = cpu_seconds() - cpu
    cache = FrameCache(directory, cfg, files)
    return {"clips": len(files), "bytes_per_clip": float(np.mean([os.path.getsize(entry_path(directory, v))
                                                                  for v in files])),
            "frames_per_clip": float(np.mean([int(cache.read(v)[1].sum()) for v in files])),
            "build_cpu_s_per_clip": cpu / len(files), "build_wall_s_per_clip": summary["seconds"] / len(files)}


def build_caches(paths: dict, root: str) -> dict:
    """The 12-frame cache of the training clips (the loader reads it) and a 32-frame one of the long clips."""
    return {12: build_cache(os.path.join(root, "frame_cache_12"), video_files(paths), 12),
            32: build_cache(os.path.join(root, "frame_cache_32"), paths["long_files"], 32)}


def build_ast_cache(directory: str, video_ids: list) -> None:
    """AST token cache of random fp16 tokens at the real size (1.78 MiB per clip)."""
    writer = AudioCacheWriter(directory, video_ids, {"bench": "random tokens"}, AST_TOKENS, AST_WIDTH)
    rng = np.random.default_rng(0)
    for row in range(len(video_ids)):
        writer.write([row], rng.standard_normal((1, AST_TOKENS, AST_WIDTH)).astype(np.float16), [True])


def per_clip_ms(fn: Callable[[str], object], video_ids: list, repeats: int) -> float:
    """CPU ms per call of ``fn(video_id)`` over every clip, best of ``repeats`` passes (after a warm-up)."""
    for video_id in video_ids:
        fn(video_id)
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        for video_id in video_ids:
            fn(video_id)
        best = min(best, time.process_time() - start)
    return 1e3 * best / len(video_ids)


def measure_parts(paths: dict, ast_dir: str, root: str, args: argparse.Namespace) -> dict:
    files = video_files(paths)
    ids = list(files)
    cfg = FrameSamplingConfig()
    frame_cache = FrameCache(os.path.join(root, "frame_cache_12"), cfg, files)
    tokens = AudioFeatureCache(ast_dir)
    return {
        "decode (read_frames)": per_clip_ms(lambda v: read_frames(files[v], cfg), ids, 1),
        "wav fbank (load_ast_input)": per_clip_ms(
            lambda v: load_ast_input(os.path.join(paths["audio_path"], f"{v}.wav")), ids, 1),
        "frame cache read": per_clip_ms(frame_cache.read, ids, args.repeats),
        "AST token cache read": per_clip_ms(tokens.tokens, ids, args.repeats),
    }


def loader_pass(dataset, workers: int, batches: int, batch_size: int) -> tuple:
    """(clips, wall seconds, CPU seconds of every process) of one DataLoader pass over ``batches``."""
    subset = torch.utils.data.Subset(dataset, range(batches * batch_size))
    loader = torch.utils.data.DataLoader(subset, batch_size=batch_size, num_workers=workers,
                                         collate_fn=collate_items)
    cpu, start = cpu_seconds(), time.perf_counter()
    clips = sum(len(batch["frames"]) for batch in loader)  # exhausting the loader joins its workers
    return clips, time.perf_counter() - start, cpu_seconds() - cpu


def loader_rate(dataset, workers: int, batches: int, batch_size: int) -> dict:
    """Steady-state rates: a pass of ``batches`` and one of twice as many, per extra clip (the
    difference removes worker start and shutdown, paid once per epoch in training)."""
    short = loader_pass(dataset, workers, batches, batch_size)
    long = loader_pass(dataset, workers, 2 * batches, batch_size)
    clips, wall, cpu = (b - a for a, b in zip(short, long))
    return {"workers": workers, "clips": clips, "clips_per_s": clips / wall, "cpu_ms_per_clip": 1e3 * cpu / clips,
            "clips_per_s_per_core": clips / cpu, "fixed_cpu_s": short[2] - cpu}


def measure_loader(paths: dict, ast_dir: str, root: str, args: argparse.Namespace) -> dict:
    results = {}
    for name, (use_frames, use_tokens) in SOURCES.items():
        cfg = DataConfig(datatype="msrvtt", data_path=paths["data_path"], features_path=paths["features_path"],
                         audio_path=None if use_tokens else paths["audio_path"],
                         audio_cache_dir=ast_dir if use_tokens else None,
                         frame_cache_dir=os.path.join(root, "frame_cache_12") if use_frames else None,
                         frames=FrameSamplingConfig(), expand_sentences=True)
        dataset = build_train_dataset(cfg)
        batches = args.cache_batches if use_frames else args.batches
        results[name] = [loader_rate(dataset, workers, batches, args.batch_size) for workers in args.workers]
    return results


def print_report(results: dict, args: argparse.Namespace) -> None:
    print(f"{args.clips} textured clips of {args.seconds:g} s ({args.long_clips} of {args.long_seconds:g} s for 32 "
          f"frames) at {args.fps:g} fps, {CLIP_SIZE[0]}x{CLIP_SIZE[1]}; 224 px frames; {os.cpu_count()} CPUs; "
          f"torch {torch.__version__}")
    print("\n| frames | clip | bytes per clip | real frames | build CPU s per clip | 10k clips (MSR-VTT) |")
    print("|---|---|---|---|---|---|")
    for frames, r in results["build"].items():
        hours = r["build_cpu_s_per_clip"] * MSRVTT_CLIPS / 3600
        seconds = args.seconds if frames == 12 else args.long_seconds
        print(f"| {frames} | {seconds:g} s | {r['bytes_per_clip'] / MIB:.2f} MiB | {r['frames_per_clip']:.0f} | "
              f"{r['build_cpu_s_per_clip']:.3f} | {hours:.2f} CPU-hours, "
              f"{r['bytes_per_clip'] * MSRVTT_CLIPS / 2**30:.1f} GiB |")
    print("\n| part, in one process | CPU ms per clip |")
    print("|---|---|")
    for name, ms in results["parts"].items():
        print(f"| {name} | {ms:.2f} |")
    print("\n| source | workers | clips/s | CPU ms per clip | clips/s per core | fixed CPU s per pass |")
    print("|---|---|---|---|---|---|")
    for name, passes in results["loader"].items():
        for r in passes:
            print(f"| {name} | {r['workers']} | {r['clips_per_s']:.1f} | {r['cpu_ms_per_clip']:.1f} | "
                  f"{r['clips_per_s_per_core']:.1f} | {r['fixed_cpu_s']:.2f} |")
    decode, cached = results["loader"]["decode + AST cache"], results["loader"]["frame cache + AST cache"]
    ratios = ", ".join(f"{c['clips_per_s_per_core'] / d['clips_per_s_per_core']:.0f}x ({d['workers']} workers)"
                       for d, c in zip(decode, cached))
    print(f"\nclips/s per core, frame cache / decode (both with the AST cache): {ratios}")


def parse_args(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", type=int, default=8, help="distinct training clips")
    parser.add_argument("--seconds", type=float, default=15.0, help="their duration (MSR-VTT clips: 10-30 s)")
    parser.add_argument("--long_clips", type=int, default=2, help="clips of the 32-frame build")
    parser.add_argument("--long_seconds", type=float, default=33.0,
                        help="their duration (>= 32 s: 32 frames at 1 fps; Charades clips average 30 s)")
    parser.add_argument("--fps", type=float, default=3.0, help="clip frame rate (3: docs/design.md §9's copies; 30: raw)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="DataLoader worker counts")
    parser.add_argument("--batch_size", type=int, default=16, help="loader batch (one rank's share)")
    parser.add_argument("--batches", type=int, default=1,
                        help="batches of the shorter decoding pass (the longer one reads twice as many)")
    parser.add_argument("--cache_batches", type=int, default=8, help="the same for frame-cache passes")
    parser.add_argument("--repeats", type=int, default=3, help="best-of passes of the cache-read timings")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--work_dir", default=None, help="where the temporary clips and caches go")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(1)  # per-core numbers: one thread per process, as DataLoader workers run
    with tempfile.TemporaryDirectory(dir=args.work_dir) as root:
        paths = write_clips(root, args)
        ast_dir = os.path.join(root, "ast_cache")
        build_ast_cache(ast_dir, paths["train_ids"])
        results = {"settings": dataclasses.asdict(FrameSamplingConfig()) | vars(args),
                   "build": build_caches(paths, root), "parts": measure_parts(paths, ast_dir, root, args),
                   "loader": measure_loader(paths, ast_dir, root, args)}
    print_report(results, args)
    if args.json:
        write_json(args.json, results, indent=1, default=None)
    return results


if __name__ == "__main__":
    main()
