"""Shortlist re-ranking for text-guided models (docs/design.md §4a, §10).

Stage 1 ranks every (text, video) pair with the model's text-agnostic view (t := 0, cached
video index, matrix products). Stage 2 fuses, under the pair's own text, the union of each
text's top-K videos and each video's top-K texts, each pair once. A text's final ranking is
its K re-scored videos by text-guided score, then the rest in stage-1 order; a video's
ranking of texts likewise. Stage-1 ties are broken by a caller-given key per text and per
video (the evaluation passes the rank of each id), so the shortlist never depends on the
order of the inputs; every fused pair's score depends only on its pair. K at least the
gallery size (in both directions) is full text-guided scoring.

The two directions need different orderings, so the result is two ranking matrices
(float64, so adding the offset that lifts re-scored entries above the rest cannot merge
distinct fp32 scores): ``t2v`` (rank within rows) and ``v2t`` (rank within columns).

Shapes: Nt / Nv texts / videos, K shortlist length, P fused pairs, L layers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from modules.memory_plan import DEFAULT_EVAL_PAIRS_PER_CHUNK
from modules.modeling import AVIGATE, TextFeatures, VideoFeatures
from modules.pair_fusion import fuse_pair_chunks, list_plan


@dataclass
class Shortlists:
    """Stage 1 of re-ranking.

    stage1 [Nt, Nv] fp32 agnostic scores; text_top [Nt, Kv] each text's best videos; video_top
    [Nv, Kt] each video's best texts; pairs: (text index [P], video index [P]) the union to fuse,
    sorted by (video, text).
    """

    stage1: torch.Tensor
    text_top: torch.Tensor
    video_top: torch.Tensor
    pair_text: torch.Tensor
    pair_video: torch.Tensor


def top_k_with_keys(scores: torch.Tensor, k: int, keys: torch.Tensor) -> torch.Tensor:
    """Column indices [N, k] of each row's k best entries of scores [N, M]; equal scores are
    ordered by ascending keys [M] (distinct integers), so the result does not depend on the
    column order."""
    by_key = torch.argsort(keys, stable=True)                          # columns in key order
    order = torch.sort(scores[:, by_key], dim=1, descending=True, stable=True).indices[:, :k]
    return by_key[order]


def shortlists(stage1: torch.Tensor, k: int, text_keys: Optional[torch.Tensor] = None,
               video_keys: Optional[torch.Tensor] = None) -> Shortlists:
    """Each text's top-min(k, Nv) videos, each video's top-min(k, Nt) texts and their union.

    Args:
        stage1: agnostic scores [Nt, Nv].
        k: shortlist length (>= 1).
        text_keys, video_keys: distinct integer tie-break keys [Nt] / [Nv] (default: positions).
    """
    if k < 1:
        raise ValueError(f"--rerank_topk must be >= 1, got {k}")
    nt, nv = stage1.shape
    device = stage1.device
    text_keys = torch.arange(nt, device=device) if text_keys is None else text_keys.to(device)
    video_keys = torch.arange(nv, device=device) if video_keys is None else video_keys.to(device)
    text_top = top_k_with_keys(stage1, min(k, nv), video_keys)         # [Nt, Kv]
    video_top = top_k_with_keys(stage1.t(), min(k, nt), text_keys)     # [Nv, Kt]
    flat = torch.cat([
        (torch.arange(nt, device=device)[:, None] + nt * text_top).reshape(-1),  # video-major codes
        (video_top + nt * torch.arange(nv, device=device)[:, None]).reshape(-1)])
    codes = torch.unique(flat)                                          # sorted: by video, then text
    return Shortlists(stage1, text_top, video_top, codes % nt, codes // nt)


@torch.no_grad()
def score_pair_list(model: AVIGATE, text_feats: TextFeatures, video_feats: VideoFeatures,
                    pair_text: torch.Tensor, pair_video: torch.Tensor,
                    pairs_per_chunk: int = DEFAULT_EVAL_PAIRS_PER_CHUNK) -> tuple[torch.Tensor, dict]:
    """Text-guided scores [P] (fp32) and gates name -> [P, L] (fp32) of the listed pairs, each
    fused under its own text. Pairs are processed in chunks of consecutive pairs (the per-video
    fusion context is prepared once per chunk for the range of its videos); pass them sorted
    by video for that reuse."""
    device = model.logit_scale.device
    plan = list_plan(pair_text.to(device), pair_video.to(device), pairs_per_chunk)
    out = fuse_pair_chunks(model, text_feats.text.to(device), plan, videos=video_feats)
    return out.scores, {name: g.float() for name, g in out.gates.items()}


def ranking_matrices(lists: Shortlists, pair_scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(t2v, v2t) ranking matrices [Nt, Nv] float64: each text's shortlisted videos carry their
    text-guided score lifted above every other entry of the row (which keeps its stage-1 score);
    each video's shortlisted texts likewise within its column."""
    stage1 = lists.stage1.double()
    nt, nv = stage1.shape
    guided = torch.full_like(stage1, float("nan"))
    guided[lists.pair_text, lists.pair_video] = pair_scores.double().to(stage1.device)
    rows = torch.arange(nt, device=stage1.device)[:, None]
    cols = torch.arange(nv, device=stage1.device)[:, None]
    t2v, v2t = stage1.clone(), stage1.clone()
    row_scores = guided[rows, lists.text_top]                          # [Nt, Kv]
    row_lift = (stage1.amax(1, keepdim=True) - row_scores.amin(1, keepdim=True)).clamp_min(0) + 1.0
    t2v[rows, lists.text_top] = row_scores + row_lift
    col_scores = guided[lists.video_top, cols]                         # [Nv, Kt]
    col_lift = (stage1.amax(0)[:, None] - col_scores.amin(1, keepdim=True)).clamp_min(0) + 1.0
    v2t[lists.video_top, cols] = col_scores + col_lift
    return t2v, v2t
