"""Retrieval metrics for a text-video score matrix (DESIGN §8, §11).

Shapes: Nt texts (rows), Nv videos (columns). Several texts may describe one video
(VATEX-style multi-sentence evaluation); ``text_to_video_index[i]`` is the column of text
i's video.

Ranks are 1-based and ties are ranked pessimistically: a ground truth tied with k
non-ground-truth candidates gets the worst rank among them, so a constant score matrix
cannot score well. Text-to-video ranks each text's video among all videos. Video-to-text
ranks a video's captions among all texts and counts the video at its best-ranked caption:
its rank is 1 + the number of other texts scoring at least as high as its best caption
(its own other captions never count against it).
"""
from __future__ import annotations

from typing import Dict, Sequence, Union

import numpy as np
import torch

ArrayLike = Union[np.ndarray, torch.Tensor]

RECALL_AT = (1, 5, 10)
# Rows compared at once when counting ranks; bounds the boolean temporaries of a 60k x 1.5k
# (VATEX-size) matrix to a few MB.
ROW_CHUNK = 4096
# DSL softmax temperature: the scores already carry CLIP's logit scale (up to 100 x cos),
# so they are used as softmax logits unchanged.
DEFAULT_DSL_TEMPERATURE = 1.0


def _as_score_tensor(sim: ArrayLike) -> torch.Tensor:
    """Validated floating-point [Nt, Nv] tensor from a numpy array or torch tensor."""
    sim = torch.as_tensor(sim)
    if sim.dim() != 2 or sim.shape[0] == 0 or sim.shape[1] == 0:
        raise ValueError(f"metrics.py: sim must be a non-empty [Nt, Nv] matrix, got shape "
                         f"{tuple(sim.shape)}")
    if not sim.is_floating_point():
        sim = sim.double()
    # A finite sum proves every entry finite and is several times cheaper than an elementwise
    # check; only a non-finite sum (NaN/inf, or overflow) needs the exact test.
    if not torch.isfinite(sim.sum()) and not torch.isfinite(sim).all():
        raise ValueError("metrics.py: sim contains NaN or inf; fix the scores (e.g. an overflowing "
                         "log-sum-exp or fp16 overflow) before computing metrics")
    return sim


def _as_video_index(text_to_video_index: Union[ArrayLike, Sequence[int]],
                    sim: torch.Tensor) -> torch.Tensor:
    """Validated long tensor [Nt] of video columns, on sim's device."""
    num_texts, num_videos = sim.shape
    index = text_to_video_index
    if not isinstance(index, torch.Tensor):
        index = torch.as_tensor(np.asarray(index))
    if index.dim() != 1 or index.shape[0] != num_texts:
        raise ValueError(f"metrics.py: text_to_video_index must have shape [Nt] = [{num_texts}] "
                         f"(one video column per sim row), got {tuple(index.shape)}")
    if index.is_floating_point() or index.dtype == torch.bool:
        raise ValueError(f"metrics.py: text_to_video_index must hold integers, got {index.dtype}")
    index = index.long().to(sim.device)
    if index.min() < 0 or index.max() >= num_videos:
        raise ValueError(f"metrics.py: text_to_video_index values must lie in [0, {num_videos}) "
                         f"(sim has {num_videos} columns), got range "
                         f"[{int(index.min())}, {int(index.max())}]")
    captions_per_video = torch.bincount(index, minlength=num_videos)
    if (captions_per_video == 0).any():
        missing = torch.nonzero(captions_per_video == 0).flatten()[:5].tolist()
        raise ValueError(f"metrics.py: video columns {missing}... have no caption in "
                         f"text_to_video_index; video-to-text ranks need at least one caption "
                         f"per video (drop those columns)")
    return index


