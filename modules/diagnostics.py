"""Evaluation protocols that are NOT valid results, kept to measure what they do.

``paired_block_scores`` reproduces a public text-guided implementation's evaluation: texts
and videos are cut in blocks of ``block_size`` in the given order and, within (text block a,
video block c), the k-th video is fused with the k-th text of block a (k modulo the block's
length). On the diagonal blocks a video is thus fused with its own caption, and every score
depends on the order and batching of the evaluation: a LEAK (docs/design.md §4). Evaluation calls it
by name (``--eval_protocol paired_block``) and labels everything it writes LEAKING.

Shapes: Nt / Nv texts / videos, F frames, D width, L layers.
"""
from __future__ import annotations

import torch

from modules.modeling import AVIGATE, ScoreOutput, TextFeatures, VideoFeatures
from modules.pair_fusion import PairContext, PairScores, Scorer, fuse_pair_chunks, grid_plan
from modules.similarity import exact_fp32, global_local_scores

LEAK_LABEL = ("LEAKING: paired_block fuses each video with the caption at its position in the "
              "evaluation batch (the public implementation's protocol); not a valid result")


@torch.no_grad()
def paired_block_scores(model: AVIGATE, text_feats: TextFeatures, video_feats: VideoFeatures,
                        block_size: int) -> ScoreOutput:
    """Scores [Nt, Nv] under the leaking paired_block protocol (module docstring), with the
    gates used ([Nt, Nv, L]). A text-agnostic model scores honestly (no text enters its fusion,
    so there is nothing to leak)."""
    if not model.text_guided:
        return model.score_with_gates(text_feats, video_feats)
    if block_size < 1:
        raise ValueError(f"paired_block needs a block size >= 1 (--batch_size_val), got {block_size}")
    text = text_feats.text.to(model.logit_scale.device)
    plan = grid_plan(text.shape[0], len(video_feats), (block_size, block_size), text.device)
    out = fuse_pair_chunks(model, text, plan, videos=video_feats, scorer=_paired_block_scorer(model))
    return ScoreOutput(out.scores, {name: g.float() for name, g in out.gates.items()})


def _paired_block_scorer(model: AVIGATE) -> Scorer:
    """Scores one (text block, video block) the leaking way: the k-th video of the block fused
    with the text at position k (modulo the block's texts), then scored against every text of
    the block -> PairScores(scores [Tc, Vc], gates [Tc, Vc, L], the same for every text)."""
    def score(ctx: PairContext, text_rows: torch.Tensor, video_cols: torch.Tensor) -> PairScores:
        tc = text_rows.shape[0]
        out = model.fusion.fuse_pairs(ctx.videos, ctx.texts, text_rows[video_cols % tc], video_cols)
        with exact_fp32(text_rows.device):
            scores = global_local_scores(ctx.text[text_rows], out.fused.float(), ctx.frame_mask[video_cols],
                                         model.logit_scale.float(), model.cfg.temperature, model.cfg.alignment)
        return PairScores(scores, {name: g.unsqueeze(0).expand(tc, -1, -1) for name, g in out.gates.items()})

    return score
