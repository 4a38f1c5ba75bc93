"""Evaluation for ``main_task_retrieval.py``: encode each text and each video once, score
every pair with the model's ``score`` (honest by default), compute metrics and write the
outputs (metrics.json, sim_matrix.npy, sim_rows/cols.json, gates.json; audio_perturbation.json
under --audio_perturb; topk.jsonl under --dump_topk).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
from tqdm import tqdm

from atomic_io import atomic_path, write_json
from dataloaders.base import collate_items, video_inputs
from metrics import metrics_report, text_to_video_ranks
from modules.diagnostics import LEAK_LABEL, paired_block_scores
from modules.memory_plan import DEFAULT_EVAL_PAIRS_PER_CHUNK
from modules.rerank import ranking_matrices, score_pair_list, shortlists, top_k_with_keys
from util import (DistInfo, autocast, broadcast_object, gather_objects, ignore_preemption_signals, logger, shard_range,
                  unwrap)

# Texts per score_with_gates call: bounds the [rows, Nv, L] gate tensors of text-guided models.
EVAL_ROW_BLOCK = 1024
SELECTION_METRIC = "t2v_R@1"
# Tests only: called as hook(stage1 [Nt, Nv], rank) -> stage1 on the rank that computes the
# re-ranking shortlists, to show that other ranks' rounding cannot change them.
STAGE1_TEST_HOOK = None
TOPK_FILE = "topk.jsonl"
PERTURBATION_FILE = "audio_perturbation.json"


def eval_loader(dataset, batch_size: int, workers: int, collate_fn,
                device: torch.device) -> torch.utils.data.DataLoader:
    """Sequential loader over an evaluation dataset (or a rank's subset of it).

    Batches are pinned when ``device`` is CUDA (the copies in ``video_inputs`` are
    ``non_blocking``). The loader is built for one pass over the dataset, so its workers
    are not persistent (there is no second pass for them to serve).
    """
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False,
                                       num_workers=workers, collate_fn=collate_fn,
                                       generator=torch.Generator(), pin_memory=device.type == "cuda",
                                       worker_init_fn=ignore_preemption_signals)


def _cat(parts: list):
    """Concatenate feature objects (TextFeatures / VideoFeatures), skipping empty shards."""
    parts = [p for p in parts if p is not None]
    return type(parts[0]).cat(parts)


@torch.no_grad()
def encode_dataset(model: torch.nn.Module, dataset, kind: str, batch_size: int, workers: int,
                   collate_fn, info: DistInfo, precision: str, desc: str):
    """Encode every item once: each rank encodes its contiguous shard, all ranks get all features.

    Args:
        kind: "text" (TextDataset items -> TextFeatures) or "video" (VideoDataset -> VideoFeatures).
    Returns: the features of all N items in dataset order, fp32 on the CPU.
    """
    model = unwrap(model).eval()
    shard = torch.utils.data.Subset(dataset, list(shard_range(len(dataset), info)))
    parts = []
    for batch in tqdm(eval_loader(shard, batch_size, workers, collate_fn, info.device), desc=desc,
                      leave=False, disable=not info.is_main):
        with autocast(info.device, precision):
            if kind == "text":
                feats = model.encode_text(batch["text_ids"].to(info.device),
                                          batch["text_mask"].to(info.device))
            else:
                feats = model.encode_video(**video_inputs(batch, info.device))
        parts.append(feats.to(device="cpu", dtype=torch.float32))
    local = _cat(parts) if parts else None
    return _cat(gather_objects(local, info))


@dataclass
class Reranked:
    """Shortlist re-ranking of a split (modules/rerank.py).

    Args:
        topk: K; t2v, v2t: ranking matrices [Nt, Nv] float64 (rank within rows / columns);
        pair_text, pair_video: the fused pairs [P]; pair_scores: their text-guided scores [P];
        pair_gates: name -> [P, L].
    """

    topk: int
    t2v: np.ndarray
    v2t: np.ndarray
    pair_text: np.ndarray
    pair_video: np.ndarray
    pair_scores: np.ndarray
    pair_gates: dict


@dataclass
class TopK:
    """Each text's K best videos (``--dump_topk``), ties broken by video id.

    Args:
        video: int64 [Nt, K] video columns, best first.
        pair_gates: name -> [Nt, K, L] gates of those pairs' fusion (text-guided models; with
            re-ranking NaN for pairs that were not fused); empty when the gates are per video
            (``ScoredSplit.video_gates``) or the model has none.
    """

    video: np.ndarray
    pair_gates: dict = field(default_factory=dict)


@dataclass
class ScoredSplit:
    """Scores of an evaluation split and the gates used (rank 0 holds the full result).

    Args:
        sim: plain scores [Nt, Nv] (fp32 numpy); with re-ranking the stage-1 (agnostic) scores.
        video_gates: name -> [Nv, L] per-video gates (text-agnostic models, or the agnostic view).
        own_caption_gates: name -> [Nt, L], text i's gates on its own video (text-guided).
        mean_text_gates: name -> [Nv, L], each video's gates averaged over all Nt texts (text-guided).
        reranked: the re-ranking result (``--rerank_topk``), else None.
        topk: each text's best videos (``--dump_topk``), else None.
    """

    sim: np.ndarray
    video_gates: dict
    own_caption_gates: dict
    mean_text_gates: dict
    reranked: Optional[Reranked] = None
    topk: Optional[TopK] = None


def _scored_rows(info: DistInfo, num_texts: int, protocol: str) -> range:
    """Texts this rank scores: its shard ("pairs": a score depends only on its pair), or, for
    the order-dependent paired_block protocol, every text on rank 0."""
    if protocol == "paired_block":
        return range(num_texts) if info.is_main else range(0)
    return shard_range(num_texts, info)


@torch.no_grad()
def score_split(model: torch.nn.Module, texts, videos, caption_video: np.ndarray, info: DistInfo,
                protocol: str = "honest", block_size: int = 1,
                chunk: Optional[tuple[int, int]] = None, precision: str = "fp32",
                topk: int = 0, video_keys: Optional[torch.Tensor] = None) -> Optional[ScoredSplit]:
    """Score all texts against all videos with the model's ``score_with_gates``.

    Rows are split over ranks and scored in blocks of texts; a text-guided model's
    [rows, Nv, L] gates are reduced per block to each text's own-video gates, to per-video
    sums and (with ``topk``) to the gates of each text's best videos. Returns the full result
    on rank 0 and None elsewhere.

    Args:
        texts: TextFeatures of all Nt texts; videos: VideoFeatures of all Nv videos.
        caption_video: int [Nt], the ground-truth video of each text.
        protocol: "honest" or "paired_block" (leaking diagnostic; blocks of ``block_size``).
        chunk: (texts, videos) per fusion chunk; None = the model's memory budget.
        precision: autocast precision of the pair fusion; the similarity itself always runs in
            fp32 (modules.similarity.exact_fp32), so a lower precision cannot create ties.
        topk: also keep each text's ``topk`` best videos and their pairs' gates (0: no).
        video_keys: distinct int64 [Nv] tie-break keys of the videos for ``topk`` (default:
            positions; ``identity_keys`` of the video ids makes the list order-independent).
    """
    model = unwrap(model).eval()
    rows = _scored_rows(info, len(texts), protocol)
    # paired_block blocks must start at multiples of block_size.
    step = block_size * max(1, EVAL_ROW_BLOCK // block_size) if protocol == "paired_block" else EVAL_ROW_BLOCK
    k = min(topk, len(videos))
    keys = torch.arange(len(videos)) if video_keys is None else video_keys
    sims, own, totals, video_gates, top_video, top_gates = [], {}, {}, {}, [], {}
    for start in range(rows.start, rows.stop, step):
        index = torch.arange(start, min(start + step, rows.stop))
        with autocast(info.device, precision):  # the fusion; scores are computed in fp32 inside
            if protocol == "paired_block":
                out = paired_block_scores(model, texts.select(index), videos, block_size)
            else:
                try:
                    out = model.score_with_gates(texts.select(index), videos, chunk=chunk)
                except torch.OutOfMemoryError as err:
                    hint = model.eval_memory_hint(len(index), len(videos), chunk, precision)
                    raise torch.OutOfMemoryError(f"out of memory scoring the split: {hint}; ({err})") from err
        sims.append(out.scores.float().cpu().numpy())
        own_video = torch.as_tensor(caption_video[index.numpy()])
        cols = top_k_with_keys(out.scores.float().cpu(), k, keys) if k else None  # [rows, K]
        if cols is not None:
            top_video.append(cols.numpy())
        for name, g in out.gates.items():
            g = g.float().cpu()
            if g.dim() == 2:  # text-agnostic: [Nv, L], the same for every text
                video_gates[name] = g.numpy()
                continue
            own.setdefault(name, []).append(g[torch.arange(len(index)), own_video].numpy())
            totals[name] = totals.get(name, 0) + g.sum(0).numpy()
            if cols is not None:
                top_gates.setdefault(name, []).append(g[torch.arange(len(index))[:, None], cols].numpy())
    parts = gather_objects((sims, own, totals, video_gates, top_video, top_gates), info)
    if not info.is_main:
        return None
    sim = np.concatenate([s for p in parts for s in p[0]] or [np.zeros((0, len(videos)), np.float32)])
    names = {name for p in parts for name in p[1]}
    own_all = {n: np.concatenate([o for p in parts for o in p[1].get(n, [])]) for n in names}
    mean_all = {n: sum(p[2][n] for p in parts if n in p[2]) / len(texts) for n in names}
    video_gates = {n: g for p in parts for n, g in p[3].items()}
    top = None
    if k:
        top = TopK(np.concatenate([c for p in parts for c in p[4]]),
                   {n: np.concatenate([g for p in parts for g in p[5].get(n, [])]) for n in names})
    return ScoredSplit(sim, video_gates, own_all, mean_all, topk=top)


def identity_keys(labels: list) -> torch.Tensor:
    """Distinct integer keys [N] that order items by their identity (``labels``, sortable),
    not by their position: ties in a shortlist are broken by them."""
    order = sorted(range(len(labels)), key=lambda i: (labels[i], i))
    keys = torch.empty(len(labels), dtype=torch.long)
    keys[torch.tensor(order, dtype=torch.long)] = torch.arange(len(labels))
    return keys


@torch.no_grad()
def rerank_split(model: torch.nn.Module, texts, videos, split, info: DistInfo, topk: int,
                 precision: str = "fp32", dump_topk: int = 0,
                 chunk: Optional[tuple[int, int]] = None) -> Optional[ScoredSplit]:
    """Stage 1 (agnostic view, every pair) then text-guided scores of the shortlisted pairs,
    which are split over ranks. Stage 1 and the shortlists are computed on rank 0 alone and
    the pair list broadcast, so ranks whose rounding differs (mixed GPUs, TF32, thread
    counts) cannot disagree at a shortlist boundary; rank 0 checks the length and SHA-256 of
    every rank's fused shard before assigning the scores. Returns the result on rank 0, None
    elsewhere.

    Args:
        topk: K of the shortlists; dump_topk: also list each text's best videos (final ranking).
        chunk: --eval_chunk (texts, videos): their product is the pairs fused at once (None:
            the model's default).
    """
    model = unwrap(model).eval()
    if not model.text_guided:
        raise ValueError("--rerank_topk re-ranks with a text-guided model's pair fusion; this model is "
                         "text-agnostic (its scores already cost one matrix product): drop --rerank_topk")
    if topk >= max(len(texts), len(videos)) and info.is_main:
        logger.warning("--rerank_topk %d covers the whole gallery (%d texts, %d videos): clamped, this is "
                       "full text-guided scoring", topk, len(texts), len(videos))
    video_keys = identity_keys(list(split.video_ids))
    stage1, lists = None, None
    if info.is_main:  # stage 1 once: ranks whose rounding differs cannot disagree on the shortlists
        stage1 = model.agnostic_scores(texts, videos)
        stage1_scores = stage1.scores.cpu()
        if STAGE1_TEST_HOOK is not None:
            stage1_scores = STAGE1_TEST_HOOK(stage1_scores, info.rank)
        text_keys = identity_keys([(split.video_ids[v], c) for c, v in zip(split.captions, split.caption_video)])
        lists = shortlists(stage1_scores, topk, text_keys, video_keys)
    pair_text, pair_video = broadcast_object(None if lists is None else (lists.pair_text, lists.pair_video), info)
    mine = shard_range(pair_text.shape[0], info)
    with autocast(info.device, precision):  # the fusion; scores are computed in fp32 inside
        per_chunk = chunk[0] * chunk[1] if chunk is not None else DEFAULT_EVAL_PAIRS_PER_CHUNK
        scores, gates = score_pair_list(model, texts, videos, pair_text[mine.start:mine.stop],
                                        pair_video[mine.start:mine.stop], per_chunk)
    shard = pair_list_digest(pair_text[mine.start:mine.stop], pair_video[mine.start:mine.stop])
    parts = gather_objects((scores.cpu(), {k: v.cpu() for k, v in gates.items()}, shard), info)
    if not info.is_main:
        return None
    check_pair_shards([p[2] for p in parts], lists.pair_text, lists.pair_video, info.world_size)
    pair_scores = torch.cat([p[0] for p in parts])
    pair_gates = {name: torch.cat([p[1][name] for p in parts]).numpy() for name in parts[0][1]}
    t2v, v2t = ranking_matrices(lists, pair_scores)
    reranked = Reranked(topk, t2v.numpy(), v2t.numpy(), lists.pair_text.numpy(), lists.pair_video.numpy(),
                        pair_scores.numpy(), pair_gates)
    video_gates = {k: v.float().cpu().numpy() for k, v in stage1.gates.items()}
    top = reranked_topk(reranked, dump_topk, video_keys) if dump_topk else None
    return ScoredSplit(stage1.scores.cpu().numpy(), video_gates, {}, {}, reranked, top)


def pair_list_digest(pair_text: torch.Tensor, pair_video: torch.Tensor) -> tuple[int, str]:
    """(length, SHA-256) of a list of (text, video) pairs."""
    codes = torch.stack([pair_text.long(), pair_video.long()]).numpy()
    return int(codes.shape[1]), hashlib.sha256(np.ascontiguousarray(codes).tobytes()).hexdigest()


def check_pair_shards(digests: list, pair_text: torch.Tensor, pair_video: torch.Tensor, world_size: int) -> None:
    """Rank 0: every rank fused exactly its shard of rank 0's pair list (``pair_list_digest`` of
    each rank, in rank order), else a RuntimeError naming the rank (its scores would be
    assigned to other pairs)."""
    bounds = [shard_range(pair_text.shape[0], DistInfo(rank=r, world_size=world_size)) for r in range(world_size)]
    for rank, (digest, part) in enumerate(zip(digests, bounds)):
        expected = pair_list_digest(pair_text[part.start:part.stop], pair_video[part.start:part.stop])
        if tuple(digest) != expected:
            raise RuntimeError(f"re-ranking: rank {rank} fused {digest[0]} pairs (sha256 {digest[1][:12]}) but its "
                               f"shard of rank 0's shortlist has {expected[0]} (sha256 {expected[1][:12]}): its "
                               f"scores would be assigned to other pairs")


def fused_pair_lookup(reranked: Reranked, text: np.ndarray, video: np.ndarray) -> np.ndarray:
    """Index into the fused pairs of each (text[i], video[i]) (same shapes), -1 where the pair
    was not fused. The pairs are sorted by (video, text)."""
    num_texts = reranked.t2v.shape[0]
    codes = reranked.pair_video.astype(np.int64) * num_texts + reranked.pair_text
    wanted = video.astype(np.int64) * num_texts + text
    where = np.clip(np.searchsorted(codes, wanted), 0, max(len(codes) - 1, 0))
    found = (codes[where] == wanted) if len(codes) else np.zeros(wanted.shape, dtype=bool)
    return np.where(found, where, -1)


def reranked_topk(reranked: Reranked, k: int, video_keys: torch.Tensor) -> TopK:
    """Each text's best videos in the final (t2v) ranking, with the gates of the fused pairs."""
    cols = top_k_with_keys(torch.from_numpy(reranked.t2v), min(k, reranked.t2v.shape[1]), video_keys).numpy()
    rows = np.broadcast_to(np.arange(cols.shape[0])[:, None], cols.shape)
    pair = fused_pair_lookup(reranked, rows, cols)
    gates = {}
    for name, g in reranked.pair_gates.items():
        picked = g[np.maximum(pair, 0)].astype(np.float32)
        picked[pair < 0] = np.nan
        gates[name] = picked
    return TopK(cols, gates)


