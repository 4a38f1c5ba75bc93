"""Throughput of the AST input recipe (dataloaders.audio.ast_input) on CPU.

Prints clips/s for ``--seconds``-long 16 kHz clips: one process at each thread count,
and N single-threaded processes in parallel (how DataLoader workers run it), e.g.

    python -m bench.fbank_bench --threads 1 2 --processes 2 --seconds 10
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import time
from typing import List, Optional, Tuple

import torch

from dataloaders.audio import FbankConfig, ast_input


def make_clips(seconds: float, count: int, distinct: int) -> List[torch.Tensor]:
    """``count`` clips [T] cycling over ``distinct`` random waveforms."""
    generator = torch.Generator().manual_seed(0)
    pool = [0.1 * torch.randn(int(seconds * FbankConfig.sample_rate), generator=generator)
            for _ in range(distinct)]
    return [pool[i % len(pool)] for i in range(count)]


def timed_round(clips: List[torch.Tensor]) -> Tuple[float, float]:
    """(start, end) monotonic times of running ast_input over ``clips``."""
    start = time.monotonic()
    for clip in clips:
        ast_input(clip, FbankConfig.sample_rate)
    return start, time.monotonic()


def single_process(clips: List[torch.Tensor], threads: int, rounds: int) -> List[float]:
    """clips/s of each round in this process with ``threads`` torch threads."""
    torch.set_num_threads(threads)
    ast_input(clips[0], FbankConfig.sample_rate)  # warm-up: mel bank cache, FFT plans
    rates = []
    for _ in range(rounds):
        start, end = timed_round(clips)
        rates.append(len(clips) / (end - start))
    return rates


def _worker_round(clips: List[torch.Tensor]) -> Tuple[float, float]:
    torch.set_num_threads(1)
    ast_input(clips[0], FbankConfig.sample_rate)
    return timed_round(clips)


def parallel_processes(clips: List[torch.Tensor], processes: int, rounds: int) -> List[float]:
    """Total clips/s of each round with ``processes`` single-threaded workers."""
    rates = []
    with multiprocessing.Pool(processes) as pool:
        for _ in range(rounds):
            spans = pool.map(_worker_round, [clips] * processes)
            wall = max(end for _, end in spans) - min(start for start, _ in spans)
            rates.append(processes * len(clips) / wall)
    return rates


def _row(label: str, rates: List[float], cores: int) -> str:
    """Table line: best and median clips/s, and CPU time per clip at the best rate."""
    rates = sorted(rates)
    best, median = rates[-1], rates[len(rates) // 2]
    return f"{label:>22} | {best:>12.1f} | {median:>14.1f} | {1000.0 * cores / best:>12.2f}"


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2],
                        help="torch thread counts for the single-process rows")
    parser.add_argument("--processes", type=int, nargs="*", default=[2],
                        help="parallel single-threaded process counts")
    parser.add_argument("--seconds", type=float, default=10.0, help="clip length")
    parser.add_argument("--clips", type=int, default=100, help="clips per round (per process)")
    parser.add_argument("--rounds", type=int, default=5,
                        help="timing rounds; the best is robust to other load on shared cores")
    parser.add_argument("--distinct", type=int, default=8, help="distinct random clips cycled")
    args = parser.parse_args(argv)
    clips = make_clips(args.seconds, args.clips, args.distinct)
    print(f"ast_input on {args.seconds:g} s clips at {FbankConfig.sample_rate} Hz ({args.rounds} "
          f"rounds of {args.clips} clips, torch {torch.__version__}, {os.cpu_count()} CPUs visible)")
    print(f"{'setup':>22} | {'best clips/s':>12} | {'median clips/s':>14} | {'core-ms/clip':>12}")
    for threads in args.threads:
        print(_row(f"1 process x {threads} thr", single_process(clips, threads, args.rounds), threads))
    for processes in args.processes:
        print(_row(f"{processes} processes x 1 thr",
                   parallel_processes(clips, processes, args.rounds), processes))


if __name__ == "__main__":
    main()
