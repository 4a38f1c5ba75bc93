"""The chunked pair-fusion primitive (modules.pair_fusion) and the memory rule that sizes its
chunks (modules.memory_plan): plans cover every pair once, chunking and the source of the
fusion context change no score, and training, scoring, re-ranking and the LEAKING diagnostic
all fuse through ``fuse_pair_chunks``."""
from __future__ import annotations

import re

import pytest
import torch

from modules import diagnostics, memory_plan, modeling, objective, pair_fusion, rerank
from modules.fusion import FusionConfig
from modules.modeling import AVIGATE, AVIGATEConfig
from modules.objective import ContrastiveObjective, ObjectiveConfig
from modules.pair_fusion import fuse_pair_chunks, grid_plan, list_plan
from tests.fusion_weights import spread_fusion_weights

NT, NV = 5, 4
GUIDED = dict(text_gate=True, text_query=True, query_gate=True)
TOL = 1e-5
GIB = 1 << 30


def _encoded():
    """A tiny text-guided model with spread weights (the text matters) and NT texts, NV videos
    (video 1 has padded frames)."""
    torch.manual_seed(0)
    model = AVIGATE(AVIGATEConfig.tiny(fusion_residual=0.5, **GUIDED)).eval()
    spread_fusion_weights(model.fusion, cross_attn=True, text_scales=True)
    cfg = model.cfg
    ids = torch.randint(1, 40000, (NT, 8))
    ids[:, 0], ids[:, 7] = 49406, 49407
    res, frames = cfg.clip.image_resolution, cfg.fusion.max_frames
    fmask = torch.ones(NV, frames, dtype=torch.long)
    fmask[1, 2:] = 0
    with torch.no_grad():
        texts = model.encode_text(ids, torch.ones_like(ids))
        videos = model.encode_video(torch.randn(NV, frames, 3, res, res), fmask,
                                    torch.randn(NV, cfg.ast.num_output_tokens, cfg.ast.embed_dim))
    return model, texts, videos


@pytest.mark.parametrize("videos_outer", [True, False])
@pytest.mark.parametrize("chunk", [(1, 1), (2, 3), (NT, NV), (NT + 2, 1)])
def test_grid_plan_covers_every_pair_once(chunk, videos_outer):
    plan = grid_plan(NT, NV, chunk, torch.device("cpu"), videos_outer)
    seen = torch.zeros(NT, NV, dtype=torch.long)
    for c in plan.chunks:
        rows, cols = c.place
        assert torch.equal(c.texts, torch.arange(rows.start, rows.stop))
        assert torch.equal(c.videos, torch.arange(cols.start, cols.stop))
        assert c.video_range == (cols.start, cols.stop)
        seen[c.place] += 1
    assert plan.grid and plan.shape == (NT, NV) and bool((seen == 1).all())
    starts = [(c.place[0].start, c.place[1].start) for c in plan.chunks]
    outer = [s[1] if videos_outer else s[0] for s in starts]
    assert outer == sorted(outer)  # the outer blocks are visited one after the other


def test_list_plan_keeps_the_pair_order_in_chunks():
    ti, vi = torch.tensor([3, 0, 2, 1, 4]), torch.tensor([0, 0, 1, 3, 3])
    plan = list_plan(ti, vi, 2)
    assert not plan.grid and plan.shape == (5,)
    assert [c.place[0] for c in plan.chunks] == [slice(0, 2), slice(2, 4), slice(4, 5)]
    assert torch.equal(torch.cat([c.texts for c in plan.chunks]), ti)
    assert torch.equal(torch.cat([c.videos for c in plan.chunks]), vi)
    assert all(c.video_range is None for c in plan.chunks)  # derived from the chunk's videos


def test_chunking_and_the_context_source_change_no_score():
    model, texts, videos = _encoded()
    text = texts.text
    with torch.no_grad():
        ctx = model.pair_context(text, videos.frames, videos.frame_mask, videos.audio)
        whole = fuse_pair_chunks(model, text, grid_plan(NT, NV, (NT, NV), text.device), context=ctx)
        assert whole.scores.shape == (NT, NV) and torch.isfinite(whole.scores).all()
        assert set(whole.gates) == set(model.gate_names())
        for chunk in [(1, 1), (2, 3), (NT + 2, 1)]:
            for kwargs in (dict(context=ctx), dict(videos=videos)):
                out = fuse_pair_chunks(model, text, grid_plan(NT, NV, chunk, text.device), **kwargs)
                torch.testing.assert_close(out.scores, whole.scores, atol=TOL, rtol=0)
                for name, g in out.gates.items():
                    torch.testing.assert_close(g, whole.gates[name], atol=TOL, rtol=0)
        # Listed pairs (in any order, any chunk) score as their grid entries.
        ti = torch.tensor([4, 0, 2, 2, 1, 3])
        vi = torch.tensor([3, 0, 1, 2, 1, 3])
        for step in (1, 4, 6):
            listed = fuse_pair_chunks(model, text, list_plan(ti, vi, step), videos=videos)
            torch.testing.assert_close(listed.scores, whole.scores[ti, vi], atol=TOL, rtol=0)
            torch.testing.assert_close(listed.gates["att"], whole.gates["att"][ti, vi], atol=TOL, rtol=0)


def test_an_empty_plan_returns_empty_scores_and_every_gate():
    model, texts, videos = _encoded()
    none = torch.zeros(0, dtype=torch.long)
    out = fuse_pair_chunks(model, texts.text, list_plan(none, none, 8), videos=videos)
    assert out.scores.shape == (0,)
    assert {k: tuple(v.shape) for k, v in out.gates.items()} == {
        name: (0, model.cfg.fusion.layers) for name in model.gate_names()}