def rerank_metrics(scored: ScoredSplit, caption_video: np.ndarray) -> dict:
    """Final metrics (t2v from the t2v ranking, v2t from the v2t ranking), stage-1 metrics and
    what re-ranking cost."""
    reranked = scored.reranked
    num_texts, num_videos = scored.sim.shape
    fused = int(reranked.pair_text.shape[0])
    return {**metrics_report(reranked.t2v, caption_video, v2t_sim=reranked.v2t),
            "stage1": metrics_report(scored.sim, caption_video),
            "rerank": {"topk": reranked.topk, "pairs_fused": fused, "pairs_total": num_texts * num_videos,
                       "fused_fraction": fused / max(num_texts * num_videos, 1)}}


def _floats(values: np.ndarray) -> list:
    return [float(v) for v in np.asarray(values).reshape(-1)]


def gates_report(scored: ScoredSplit, split) -> dict:
    """gates.json content: per-video gate values per layer (signed; analyses use |g|).

    Text-agnostic models: ``videos[k]["gates"][name]`` = [L]. Text-guided models:
    ``videos[k]["own_captions"]`` lists, for each caption of the video, its gates [L] on
    that video; ``own_caption_mean`` averages them; ``all_texts_mean`` averages the video's
    gates over every text of the split.
    """
    text_guided = bool(scored.own_caption_gates)
    names = sorted(scored.own_caption_gates or scored.video_gates)
    videos = []
    for v, video_id in enumerate(split.video_ids):
        entry: dict = {"video_id": video_id}
        if not text_guided:
            entry["gates"] = {n: _floats(scored.video_gates[n][v]) for n in names}
        else:
            captions = split.captions_of(v)
            entry["own_captions"] = [{"text_index": int(t), "caption": split.captions[t],
                                      **{n: _floats(scored.own_caption_gates[n][t]) for n in names}}
                                     for t in captions]
            entry["own_caption_mean"] = {n: _floats(scored.own_caption_gates[n][captions].mean(0))
                                         for n in names}
            entry["all_texts_mean"] = {n: _floats(scored.mean_text_gates[n][v]) for n in names}
        videos.append(entry)
    return {"text_guided": text_guided, "gate_names": names, "videos": videos}


