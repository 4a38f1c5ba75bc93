"""What the AST feature cache saves per training step (docs/design.md §10).

At the real AST size (random weights: speed does not depend on the values) it measures,
on the chosen device: the frozen trunk's time per clip, the fbank time of one clip
(also skipped by the cache), the cache's bytes per clip, the time to read one clip's
tokens from the memory-mapped cache, and, for a batch of ``--batch_size`` clips, trunk
compute vs cache read. Cache reads are timed twice: from the page cache ("warm", the
steady state once the cache fits in RAM) and after evicting the file's pages with
posix_fadvise ("cold", closer to a cache larger than RAM; a lower bound on disk cost).

Usage:
    python -m bench.ast_cache_bench [--batch_size 8] [--device cpu]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from typing import Callable

import numpy as np
import soundfile as sf
import torch

from dataloaders.audio import FbankConfig, load_ast_input
from dataloaders.audio_cache import (TOKENS_FILE, AudioCacheWriter, AudioFeatureCache,
                                     cache_fingerprint)
from modules.ast import AST, ASTConfig

CLIP_SECONDS = 10.0  # MSR-VTT clips last 10-30 s
MIB = 1 << 20


def timed(fn: Callable[[], object], device: torch.device, repeats: int = 1,
          before: Callable[[], object] = lambda: None) -> tuple[float, float]:
    """Best-of-``repeats`` (wall, process CPU) seconds of one call, device synchronized.

    ``before`` runs untimed ahead of every repeat. CPU seconds sum over threads; on a
    shared machine they vary less than wall time.
    """
    best_wall = best_cpu = float("inf")
    for _ in range(repeats):
        before()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best_wall = min(best_wall, time.perf_counter() - wall)
        best_cpu = min(best_cpu, time.process_time() - cpu)
    return best_wall, best_cpu


def evict_from_page_cache(path: str) -> None:
    """Drop one file's pages from the OS page cache (this file only)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def build_cache(directory: str, checkpoint: str, clips: int, cfg: ASTConfig) -> list[str]:
    """A cache of ``clips`` rows of random fp16 tokens (same bytes as real ones)."""
    ids = [f"video{i}" for i in range(clips)]
    writer = AudioCacheWriter(directory, ids, cache_fingerprint(checkpoint, FbankConfig()),
                              cfg.num_output_tokens, cfg.embed_dim)
    rng = np.random.default_rng(0)
    for start in range(0, clips, 16):
        rows = list(range(start, min(start + 16, clips)))
        tokens = rng.standard_normal((len(rows), cfg.num_output_tokens, cfg.embed_dim))
        writer.write(rows, tokens.astype(np.float16), [True] * len(rows))
    return ids


def read_batch(cache: AudioFeatureCache, ids: list[str], device: torch.device) -> torch.Tensor:
    """What a training step does with the cache: stack rows, to the device, as fp32."""
    return torch.from_numpy(np.stack([cache.tokens(v) for v in ids])).to(device).float()


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch_size", type=int, default=8, help="clips per training step")
    parser.add_argument("--cache_clips", type=int, default=256, help="rows in the benchmark cache")
    parser.add_argument("--reads", type=int, default=200, help="single-clip reads to average")
    parser.add_argument("--repeats", type=int, default=5, help="best-of repeats of cheap timings")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--work_dir", default=None, help="where the temporary cache is written")
    return parser.parse_args(argv)


def measure_compute(model: AST, tmp: str, args, device: torch.device) -> dict:
    """Seconds of what the cache replaces: the fbank of one clip and the trunk on a batch."""
    cfg = model.cfg
    wav = os.path.join(tmp, "clip.wav")
    noise = np.random.default_rng(1).standard_normal(int(CLIP_SECONDS * FbankConfig.sample_rate))
    sf.write(wav, 0.1 * noise, FbankConfig.sample_rate)
    fbank_s, _ = timed(lambda: load_ast_input(wav), device, args.repeats)
    fbanks = torch.randn(args.batch_size, cfg.target_frames, cfg.num_mel_bins, device=device)
    timed(lambda: model.tokens(fbanks[:1]), device)  # warm-up
    trunk_s, trunk_cpu = timed(lambda: model.tokens(fbanks), device)
    return {"fbank_s": fbank_s, "trunk_batch_s": trunk_s, "trunk_batch_cpu": trunk_cpu}


