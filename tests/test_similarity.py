"""Multi-grained similarity (docs/design.md §5) against a direct per-pair computation."""
import math

import pytest
import torch

from modules.similarity import (LOGIT_SCALE_MAX, VideoIndex, global_local_scores, index_scores,
                                masked_logsumexp, pair_scores, video_index)

D, F = 16, 5


def direct_score(t, frames, mask, s, tau):
    """docs/design.md §5 written out for one pair, in float64 (valid frames only)."""
    t = t.double() / t.double().norm()
    valid = frames[mask.bool()].double()
    if valid.shape[0] == 0:
        return 0.0
    unit = valid / valid.norm(dim=-1, keepdim=True)
    mean = unit.mean(0)
    global_term = s * float(t @ (mean / mean.norm()))
    local_term = math.log(sum(math.exp(tau * s * float(t @ u)) for u in unit)) / tau
    return (global_term + local_term) / 2


def data(nt=3, nv=4):
    text, frames = torch.randn(nt, D), torch.randn(nv, F, D)
    mask = torch.ones(nv, F, dtype=torch.bool)
    mask[1, 2:] = False
    return text, frames, mask


@pytest.mark.parametrize("tau", [1.0, 0.5])
def test_matches_direct_formula(tau):
    text, frames, mask = data()
    logit_scale = torch.tensor(math.log(20.0))
    got = global_local_scores(text, frames, mask, logit_scale, tau)
    for i in range(3):
        for j in range(4):
            assert got[i, j].item() == pytest.approx(direct_score(text[i], frames[j], mask[j], 20.0, tau), abs=1e-4)


def test_pair_fused_variant_equals_pairwise():
    text, _, mask = data()
    fused = torch.randn(3, 4, F, D)
    scale = torch.tensor(3.0)
    got = global_local_scores(text, fused, mask, scale, 1.0)
    for i in range(3):
        expect = pair_scores(text[i].expand(4, -1), fused[i], mask, scale, 1.0)
        torch.testing.assert_close(got[i], expect, atol=1e-5, rtol=1e-5)


def test_padded_frames_are_ignored_and_the_scale_has_a_gradient_at_the_cap():
    text, frames, mask = data()
    noisy = frames + 50 * torch.randn_like(frames) * (~mask).unsqueeze(-1)
    scale = torch.tensor(2.0)
    torch.testing.assert_close(global_local_scores(text, noisy, mask, scale, 1.0),
                               global_local_scores(text, frames, mask, scale, 1.0))
    # CLIP's released value sits exactly at the cap ln 100: the forward does not clamp, so the
    # parameter keeps its gradient (it is clamped after optimizer steps instead, docs/design.md §5).
    at_cap = torch.tensor(math.log(LOGIT_SCALE_MAX), requires_grad=True)
    global_local_scores(text, frames, mask, at_cap, 1.0).sum().backward()
    assert at_cap.grad is not None and at_cap.grad.abs() > 0


def test_no_overflow_and_empty_videos_are_finite_with_finite_gradients():
    """tau * s * cos reaches 1000 here: a direct exp would overflow even in fp32."""
    text = torch.randn(2, D, requires_grad=True)
    frames = text.detach().unsqueeze(1).repeat(1, F, 1).clone().requires_grad_(True)
    mask = torch.ones(2, F, dtype=torch.bool)
    mask[1] = False
    scores = global_local_scores(text, frames, mask, torch.tensor(math.log(100.0)), 10.0)
    assert torch.isfinite(scores).all()
    assert scores[0, 0].item() == pytest.approx(100.0 + math.log(F) / 20.0, rel=1e-4)
    assert (scores[:, 1] == 0).all()  # no valid frame: no evidence
    scores.sum().backward()
    assert torch.isfinite(text.grad).all() and torch.isfinite(frames.grad).all()
    for dtype in (torch.float16, torch.bfloat16):
        z = torch.full((3, F), 60000.0 if dtype == torch.float16 else 1e30).to(dtype)
        assert torch.isfinite(masked_logsumexp(z, torch.ones(3, F, dtype=torch.bool))).all()


def test_index_scores_chunked_and_fp16_storage():
    text, frames, mask = data(nt=5, nv=9)
    scale = torch.tensor(math.log(100.0))
    index = video_index(frames, mask)
    assert index.shape == (9, F + 1, D)
    full = index_scores(text, index, mask, scale, 1.0)
    torch.testing.assert_close(index_scores(text, index, mask, scale, 1.0, video_chunk=2), full,
                               atol=1e-5, rtol=1e-5)
    half = index_scores(text, index.half(), mask, scale, 1.0)
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, full, atol=0.2, rtol=0)  # fp16 keeps ~3 digits of cos * 100


def test_feature_major_video_index_equals_direct_scores():
    text, frames, mask = data(nt=4, nv=7)
    scale = torch.tensor(3.0)
    index = VideoIndex.build(video_index(frames, mask), mask)
    assert index.vectors.shape == (D, 7 * (F + 1)) and len(index) == 7
    expect = global_local_scores(text, frames, mask, scale, 0.7)
    torch.testing.assert_close(index.scores(text, scale, 0.7), expect, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(index.scores(text, scale, 0.7, video_chunk=3), expect, atol=1e-5, rtol=1e-5)
    assert VideoIndex.build(video_index(frames, mask), mask, dtype=torch.float16).vectors.dtype == torch.float16
    with pytest.raises(ValueError, match=r"\(2, 8\).*D=16"):
        index.scores(torch.randn(2, 8), scale, 1.0)
    with pytest.raises(ValueError, match=r"\(7, 6, 16\).*\(7, 4\)"):
        VideoIndex.build(video_index(frames, mask), mask[:, :4])


def test_mismatched_shapes_name_both():
    text, frames, mask = data()
    with pytest.raises(ValueError, match=r"\(3, 8\).*\(4, 5, 16\)"):
        global_local_scores(torch.randn(3, 8), frames, mask, torch.tensor(1.0), 1.0)
    with pytest.raises(ValueError, match=r"\(4, 3\).*\(4, 5, 16\)"):
        global_local_scores(text, frames, mask[:, :3], torch.tensor(1.0), 1.0)
    with pytest.raises(ValueError, match=r"\(2, 16\).*\(3, 5, 16\)"):
        pair_scores(text[:2], frames[:3], mask[:3], torch.tensor(1.0), 1.0)