def _pair_score(scored: ScoredSplit, text: int, video: int, pair: int) -> float:
    """The score a text ranked a video by: the text-guided score of a fused pair under
    re-ranking (``pair`` >= 0), else the plain score."""
    if scored.reranked is not None and pair >= 0:
        return float(scored.reranked.pair_scores[pair])
    return float(scored.sim[text, video])


def _gates_entry(scored: ScoredSplit, names: list, text: int, slot: int, video: int) -> Optional[dict]:
    """Gates [L] per name of one listed pair (None for a re-ranked list entry that was not fused)."""
    if scored.topk.pair_gates:
        values = {n: scored.topk.pair_gates[n][text, slot] for n in names}
        if any(np.isnan(v).any() for v in values.values()):
            return None
        return {n: _floats(v) for n, v in values.items()}
    return {n: _floats(scored.video_gates[n][video]) for n in names}


def topk_records(split, scored: ScoredSplit):
    """One dict per text for topk.jsonl: its caption and video, that video's rank and score,
    and its K best videos with their scores and (where the model has gates) the pair's gates."""
    top = scored.topk
    ranking = scored.reranked.t2v if scored.reranked is not None else scored.sim
    ranks = text_to_video_ranks(torch.as_tensor(ranking), torch.as_tensor(split.caption_video)).numpy()
    names = sorted(top.pair_gates or scored.video_gates)
    rows = np.arange(split.num_texts)
    reranked = scored.reranked is not None
    own_pair = fused_pair_lookup(scored.reranked, rows, split.caption_video) if reranked else -np.ones_like(rows)
    top_pair = (fused_pair_lookup(scored.reranked, np.broadcast_to(rows[:, None], top.video.shape), top.video)
                if reranked else -np.ones_like(top.video))
    for t in rows:
        own = int(split.caption_video[t])
        record = {"text_index": int(t), "caption": split.captions[t], "video_id": split.video_ids[own],
                  "rank": int(ranks[t]), "score": _pair_score(scored, t, own, own_pair[t]), "top": []}
        for slot, v in enumerate(top.video[t]):
            entry = {"video_id": split.video_ids[v], "score": _pair_score(scored, t, v, top_pair[t, slot])}
            if reranked:
                entry["text_guided"] = bool(top_pair[t, slot] >= 0)
            if names:
                entry["gates"] = _gates_entry(scored, names, t, slot, int(v))
            record["top"].append(entry)
        yield record