def measure_cache(model: AST, tmp: str, args, device: torch.device) -> dict:
    """Bytes per clip and seconds to read one clip / one batch from the memory-mapped cache."""
    checkpoint = os.path.join(tmp, "ast.pth")
    torch.save({f"module.v.{k}": v for k, v in model.state_dict().items()}, checkpoint)
    cache_dir = os.path.join(tmp, "cache")
    ids = build_cache(cache_dir, checkpoint, args.cache_clips, model.cfg)
    tokens_path = os.path.join(cache_dir, TOKENS_FILE)
    cache = AudioFeatureCache(cache_dir)
    rng = np.random.default_rng(2)
    picks = rng.choice(ids, size=args.reads)
    batch = list(rng.choice(ids, size=args.batch_size, replace=False))
    read_batch(cache, ids, device)  # pages in the whole file
    one_clip_s, _ = timed(lambda: [cache.tokens(v) for v in picks], device, args.repeats)
    warm_s, _ = timed(lambda: read_batch(cache, batch, device), device, args.repeats)
    cold_s, _ = timed(lambda: read_batch(AudioFeatureCache(cache_dir), batch, device), device,
                      args.repeats, before=lambda: evict_from_page_cache(tokens_path))
    return {"bytes_per_clip": os.path.getsize(tokens_path) / args.cache_clips,
            "one_clip_s": one_clip_s / args.reads, "warm_batch_s": warm_s, "cold_batch_s": cold_s}


def print_table(m: dict, cfg: ASTConfig, batch: int, device: torch.device) -> None:
    print(f"AST {cfg.embed_dim} wide x {cfg.depth} blocks, {cfg.num_output_tokens} tokens; device "
          f"{device}, torch threads {torch.get_num_threads()}")
    rows = [
        ("fbank of a 10 s wav, per clip", f"{m['fbank_s'] * 1e3:10.1f} ms"),
        ("AST trunk, per clip", f"{m['trunk_batch_s'] / batch * 1e3:10.1f} ms"
                                f" (CPU time {m['trunk_batch_cpu'] / batch * 1e3:.0f} ms)"),
        ("cache bytes per clip",
         f"{m['bytes_per_clip'] / MIB:10.3f} MiB ({m['bytes_per_clip']:.0f} B)"),
        ("cache read, one clip (warm)", f"{m['one_clip_s'] * 1e3:10.3f} ms"),
        (f"step of {batch}: AST trunk", f"{m['trunk_batch_s'] * 1e3:10.1f} ms"),
        (f"step of {batch}: cache read (warm)", f"{m['warm_batch_s'] * 1e3:10.3f} ms"),
        (f"step of {batch}: cache read (cold)", f"{m['cold_batch_s'] * 1e3:10.3f} ms"),
        ("speed-up, trunk / warm read", f"{m['trunk_batch_s'] / m['warm_batch_s']:10.0f} x"),
        ("speed-up, trunk / cold read", f"{m['trunk_batch_s'] / m['cold_batch_s']:10.0f} x"),
        ("speed-up, (fbank + trunk) / warm read",
         f"{(m['trunk_batch_s'] + batch * m['fbank_s']) / m['warm_batch_s']:10.0f} x"),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


def main(argv=None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    model = AST(ASTConfig()).to(device).eval()
    with tempfile.TemporaryDirectory(dir=args.work_dir) as tmp:
        measured = measure_compute(model, tmp, args, device)
        measured.update(measure_cache(model, tmp, args, device))
    print_table(measured, model.cfg, args.batch_size, device)


if __name__ == "__main__":
    main()
