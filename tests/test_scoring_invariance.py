"""THE RULE: a score depends only on its (text, video) pair. Shuffling texts or videos,
re-batching them or changing the chunk sizes changes no score by more than 1e-5, for the
text-agnostic model and every text-guided variant. The leaking paired_block diagnostic does
change under shuffling (it is there to reproduce the public implementation's protocol)."""
import itertools

import pytest
import torch

from modules.diagnostics import paired_block_scores
from modules.fusion import FusionConfig, FusionTransformer
from modules.modeling import AVIGATE, AVIGATEConfig, TextFeatures, VideoFeatures
from modules.similarity import pair_scores
from tests.fusion_weights import spread_fusion_weights

TOL = 1e-5
NT, NV = 7, 6
# Every combination of the three text flags (all-False = the text-agnostic model), soft gates,
# plus hard gates on the full text-guided model.
VARIANTS = [dict(text_gate=a, text_query=b, query_gate=c) for a, b, c in itertools.product([False, True], repeat=3)]
VARIANTS.append(dict(text_gate=True, text_query=True, query_gate=True, gate="hard"))


def variant_id(flags):
    on = [k for k, v in flags.items() if v is True] + ([flags["gate"]] if "gate" in flags else [])
    return "+".join(on) or "agnostic"


def encoded(flags):
    """A tiny model whose gates and cross-attention are far from their near-zero init and whose
    text terms are on (so the text matters), and the features of NT texts and NV videos."""
    model = AVIGATE(AVIGATEConfig.tiny(fusion_residual=0.5, **flags)).eval()
    spread_fusion_weights(model.fusion, cross_attn=True, text_scales=True)
    cfg = model.cfg
    ids = torch.randint(1, 40000, (NT, 8))
    ids[:, 0], ids[:, 7] = 49406, 49407
    frames = torch.randn(NV, cfg.fusion.max_frames, 3, cfg.clip.image_resolution, cfg.clip.image_resolution)
    fmask = torch.ones(NV, cfg.fusion.max_frames, dtype=torch.long)
    fmask[1, 2:], fmask[4, 1:], fmask[5] = 0, 0, 0
    tokens = torch.randn(NV, cfg.ast.num_output_tokens, cfg.ast.embed_dim)
    with torch.no_grad():
        texts = model.encode_text(ids, torch.ones_like(ids))
        videos = model.encode_video(frames, fmask, tokens)
    return model, texts, videos


@pytest.mark.parametrize("flags", VARIANTS, ids=variant_id)
def test_scores_do_not_depend_on_order_batching_or_chunks(flags):
    model, texts, videos = encoded(flags)
    base = model.score(texts, videos)
    assert base.shape == (NT, NV) and torch.isfinite(base).all()
    deltas = {}
    pt, pv = torch.randperm(NT), torch.randperm(NV)
    deltas["shuffle texts"] = model.score(texts.select(pt), videos) - base[pt]
    deltas["shuffle videos"] = model.score(texts, videos.select(pv)) - base[:, pv]
    deltas["shuffle both"] = model.score(texts.select(pt), videos.select(pv)) - base[pt][:, pv]
    for chunk in [(1, 1), (2, 5), (NT, NV), (3, 1), (NT + 3, 2)]:
        deltas[f"chunk {chunk}"] = model.score(texts, videos, chunk=chunk) - base
    rows = torch.cat([model.score(texts.select(torch.tensor([i])), videos) for i in range(NT)])
    deltas["one text at a time"] = rows - base
    cols = torch.cat([model.score(texts, videos.select(slice(j, j + 1))) for j in range(NV)], dim=1)
    deltas["one video at a time"] = cols - base
    halves = VideoFeatures.cat([videos.select(slice(0, 2)), videos.select(slice(2, NV))])
    deltas["re-concatenated videos"] = model.score(TextFeatures.cat([texts]), halves) - base
    worst = {k: v.abs().max().item() for k, v in deltas.items()}
    print(f"{variant_id(flags)}: max |delta| = {max(worst.values()):.2e} ({max(worst, key=worst.get)})")
    assert max(worst.values()) <= TOL, worst


@pytest.mark.parametrize("flags", [dict(text_gate=True), dict(text_query=True, query_gate=True)],
                         ids=variant_id)
def test_paired_block_leaks_and_depends_on_order(flags):
    model, texts, videos = encoded(flags)
    honest = model.score(texts, videos)
    nv = NV
    leaky = paired_block_scores(model, texts.select(slice(0, nv)), videos, block_size=3).scores
    # Diagonal blocks: video k is fused with caption k, so the diagonal matches the honest
    # score of that pair while the rest of the block is scored against other texts' fusions.
    torch.testing.assert_close(leaky.diagonal(), honest[:nv].diagonal(), atol=TOL, rtol=0)
    off_diagonal = ~torch.eye(nv, dtype=torch.bool)
    assert (leaky - honest[:nv])[off_diagonal].abs().max() > 1e-3
    perm = torch.randperm(nv)
    shuffled = paired_block_scores(model, texts.select(perm), videos, block_size=3).scores
    delta = (shuffled - leaky[perm]).abs().max().item()
    print(f"paired_block {variant_id(flags)}: max |delta| under text shuffling = {delta:.3f}")
    assert delta > 1e-3
    with pytest.raises(ValueError, match="block size"):
        paired_block_scores(model, texts, videos, block_size=0)


@pytest.mark.heavy
def test_fast_path_and_chunking_at_full_width():
    """D=512, F=12, Q=12, 4 layers: larger matrix products take other kernels; the fast pair
    path must still equal the reference and be independent of the pair batch."""
    torch.manual_seed(0)
    d, f, q, nt, nv = 512, 12, 12, 3, 4
    model = FusionTransformer(FusionConfig(width=d, layers=4, max_frames=f, text_gate=True,
                                           text_query=True, query_gate=True, fusion_residual=0.5))
    with torch.no_grad():
        for layer, block in enumerate(model.blocks):
            for gate in block.gates.values():
                gate.fc2.weight.normal_(std=1.0)
        frames, audio, text = torch.randn(nv, f, d), torch.randn(nv, q, d), torch.randn(nt, d)
        mask = torch.ones(nv, f, dtype=torch.bool)
        mask[2, 5:] = False
        vctx, tctx = model.prepare_videos(frames, mask, audio), model.prepare_texts(text)
        ti, vi = torch.arange(nt).repeat_interleave(nv), torch.arange(nv).repeat(nt)
        scale = torch.tensor(4.6)
        fast = model.fuse_pairs(vctx, tctx, ti, vi).fused
        ref = model.fuse_reference(frames[vi], mask[vi], audio[vi], text[ti]).fused
        single = torch.cat([model.fuse_pairs(vctx, tctx, ti[p:p + 1], vi[p:p + 1]).fused for p in range(nt * nv)])
        s_fast = pair_scores(text[ti], fast, mask[vi], scale, 1.0)
        s_single = pair_scores(text[ti], single, mask[vi], scale, 1.0)
    err, chunk_err = (fast - ref).abs().max().item(), (s_fast - s_single).abs().max().item()
    print(f"D=512: max |fast - reference| = {err:.2e}; score change one pair per batch = {chunk_err:.2e}")
    assert err <= TOL and chunk_err <= TOL