def write_topk(path: str, split, scored: ScoredSplit) -> None:
    """topk.jsonl (``topk_records``), written atomically."""
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        for record in topk_records(split, scored):
            f.write(json.dumps(record) + "\n")


def write_eval_outputs(output_dir: str, split, scored: ScoredSplit, metrics: dict,
                       perturbation: Optional[dict] = None, leaking: Optional[str] = None) -> None:
    """metrics.json, sim_matrix.npy [Nt, Nv], sim_rows.json, sim_cols.json and gates.json; with an
    audio perturbation (``EvalDatasets.audio_perturbation``) audio_perturbation.json (its
    settings and the swap map); with ``scored.topk`` topk.jsonl.

    ``leaking``: the LEAKING label of a leaking protocol, put first in metrics.json, gates.json
    and audio_perturbation.json (the list-shaped files keep their format; the run's LEAKING file
    covers them).
    """
    os.makedirs(output_dir, exist_ok=True)
    label = {"LEAKING": leaking} if leaking else {}
    if perturbation is not None and perturbation["kind"] != "none":
        write_json(os.path.join(output_dir, PERTURBATION_FILE), {**label, **perturbation})
    write_json(os.path.join(output_dir, "metrics.json"), {**label, **metrics})
    with atomic_path(os.path.join(output_dir, "sim_matrix.npy")) as tmp:
        np.save(tmp, scored.sim.astype(np.float32))
    write_json(os.path.join(output_dir, "sim_rows.json"),
               [{"video_id": split.video_ids[v], "caption": c}
                for c, v in zip(split.captions, split.caption_video)])
    write_json(os.path.join(output_dir, "sim_cols.json"), list(split.video_ids))
    if scored.video_gates or scored.own_caption_gates:
        write_json(os.path.join(output_dir, "gates.json"), {**label, **gates_report(scored, split)})
    if scored.reranked is not None:
        r = scored.reranked
        with atomic_path(os.path.join(output_dir, "rerank_pairs.npz")) as tmp:
            np.savez(tmp, topk=r.topk, pair_text=r.pair_text, pair_video=r.pair_video, pair_scores=r.pair_scores,
                     **{f"gates_{name}": g for name, g in r.pair_gates.items()})
    if scored.topk is not None:
        write_topk(os.path.join(output_dir, TOPK_FILE), split, scored)


