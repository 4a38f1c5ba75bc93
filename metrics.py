"""Retrieval metrics for a text-video score matrix (docs/design.md §8, §11).

Shapes: Nt texts (rows), Nv videos (columns). Several texts may describe one video
(VATEX-style multi-sentence evaluation); ``text_to_video_index[i]`` is the column of text
i's video, and the captions of a video form its caption group.

Ranks are 1-based and ties are ranked pessimistically in every convention: a ground truth
tied with k competitors gets the worst rank among them (1 + the number of competitors
scoring at least as high), so a constant score matrix cannot score well.

Two conventions (``convention=``):

``"released"`` (default): the convention of the released CLIP4Clip / AVIGATE evaluation, so
numbers stand beside published ones.
    t2v: each text ranks its video among all videos. R@k and MnR over all texts; MdR is the
        lower median of the ranks (``torch.median``) when some video has several captions,
        the usual median (mean of the two middle ranks, ``np.median``) when every video has
        exactly one.
    v2t: each caption group is scored, for every video, by its best caption
        (G[g, v] = max over the captions i of group g of sim[i, v]); a video ranks its own
        group among all Nv groups. MdR is the usual median.
``"per_caption"`` (the stricter alternative): t2v as above but MdR always the usual median;
    v2t ranks a video's best caption among all texts: 1 + the number of other videos'
    captions scoring at least as high (its own other captions never count against it), so
    a video whose neighbours have many captions faces more competitors.

With exactly one caption per video both conventions give identical numbers. The released
code itself breaks ties differently (its argsort orders tied scores arbitrarily, and its
``compute_metrics`` lists a row tied with k others k+1 times, at each tied position); ties
need exactly equal scores, which continuous model scores almost never produce.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Union

import numpy as np
import torch

ArrayLike = Union[np.ndarray, torch.Tensor]

RECALL_AT = (1, 5, 10)
CONVENTIONS = ("released", "per_caption")
DEFAULT_CONVENTION = "released"
MEDIANS = ("average", "lower")
# Rows compared at once when counting ranks; bounds the boolean temporaries of a 60k x 1.5k
# (VATEX-size) matrix to a few MB.
ROW_CHUNK = 4096
# Video columns whose caption-group scores [Nv, chunk] are built at once (released v2t); keeps
# a 10k-video gallery's group matrix to a few tens of MB.
COL_CHUNK = 1024
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
    """1-based rank of each video at its best-ranked caption among all texts, ties pessimistic
    (the "per_caption" video-to-text convention).

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


def caption_group_scores(sim: torch.Tensor, index: torch.Tensor,
                         columns: slice = slice(None)) -> torch.Tensor:
    """Score of every caption group for the given video columns: its best caption's score.

    Args:
        sim: scores [Nt, Nv].
        index: ground-truth video column per text [Nt]; every video has at least one text.
        columns: the video columns to compute (a slice of the Nv columns, C of them).

    Returns:
        G [Nv, C]: G[g, c] = max over the texts i of video g of sim[i, columns][c].
    """
    block = sim[:, columns]
    groups = torch.full((sim.shape[1], block.shape[1]), float("-inf"), dtype=sim.dtype,
                        device=sim.device)
    for start in range(0, sim.shape[0], ROW_CHUNK):
        rows = block[start:start + ROW_CHUNK]
        groups.scatter_reduce_(0, index[start:start + ROW_CHUNK, None].expand_as(rows), rows,
                               reduce="amax")
    return groups


