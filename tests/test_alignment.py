"""Alignment schemes (``--alignment global|local|both``, the paper's Table 5): each equals its
formula of docs/design.md §5 on every scoring path (score matrices, pair scores, the cached video
index), and a model built with a scheme uses it everywhere (training logits == score, the
agnostic index of a text-guided model, the paired_block diagnostic)."""
import math

import pytest
import torch

from modules.diagnostics import paired_block_scores
from modules.modeling import AVIGATE, AVIGATEConfig
from modules.similarity import ALIGNMENTS, VideoIndex, global_local_scores, index_scores, pair_scores, video_index
from tests.test_modeling import make_model, objective, texts, videos

D, F = 16, 5


def formula(t, frames, mask, s, tau, alignment):
    """docs/design.md §5 for one pair in float64: global = s cos(t, normalize(mean of unit frames)),
    local = (1/tau) log sum_f exp(tau s cos(t, V_f)), both = their mean (valid frames only)."""
    t = t.double() / t.double().norm()
    unit = frames[mask.bool()].double()
    unit = unit / unit.norm(dim=-1, keepdim=True)
    mean = unit.mean(0)
    global_term = s * float(t @ (mean / mean.norm()))
    local_term = math.log(sum(math.exp(tau * s * float(t @ u)) for u in unit)) / tau
    return {"global": global_term, "local": local_term, "both": (global_term + local_term) / 2}[alignment]


def inputs():
    g = torch.Generator().manual_seed(3)
    text, frames = torch.randn(3, D, generator=g), torch.randn(4, F, D, generator=g)
    mask = torch.ones(4, F, dtype=torch.bool)
    mask[1, 2:] = False
    mask[3, 1:] = False
    return text, frames, mask


@pytest.mark.parametrize("alignment", ALIGNMENTS)
@pytest.mark.parametrize("tau", [1.0, 0.5])
def test_every_scoring_path_equals_the_formula(alignment, tau):
    text, frames, mask = inputs()
    scale = torch.tensor(math.log(20.0))
    expect = torch.tensor([[formula(text[i], frames[j], mask[j], 20.0, tau, alignment) for j in range(4)]
                           for i in range(3)], dtype=torch.float64)
    paths = {
        "matrix": global_local_scores(text, frames, mask, scale, tau, alignment),
        "pair_fused_matrix": global_local_scores(text, frames.expand(3, -1, -1, -1), mask, scale, tau, alignment),
        "index": index_scores(text, video_index(frames, mask), mask, scale, tau, video_chunk=3, alignment=alignment),
        "video_index": VideoIndex.build(video_index(frames, mask), mask).scores(text, scale, tau, video_chunk=2,
                                                                                alignment=alignment),
        "pairs": torch.stack([pair_scores(text[i].expand(4, -1), frames, mask, scale, tau, alignment)
                              for i in range(3)]),
    }
    for name, got in paths.items():
        torch.testing.assert_close(got.double(), expect, atol=2e-4, rtol=1e-5, msg=name)


def test_schemes_differ_and_both_is_the_mean():
    text, frames, mask = inputs()
    scale = torch.tensor(math.log(20.0))
    g, loc, both = (global_local_scores(text, frames, mask, scale, 1.0, a) for a in ("global", "local", "both"))
    assert (g - loc).abs().max() > 1.0  # a test that could tell the schemes apart
    torch.testing.assert_close(both, (g + loc) / 2)


def test_global_scheme_keeps_gradients_and_unknown_scheme_is_an_error():
    text, frames, mask = inputs()
    frames.requires_grad_(True)
    global_local_scores(text, frames, mask, torch.tensor(2.0), 1.0, "global").sum().backward()
    assert frames.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="--alignment"):
        global_local_scores(text, frames, mask, torch.tensor(2.0), 1.0, "mean")
    with pytest.raises(ValueError, match="--alignment"):
        AVIGATEConfig(alignment="frames")


@pytest.mark.parametrize("alignment", ["global", "local"])
@pytest.mark.parametrize("flags", [{}, dict(text_gate=True, text_query=True, query_gate=True)])
def test_model_uses_its_scheme_in_training_logits_scores_and_the_index(alignment, flags):
    model = make_model(**flags)
    model.cfg.alignment = alignment
    ids, tmask = texts(4)
    frames, fmask, tokens = videos(model, 4)
    logits = objective(model)(ids, tmask, frames, fmask, tokens).logits.detach()
    model.eval()
    t, v = model.encode_text(ids, tmask), model.encode_video(frames, fmask, tokens)
    scores = model.score(t, v)
    torch.testing.assert_close(logits, scores, atol=1e-5, rtol=1e-5)
    # The agnostic index (a text-guided model's stage 1) and the paired_block diagnostic too.
    agnostic = model.agnostic_scores(t, v).scores
    fused = model.fusion.agnostic(v.frames, v.frame_mask, v.audio).fused
    expect = global_local_scores(t.text, fused, v.frame_mask, model.logit_scale, 1.0, alignment)
    torch.testing.assert_close(agnostic, expect, atol=1e-5, rtol=1e-5)
    if flags:
        own = torch.arange(4)
        ctx = model.pair_context(t.text, v.frames, v.frame_mask, v.audio)
        diagonal = pair_scores(t.text, model.fusion.fuse_pairs(ctx.videos, ctx.texts, own, own).fused,
                               v.frame_mask, model.logit_scale, 1.0, alignment)
        leak = paired_block_scores(model, t, v, block_size=4).scores
        torch.testing.assert_close(leak.diagonal(), diagonal, atol=1e-5, rtol=1e-5)
    model.cfg.alignment = "both"
    assert (model.score(t, v) - scores).abs().max() > 1e-3  # the scheme changed the scores


def test_alignment_adds_no_weights():
    assert set(AVIGATE(AVIGATEConfig.tiny()).state_dict()) == \
        set(AVIGATE(AVIGATEConfig(**{**AVIGATEConfig.tiny().__dict__, "alignment": "local"})).state_dict())