@dataclass
class EvalOptions:
    """How an evaluation pass runs.

    Args:
        batch_size: items per encoding batch (per rank).
        workers: DataLoader workers.
        precision: autocast precision of the encoders.
        protocol: "honest" or "paired_block" (LEAKING diagnostic).
        block_size: block length of "paired_block".
        chunk: (texts, videos) per fusion chunk; None = the model's memory budget.
        dsl: also compute dual-softmax metrics.
        rerank_topk: K of shortlist re-ranking (text-guided models; 0 = score every pair).
        dump_topk: keep each text's K best videos for topk.jsonl (0 = no).
    """

    batch_size: int = 16
    workers: int = 0
    precision: str = "fp32"
    protocol: str = "honest"
    block_size: int = 16
    chunk: Optional[tuple[int, int]] = None
    dsl: bool = False
    rerank_topk: int = 0
    dump_topk: int = 0


def evaluate(model: torch.nn.Module, data, options: EvalOptions, info: DistInfo, desc: str = "eval"):
    """Encode every text and video of ``data`` (EvalDatasets) once, score, compute metrics.

    Returns (metrics, ScoredSplit) on rank 0 and (None, None) elsewhere. metrics holds
    "plain" (and "dsl") retrieval metrics and the protocol; a paired_block evaluation is
    labelled "LEAKING".
    """
    common = dict(batch_size=options.batch_size, workers=options.workers, collate_fn=collate_items,
                  info=info, precision=options.precision)
    texts = encode_dataset(model, data.texts, "text", desc=f"{desc} texts", **common)
    videos = encode_dataset(model, data.videos, "video", desc=f"{desc} videos", **common)
    if options.rerank_topk:
        scored = rerank_split(model, texts, videos, data.split, info, options.rerank_topk, options.precision,
                              options.dump_topk, options.chunk)
    else:
        scored = score_split(model, texts, videos, data.split.caption_video, info, options.protocol,
                             options.block_size, options.chunk, options.precision, options.dump_topk,
                             identity_keys(list(data.split.video_ids)))
    if not info.is_main:
        return None, None
    if options.rerank_topk:
        metrics = rerank_metrics(scored, data.split.caption_video)
    else:
        metrics = metrics_report(scored.sim, data.split.caption_video, dsl=options.dsl)
    metrics["protocol"] = options.protocol
    if options.protocol == "paired_block":
        metrics["LEAKING"] = LEAK_LABEL
        logger.warning(LEAK_LABEL)
    return metrics, scored