def video_to_group_ranks(sim: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """1-based rank of each video's own caption group among all Nv groups, each group scored by
    its best caption, ties pessimistic (the "released" video-to-text convention).

    Args:
        sim: scores [Nt, Nv].
        index: ground-truth video column per text [Nt]; every video has at least one text.

    Returns:
        ranks [Nv] (long).
    """
    num_videos = sim.shape[1]
    ranks = []
    for start in range(0, num_videos, COL_CHUNK):
        stop = min(start + COL_CHUNK, num_videos)
        groups = caption_group_scores(sim, index, slice(start, stop))  # [Nv, C]
        own = groups[torch.arange(start, stop, device=sim.device), torch.arange(stop - start)]
        # The own group counts itself, so ">=" gives 1 + the groups tied or ahead.
        ranks.append((groups >= own).sum(dim=0))
    return torch.cat(ranks)


def rank_summary(ranks: torch.Tensor, prefix: str, median: str = "average") -> Dict[str, float]:
    """R@k (percent), median rank and mean rank of 1-based ranks [N], keys ``{prefix}_R@k`` ...

    Args:
        ranks: 1-based ranks [N].
        prefix: key prefix, "t2v" or "v2t".
        median: "average" (mean of the two middle ranks when N is even, ``np.median``) or
            "lower" (the lower of the two, ``torch.median``).
    """
    if median not in MEDIANS:
        raise ValueError(f"metrics.py: median must be one of {MEDIANS}, got {median!r}")
    ranks = ranks.cpu().numpy()
    summary = {f"{prefix}_R@{k}": float(100.0 * np.mean(ranks <= k)) for k in RECALL_AT}
    if median == "lower":
        summary[f"{prefix}_MdR"] = float(np.sort(ranks)[(len(ranks) - 1) // 2])
    else:
        summary[f"{prefix}_MdR"] = float(np.median(ranks))
    summary[f"{prefix}_MnR"] = float(np.mean(ranks))
    return summary


def _with_rsum(metrics: Dict[str, float]) -> Dict[str, float]:
    """``metrics`` plus RSum, the sum of the six recalls."""
    metrics["RSum"] = sum(metrics[f"{direction}_R@{k}"] for direction in ("t2v", "v2t")
                          for k in RECALL_AT)
    return metrics


def _check_convention(convention: str) -> None:
    if convention not in CONVENTIONS:
        raise ValueError(f"metrics.py: convention must be one of {CONVENTIONS}, got {convention!r}")


def _one_caption_per_video(index: torch.Tensor, num_videos: int) -> bool:
    return bool((torch.bincount(index, minlength=num_videos) == 1).all())


def _directional_metrics(t2v_sim: torch.Tensor, v2t_sim: torch.Tensor, index: torch.Tensor,
                         convention: str) -> Dict[str, float]:
    """Metrics with t2v ranked on ``t2v_sim`` and v2t on ``v2t_sim`` (both [Nt, Nv]; they differ
    only under DSL), in ``convention``."""
    _check_convention(convention)
    if convention == "released":
        single = _one_caption_per_video(index, t2v_sim.shape[1])
        metrics = rank_summary(text_to_video_ranks(t2v_sim, index), "t2v",
                               median="average" if single else "lower")
        metrics.update(rank_summary(video_to_group_ranks(v2t_sim, index), "v2t"))
    else:
        metrics = rank_summary(text_to_video_ranks(t2v_sim, index), "t2v")
        metrics.update(rank_summary(video_to_text_ranks(v2t_sim, index), "v2t"))
    return _with_rsum(metrics)


def retrieval_metrics(sim: ArrayLike, text_to_video_index: Union[ArrayLike, Sequence[int]],
                      convention: str = DEFAULT_CONVENTION) -> Dict[str, float]:
    """Text-to-video and video-to-text R@1/5/10 (percent), MdR, MnR, and RSum.

    Args:
        sim: scores [Nt, Nv] (numpy or torch, any device); finite.
        text_to_video_index: ground-truth video column of every text [Nt]; several texts may
            share a video, and every video needs at least one text.
        convention: "released" (CLIP4Clip / AVIGATE evaluation, default) or "per_caption"
            (see the module docstring; identical with one caption per video).

    Returns:
        dict with keys t2v_R@1, t2v_R@5, t2v_R@10, t2v_MdR, t2v_MnR, the same for v2t, RSum.
    """
    _check_convention(convention)
    sim = _as_score_tensor(sim)
    index = _as_video_index(text_to_video_index, sim)
    return _directional_metrics(sim, sim, index, convention)


def dual_softmax(sim: ArrayLike, temperature: float = DEFAULT_DSL_TEMPERATURE,
                 dim: int = 0) -> torch.Tensor:
    """DSL post-processing: the scores times their softmax along ``dim`` (docs/design.md §8).

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


def metrics_report(sim: ArrayLike, text_to_video_index: Union[ArrayLike, Sequence[int]],
                   dsl: bool = False, temperature: float = DEFAULT_DSL_TEMPERATURE,
                   v2t_sim: Optional[ArrayLike] = None) -> dict:
    """The metric entries of metrics.json: the default convention under the usual keys, the
    alternative beside it.

    Returns:
        {"metric_convention": "released", "plain": {...}, "dsl": {...} (with ``dsl``),
         "per_caption": {"plain": {...}, "dsl": {...} (with ``dsl``)}}; every inner dict has
        the keys of ``retrieval_metrics``.

    Args:
        sim: plain scores [Nt, Nv] (numpy or torch); finite.
        text_to_video_index: ground-truth video column of every text [Nt].
        dsl: also compute the DSL metrics.
        temperature: DSL softmax temperature.
        v2t_sim: when the two directions rank by different matrices (shortlist re-ranking,
            modules/rerank.py), the video-to-text one [Nt, Nv]; ``sim`` is then the
            text-to-video one and DSL is not defined.
    """
    sim = _as_score_tensor(sim)
    index = _as_video_index(text_to_video_index, sim)
    if v2t_sim is not None:
        if dsl:
            raise ValueError("metrics.py: DSL post-processes one score matrix; it is not defined for "
                             "separate text-to-video and video-to-text rankings")
        v2t_sim = _as_score_tensor(v2t_sim)
        if v2t_sim.shape != sim.shape:
            raise ValueError(f"metrics.py: v2t_sim {tuple(v2t_sim.shape)} must match sim {tuple(sim.shape)}")
    matrices = {"plain": (sim, sim if v2t_sim is None else v2t_sim)}
    if dsl:
        matrices["dsl"] = (dual_softmax(sim, temperature, dim=0), dual_softmax(sim, temperature, dim=1))

    def entries(convention: str) -> dict:
        return {name: _directional_metrics(t2v, v2t, index, convention)
                for name, (t2v, v2t) in matrices.items()}

    alternative = next(c for c in CONVENTIONS if c != DEFAULT_CONVENTION)
    return {"metric_convention": DEFAULT_CONVENTION, **entries(DEFAULT_CONVENTION),
            alternative: entries(alternative)}


def roc_auc(positive: ArrayLike, negative: ArrayLike) -> Optional[float]:
    """Area under the ROC curve of a score separating ``positive`` from ``negative`` samples:
    P(score of a random positive > score of a random negative), ties counting one half.
    None when either side is empty (e.g. gate values of informative vs noise clips)."""
    positive, negative = np.asarray(positive, float), np.asarray(negative, float)
    if positive.size == 0 or negative.size == 0:
        return None
    greater = (positive[:, None] > negative[None, :]).mean()
    ties = (positive[:, None] == negative[None, :]).mean()
    return float(greater + 0.5 * ties)
