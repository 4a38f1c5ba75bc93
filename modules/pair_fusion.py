"""Chunked pair fusion: the one loop that fuses (text, video) pairs of a text-guided model in
memory-bounded chunks, each pair under its own text (docs/design.md §4, §10).

Training (``modules.objective``), full scoring (``AVIGATE.score``), shortlist re-ranking
(``modules.rerank``) and the LEAKING paired_block diagnostic (``modules.diagnostics``) all call
``fuse_pair_chunks`` with a plan of which pairs to fuse together:
- ``grid_plan``: every text of a block x every video of a block (scores [Nt, Nv]);
- ``list_plan``: listed pairs (scores [P]).

The fusion context (``PairContext``: the per-text and per-video parts, computed once) comes
either prepared for every video (``context=``, training: with gradients, shared by all
chunks) or from VideoFeatures on any device (``videos=``, evaluation: a chunk's videos are
moved to the model's device, and their context prepared, when the chunk's video range
changes). A chunk's scores depend only on its pairs, so the plan changes memory and speed,
never a score.

Shapes: Nt / Nv texts / videos, Tc / Vc texts / videos of a grid chunk, P pairs, F frames,
D width, L layers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional

import torch
from torch.utils.checkpoint import checkpoint

from modules.fusion import TextContext, VideoContext

if TYPE_CHECKING:
    from modules.modeling import AVIGATE, VideoFeatures


@dataclass
class PairContext:
    """What scoring pairs of Nt texts and Nv videos needs, prepared once (``AVIGATE.pair_context``).

    text [Nt, D] fp32 (for the similarity); texts: TextContext; videos: VideoContext;
    frame_mask [Nv, F] bool, the real frames (the similarity always masks padded frames).
    """

    text: torch.Tensor
    texts: TextContext
    videos: VideoContext
    frame_mask: torch.Tensor


@dataclass
class PairScores:
    """Differentiable pair scores: scores [P] (pairs) or [Tc, Vc] (grid), fp32; gates name ->
    [P, L] or [Tc, Vc, L]."""

    scores: torch.Tensor
    gates: dict[str, torch.Tensor]


# (context, text indices, video indices into the context) -> PairScores; AVIGATE.score_grid and
# AVIGATE.score_pairs are the honest ones.
Scorer = Callable[[PairContext, torch.Tensor, torch.Tensor], PairScores]


@dataclass
class PairChunk:
    """Pairs fused together.

    texts, videos: text and video indices, [Tc] and [Vc] (grid: every text x every video) or
    [P] each (list: pair p = (texts[p], videos[p])); place: where its scores go in the plan's
    output ((rows, cols) of [Nt, Nv] or (pairs,) of [P]); video_range: [start, stop) of the
    videos its context needs (None: from ``videos``, one host synchronization on an accelerator).
    """

    texts: torch.Tensor
    videos: torch.Tensor
    place: tuple[slice, ...]
    video_range: Optional[tuple[int, int]] = None


@dataclass
class PairPlan:
    """grid: chunks of texts x videos (output [Nt, Nv]) or of listed pairs (output [P]);
    shape: the output's; chunks: in the order they are fused."""

    grid: bool
    shape: tuple[int, ...]
    chunks: list[PairChunk]


def grid_plan(num_texts: int, num_videos: int, chunk: tuple[int, int], device: torch.device,
              videos_outer: bool = True) -> PairPlan:
    """Every text x every video in blocks of chunk = (texts, videos). ``videos_outer`` visits the
    text blocks of one video block in a row (one context per video block when the context is
    prepared per chunk); otherwise the video blocks of one text block."""
    tc, vc = chunk
    texts = torch.arange(num_texts, device=device)
    videos = torch.arange(num_videos, device=device)
    text_blocks = [slice(t0, min(t0 + tc, num_texts)) for t0 in range(0, num_texts, tc)]
    video_blocks = [slice(v0, min(v0 + vc, num_videos)) for v0 in range(0, num_videos, vc)]
    blocks = ([(t, v) for v in video_blocks for t in text_blocks] if videos_outer
              else [(t, v) for t in text_blocks for v in video_blocks])
    chunks = [PairChunk(texts[t], videos[v], (t, v), (v.start, v.stop)) for t, v in blocks]
    return PairPlan(True, (num_texts, num_videos), chunks)


def list_plan(pair_text: torch.Tensor, pair_video: torch.Tensor, pairs_per_chunk: int) -> PairPlan:
    """Pairs (pair_text[p], pair_video[p]), LongTensor [P] each, in chunks of consecutive
    ``pairs_per_chunk`` pairs (sorted by video, a chunk's videos span a short range)."""
    num_pairs = pair_text.shape[0]
    step = max(1, pairs_per_chunk)
    chunks = [PairChunk(pair_text[s:s + step], pair_video[s:s + step], (slice(s, min(s + step, num_pairs)),))
              for s in range(0, num_pairs, step)]
    return PairPlan(False, (num_pairs,), chunks)


def fuse_pair_chunks(model: AVIGATE, text: torch.Tensor, plan: PairPlan, *, context: Optional[PairContext] = None,
                     videos: Optional[VideoFeatures] = None, scorer: Optional[Scorer] = None,
                     recompute: bool = False) -> PairScores:
    """Fuse the plan's pairs chunk by chunk -> PairScores(scores plan.shape fp32, gates name ->
    [*plan.shape, L] in the fusion's dtype).

    Args:
        model: a text-guided AVIGATE.
        text: text features [Nt, D] on the model's device (every text the plan indexes).
        plan: ``grid_plan`` or ``list_plan``.
        context: the PairContext of ``text`` and every video the plan indexes; or
        videos: VideoFeatures of those videos (any device): each chunk's context is prepared
            from its video range.
        scorer: fuses and scores one chunk (default: ``model.score_grid`` / ``model.score_pairs``).
        recompute: recompute each chunk in the backward pass instead of keeping its
            activations (when gradients are on).
    """
    if (context is None) == (videos is None):
        raise ValueError("fuse_pair_chunks takes either a prepared context or the videos, not both or neither")
    if scorer is None:
        scorer = model.score_grid if plan.grid else model.score_pairs
    scores = text.new_zeros(plan.shape, dtype=torch.float32)
    gates: dict[str, torch.Tensor] = {}
    span = None
    for chunk in plan.chunks:
        chunk_videos = chunk.videos
        if videos is not None:
            lo, hi = chunk.video_range or (int(chunk_videos.min()), int(chunk_videos.max()) + 1)
            if (lo, hi) != span:
                part = model.video_context_inputs(videos, lo, hi)
                context, span = model.pair_context(text, part.frames, part.frame_mask, part.audio), (lo, hi)
            if lo:
                chunk_videos = chunk_videos - lo
        if recompute and torch.is_grad_enabled():
            out = checkpoint(scorer, context, chunk.texts, chunk_videos, use_reentrant=False)
        else:
            out = scorer(context, chunk.texts, chunk_videos)
        scores[chunk.place] = out.scores
        for name, value in out.gates.items():
            if name not in gates:
                gates[name] = value.new_zeros(*plan.shape, value.shape[-1])
            gates[name][chunk.place] = value
    if not plan.chunks:
        gates = {name: text.new_zeros(*plan.shape, model.cfg.fusion.layers, dtype=torch.float32)
                 for name in model.gate_names()}
    return PairScores(scores, gates)
