"""How many (text, video) pairs to fuse at once, and what to say when they do not fit.

One rule for training and evaluation (docs/precision_memory.md, "Pair memory"): a fused pair's
working set was measured by tools/pair_memory.py at F = 12, D = 512, L = 4 and scales with
F x D x L; a suggested chunk is the largest power of two of pairs that takes at most
CHUNK_MEMORY_SHARE of the device (the rest holds the weights, gradients, optimizer states and
the encoders' activations), and at most half the chunk that just ran out of memory.

Shapes: Nt / Nv texts / videos, Tc / Vc texts / videos of a chunk.
"""
from __future__ import annotations

from typing import Optional

import torch

from modules.fusion import FusionConfig

# Working set per fused pair when scoring (no autograd), measured by tools/pair_memory.py:
# 467 KiB in fp32, 307 KiB under bf16 autocast.
EVAL_PAIR_BYTES = {"fp32": 478_000, "bf16": 315_000, "fp16": 315_000}
# Bytes per fused pair in training (forward + backward; CPU allocation counts, within 1%): fused
# all at once, a pair keeps this much alive for the backward pass; in a checkpointed chunk
# (--train_pairs_per_chunk C) the C pairs of the chunk need about as much each, while every
# other pair keeps only its score (~1 KiB). fp16 stores activations as bf16 does.
TRAIN_PAIR_BYTES = {"fp32": 4_209_000, "bf16": 2_334_000, "fp16": 2_334_000}
# F x D x L of those measurements: the working set per pair scales with it for other sizes.
MEASURED_PAIR_SIZE = 12 * 512 * 4
# Pairs fused at once when scoring without an explicit chunk (--eval_chunk): 2,048 pairs take
# 0.9 GiB (fp32) / 0.6 GiB (bf16) by the measurement above, and 24k frame rows per product
# already fill a GPU.
DEFAULT_EVAL_PAIRS_PER_CHUNK = 2048
# Share of the device memory a suggested chunk may take.
CHUNK_MEMORY_SHARE = 0.25
# Suggested training chunk when the device memory is unknown (CPU) and no chunk is set yet.
FALLBACK_CHUNK = 512
# Bytes of [Nt, chunk, 1+F] fp32 cosines per text-agnostic scoring product.
AGNOSTIC_CHUNK_BYTES = 1 << 28


def device_memory_bytes(device: torch.device) -> Optional[int]:
    """Total memory of a CUDA device (for out-of-memory advice); None for the CPU."""
    return torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None


def pair_bytes(measured: dict[str, int], precision: str, fusion: FusionConfig) -> float:
    """Bytes per fused pair at ``fusion``'s F, D, L: ``measured`` (EVAL_PAIR_BYTES or
    TRAIN_PAIR_BYTES) at ``precision`` (fp32's for an unknown one), scaled from the measured size."""
    per_pair = measured.get(precision, measured["fp32"])
    return per_pair * fusion.max_frames * fusion.width * fusion.layers / MEASURED_PAIR_SIZE


def power_of_two_chunk(per_pair: float, device_bytes: Optional[int], cap: Optional[int] = None,
                       fallback: int = FALLBACK_CHUNK) -> int:
    """Pairs per chunk to suggest: the largest power of two within CHUNK_MEMORY_SHARE of
    ``device_bytes`` (None: unknown) and within ``cap`` (None: none); ``fallback`` when neither
    bounds it."""
    limits = []
    if device_bytes:
        limits.append(int(CHUNK_MEMORY_SHARE * device_bytes / per_pair))
    if cap is not None:
        limits.append(cap)
    chunk = max(1, min(limits) if limits else fallback)
    return 1 << (chunk.bit_length() - 1)


def grid_chunk(num_texts: int, num_videos: int, pairs: int) -> tuple[int, int]:
    """(texts, videos) per block of about ``pairs`` pairs: all videos and as many texts as fit,
    or one text and a slice of the videos when the videos alone exceed it."""
    nt, nv, pairs = max(num_texts, 1), max(num_videos, 1), max(pairs, 1)
    if pairs >= nv:
        return min(nt, pairs // nv), nv
    return 1, pairs


def eval_chunk(num_texts: int, num_videos: int, chunk: Optional[tuple[int, int]] = None) -> tuple[int, int]:
    """(texts, videos) per chunk of scoring's pair fusion: ``chunk`` (--eval_chunk), or
    DEFAULT_EVAL_PAIRS_PER_CHUNK pairs as a block of all videos (or of a slice of them when
    videos alone exceed it)."""
    if chunk is not None:
        return max(1, chunk[0]), max(1, chunk[1])
    return grid_chunk(num_texts, num_videos, DEFAULT_EVAL_PAIRS_PER_CHUNK)


def eval_memory_hint(fusion: FusionConfig, num_texts: int, num_videos: int, chunk: Optional[tuple[int, int]],
                     precision: str, device_bytes: Optional[int]) -> str:
    """Out-of-memory advice for text-guided scoring: the pairs of the chunk now and an
    ``--eval_chunk`` to try (half of them at most, within a quarter of the device)."""
    per_pair = pair_bytes(EVAL_PAIR_BYTES, precision, fusion)
    texts, videos = eval_chunk(num_texts, num_videos, chunk)
    pairs = power_of_two_chunk(per_pair, device_bytes, cap=texts * videos // 2)
    t, v = grid_chunk(num_texts, num_videos, pairs)
    return (f"text-guided scoring fuses {texts} texts x {videos} videos = {texts * videos} pairs per chunk now "
            f"(--eval_chunk; {per_pair / 1024:.0f} KiB per pair at --precision {precision}, measured by "
            f"tools/pair_memory.py): try --eval_chunk {t} {v} ({t * v} pairs, about "
            f"{t * v * per_pair / 2 ** 30:.2f} GiB)")


def train_chunk(fusion: FusionConfig, precision: str, pairs_per_chunk: int, device_bytes: Optional[int]) -> int:
    """A --train_pairs_per_chunk to try: within a quarter of the device and at most half of
    ``pairs_per_chunk`` (0: all at once, no cap)."""
    cap = pairs_per_chunk // 2 if pairs_per_chunk else None
    return power_of_two_chunk(pair_bytes(TRAIN_PAIR_BYTES, precision, fusion), device_bytes, cap)


def train_memory_hint(fusion: FusionConfig, precision: str, pairs_per_chunk: int, last_pairs: int,
                      device_bytes: Optional[int]) -> str:
    """Out-of-memory advice for text-guided training: the pairs of the rank (``last_pairs``, 0 =
    not known yet), the chunk now and a ``--train_pairs_per_chunk`` to try."""
    gib = 1 << 30
    per_pair = pair_bytes(TRAIN_PAIR_BYTES, precision, fusion)
    chunk = train_chunk(fusion, precision, pairs_per_chunk, device_bytes)
    fused = (f"{last_pairs} pairs on this rank, {last_pairs * per_pair / gib:.1f} GiB of activations "
             f"when fused at once" if last_pairs else "every (local text, gathered video) pair")
    return (f"text-guided training fuses {fused} ({per_pair / 2 ** 20:.1f} MiB per pair at --precision "
            f"{precision}, measured by tools/pair_memory.py); --train_pairs_per_chunk bounds the pairs alive "
            f"at once (now {pairs_per_chunk or 'all at once'}): try --train_pairs_per_chunk {chunk} "
            f"(about {chunk * per_pair / gib:.1f} GiB per chunk), and --grad_checkpointing for the CLIP towers")
