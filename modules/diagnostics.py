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
    nt, nv = text.shape[0], len(video_feats)
    scores = text.new_zeros(nt, nv, dtype=torch.float32)
    gates = {name: text.new_zeros(nt, nv, model.cfg.fusion.layers, dtype=torch.float32)
             for name in model.gate_names()}
    for v0 in range(0, nv, block_size):
        v1 = min(v0 + block_size, nv)
        part = model.video_context_inputs(video_feats, v0, v1)
        ctx = model.pair_context(text, part.frames, part.frame_mask, part.audio)
        vi = torch.arange(v1 - v0, device=text.device)
        for t0 in range(0, nt, block_size):
            t1 = min(t0 + block_size, nt)
            ti = t0 + vi % (t1 - t0)
            out = model.fusion.fuse_pairs(ctx.videos, ctx.texts, ti, vi)
            with exact_fp32(text.device):
                scores[t0:t1, v0:v1] = global_local_scores(text[t0:t1].float(), out.fused.float(),
                                                           ctx.frame_mask, model.logit_scale.float(),
                                                           model.cfg.temperature, model.cfg.alignment)
            for name, value in out.gates.items():
                gates[name][t0:t1, v0:v1] = value.unsqueeze(0)
    return ScoreOutput(scores, gates)