def text_to_video_ranks(sim: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """1-based rank of each text's video among all videos, ties pessimistic.

    Args:
        sim: scores [Nt, Nv].
        index: ground-truth video column per text [Nt].

    Returns:
        ranks [Nt] (long).
    """
    ranks = []
    for start in range(0, sim.shape[0], ROW_CHUNK):
        block = sim[start:start + ROW_CHUNK]
        positive = block.gather(1, index[start:start + ROW_CHUNK, None])  # [chunk, 1]
        # The positive counts itself, so ">=" gives 1 + the candidates tied or ahead.
        ranks.append((block >= positive).sum(dim=1))
    return torch.cat(ranks)


def video_to_text_ranks(sim: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """1-based rank of each video at its best-ranked caption among all texts, ties pessimistic.

    Args:
        sim: scores [Nt, Nv].
        index: ground-truth video column per text [Nt]; every video has at least one text.

    Returns:
        ranks [Nv] (long).
    """
    num_texts, num_videos = sim.shape
    caption_scores = sim.gather(1, index[:, None]).squeeze(1)  # [Nt]
    best_caption = torch.full((num_videos,), float("-inf"), dtype=sim.dtype, device=sim.device)
    best_caption = best_caption.scatter_reduce(0, index, caption_scores, reduce="amax")  # [Nv]
    at_least_best = torch.zeros(num_videos, dtype=torch.long, device=sim.device)
    for start in range(0, num_texts, ROW_CHUNK):
        at_least_best += (sim[start:start + ROW_CHUNK] >= best_caption).sum(dim=0)
    # The video's own captions tied with its best one are not competitors: remove them all,
    # then add 1 for the best caption itself.
    own_at_best = torch.bincount(index[caption_scores == best_caption[index]],
                                 minlength=num_videos)
    return at_least_best - own_at_best + 1


def rank_summary(ranks: torch.Tensor, prefix: str) -> Dict[str, float]:
    """R@k (percent), median rank and mean rank of 1-based ranks [N], keys ``{prefix}_R@k`` ...

    Args:
        ranks: 1-based ranks [N].
        prefix: key prefix, "t2v" or "v2t".
    """
    ranks = ranks.cpu().numpy()
    summary = {f"{prefix}_R@{k}": float(100.0 * np.mean(ranks <= k)) for k in RECALL_AT}
    summary[f"{prefix}_MdR"] = float(np.median(ranks))
    summary[f"{prefix}_MnR"] = float(np.mean(ranks))
    return summary


def _with_rsum(metrics: Dict[str, float]) -> Dict[str, float]:
    """``metrics`` plus RSum, the sum of the six recalls."""
    metrics["RSum"] = sum(metrics[f"{direction}_R@{k}"] for direction in ("t2v", "v2t")
                          for k in RECALL_AT)
    return metrics


def retrieval_metrics(sim: ArrayLike, text_to_video_index: Union[ArrayLike, Sequence[int]]
                      ) -> Dict[str, float]:
    """Text-to-video and video-to-text R@1/5/10 (percent), MdR, MnR, and RSum.

    Args:
        sim: scores [Nt, Nv] (numpy or torch, any device); finite.
        text_to_video_index: ground-truth video column of every text [Nt]; several texts may
            share a video, and every video needs at least one text.

    Returns:
        dict with keys t2v_R@1, t2v_R@5, t2v_R@10, t2v_MdR, t2v_MnR, the same for v2t, RSum.
    """
    sim = _as_score_tensor(sim)
    index = _as_video_index(text_to_video_index, sim)
    metrics = rank_summary(text_to_video_ranks(sim, index), "t2v")
    metrics.update(rank_summary(video_to_text_ranks(sim, index), "v2t"))
    return _with_rsum(metrics)


def dual_softmax(sim: ArrayLike, temperature: float = DEFAULT_DSL_TEMPERATURE,
                 dim: int = 0) -> torch.Tensor:
    """DSL post-processing: the scores times their softmax along ``dim`` (DESIGN §8).

    The softmax runs over the axis that is *not* being ranked, acting as a prior that
    penalizes candidates scoring high for many queries: for text-to-video (ranking
    videos within a row) use ``dim=0`` (softmax over texts); for video-to-text (ranking
    texts within a column) use ``dim=1`` (softmax over videos).

    Args:
        sim: scores [Nt, Nv] (numpy or torch).
        temperature: softmax temperature; the softmax logits are sim / temperature.
        dim: axis of the softmax (0 for text-to-video, 1 for video-to-text).

    Returns:
        adjusted scores [Nt, Nv] (torch, sim's device).
    """
    if temperature <= 0:
        raise ValueError(f"metrics.py: the DSL temperature must be positive, got {temperature}")
    sim = _as_score_tensor(sim)
    prior = sim / temperature
    prior -= torch.logsumexp(prior, dim=dim, keepdim=True)
    return prior.exp_().mul_(sim)


def retrieval_metrics_with_dsl(sim: ArrayLike,
                               text_to_video_index: Union[ArrayLike, Sequence[int]],
                               temperature: float = DEFAULT_DSL_TEMPERATURE
                               ) -> Dict[str, Dict[str, float]]:
    """Plain metrics and DSL metrics side by side: ``{"plain": {...}, "dsl": {...}}``.

    The DSL text-to-video numbers come from ``dual_softmax(sim, temperature, dim=0)`` and the
    video-to-text ones from ``dual_softmax(sim, temperature, dim=1)``; both dicts have the
    keys of ``retrieval_metrics``.

    Args:
        sim: plain scores [Nt, Nv] (numpy or torch); finite.
        text_to_video_index: ground-truth video column of every text [Nt].
        temperature: DSL softmax temperature.
    """
    sim = _as_score_tensor(sim)
    index = _as_video_index(text_to_video_index, sim)
    dsl = rank_summary(text_to_video_ranks(dual_softmax(sim, temperature, dim=0), index), "t2v")
    dsl.update(rank_summary(video_to_text_ranks(dual_softmax(sim, temperature, dim=1), index),
                            "v2t"))
    return {"plain": retrieval_metrics(sim, index), "dsl": _with_rsum(dsl)}