def test_recomputed_chunks_give_the_same_gradients():
    model, texts, videos = _encoded()
    model.train()
    grads = []
    for recompute in (False, True):
        model.zero_grad()
        ctx = model.pair_context(texts.text, videos.frames, videos.frame_mask, videos.audio)
        out = fuse_pair_chunks(model, texts.text, grid_plan(NT, NV, (2, 3), texts.text.device),
                               context=ctx, recompute=recompute)
        out.scores.square().sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and any(n.startswith("fusion.") for n in grads[0])
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, atol=1e-6, rtol=1e-5, msg=name)


def test_it_takes_exactly_one_context_source():
    model, texts, videos = _encoded()
    ctx = model.pair_context(texts.text, videos.frames, videos.frame_mask, videos.audio)
    plan = grid_plan(NT, NV, (NT, NV), texts.text.device)
    with pytest.raises(ValueError, match="either a prepared context or the videos"):
        fuse_pair_chunks(model, texts.text, plan, context=ctx, videos=videos)
    with pytest.raises(ValueError, match="either a prepared context or the videos"):
        fuse_pair_chunks(model, texts.text, plan)


def test_training_scoring_reranking_and_the_diagnostic_fuse_through_the_primitive(monkeypatch):
    """One home for the chunked pair-fusion loop: each caller's fusion goes through it."""
    calls = []

    def counting(name):
        def fuse(*args, **kwargs):
            calls.append(name)
            return pair_fusion.fuse_pair_chunks(*args, **kwargs)
        return fuse

    for module in (modeling, objective, rerank, diagnostics):
        monkeypatch.setattr(module, "fuse_pair_chunks", counting(module.__name__))
    model, texts, videos = _encoded()
    with torch.no_grad():
        model.score(texts, videos)
        lists = rerank.shortlists(model.agnostic_scores(texts, videos).scores, 2)
        rerank.score_pair_list(model, texts, videos, lists.pair_text, lists.pair_video)
        diagnostics.paired_block_scores(model, texts, videos, block_size=2)
    assert calls == ["modules.modeling", "modules.rerank", "modules.diagnostics"]
    calls.clear()
    res, frames = model.cfg.clip.image_resolution, model.cfg.fusion.max_frames
    inputs = dict(text_ids=torch.tensor([[49406, 320, 49407]] * 3), text_mask=torch.ones(3, 3, dtype=torch.long),
                  frames=torch.randn(3, frames, 3, res, res), frame_mask=torch.ones(3, frames, dtype=torch.long),
                  audio=torch.randn(3, model.cfg.ast.num_output_tokens, model.cfg.ast.embed_dim))
    for pairs in ("all", "hardest_k"):
        ContrastiveObjective(model, ObjectiveConfig(training_pairs=pairs, hardest_k=1))(**inputs).loss.backward()
    assert calls == ["modules.objective"] * 2


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("device_gib", [24, 80, 141])
def test_the_suggested_eval_chunk_fits_a_quarter_of_the_device(precision, device_gib):
    """The scoring hint follows the training one's rule: the largest power of two of pairs
    within CHUNK_MEMORY_SHARE of the device (here the device, not the chunk, bounds it)."""
    fusion = FusionConfig(width=512, layers=4, max_frames=12)
    per_pair = memory_plan.pair_bytes(memory_plan.EVAL_PAIR_BYTES, precision, fusion)
    message = memory_plan.eval_memory_hint(fusion, 10 ** 6, 10 ** 6, (10 ** 6, 10 ** 6), precision,
                                           device_gib * GIB)
    pairs = int(re.search(r"try --eval_chunk \d+ \d+ \((\d+) pairs", message).group(1))
    budget = memory_plan.CHUNK_MEMORY_SHARE * device_gib * GIB
    assert pairs & (pairs - 1) == 0 and pairs * per_pair <= budget < 2 * pairs * per_pair
    assert f"{per_pair / 1024:.0f} KiB per pair" in message


def test_pair_bytes_scale_with_frames_width_and_layers():
    measured = FusionConfig(width=512, layers=4, max_frames=12)
    assert memory_plan.pair_bytes(memory_plan.TRAIN_PAIR_BYTES, "fp32", measured) == \
        memory_plan.TRAIN_PAIR_BYTES["fp32"]
    double = FusionConfig(width=512, layers=8, max_frames=12)
    assert memory_plan.pair_bytes(memory_plan.EVAL_PAIR_BYTES, "bf16", double) == \
        2 * memory_plan.EVAL_PAIR_BYTES["bf16"]
    # An unknown precision is planned as fp32 (the largest).
    assert memory_plan.pair_bytes(memory_plan.EVAL_PAIR_BYTES, "fp64", measured) == \
        memory_plan.EVAL_PAIR_BYTES["fp32"]


# 1 MB per pair: a quarter of 1 GiB holds 268 pairs -> 256.
@pytest.mark.parametrize("cap,device_gib,expected", [(None, None, memory_plan.FALLBACK_CHUNK), (6, None, 4),
                                                     (0, None, 1), (1 << 40, 1, 256), (100, 1, 64)])
def test_power_of_two_chunk(cap, device_gib, expected):
    device = device_gib * GIB if device_gib else None
    assert memory_plan.power_of_two_chunk(1_000_000.0, device, cap) == expected


@pytest.mark.parametrize("nt,nv,pairs,expected", [(10, 4, 8, (2, 4)), (10, 4, 100, (10, 4)), (10, 4, 3, (1, 3)),
                                                  (0, 0, 0, (1, 1))])
def test_grid_chunk(nt, nv, pairs, expected):
    assert memory_plan.grid_chunk(nt, nv, pairs) == expected
    assert memory_plan.eval_chunk(nt, nv, (0, 7)) == (1, 7)
