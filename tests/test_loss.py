"""Adaptive margins and the margin contrastive loss (docs/design.md §6), as one process."""
import math

import pytest
import torch
import torch.nn.functional as F

from modules.loss import (LossConfig, adaptive_margins, all_gather_no_grad,
                          all_gather_with_grad, margin_contrastive_loss, pair_margins)


def _plain_infonce(logits):
    """Symmetric InfoNCE written independently: mean of row and column CE, diagonal targets."""
    targets = torch.arange(logits.shape[0])
    return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets))


def test_loss_config_defaults_follow_the_recipe():
    cfg = LossConfig()
    assert (cfg.beta, cfg.margin_cap) == (0.2, 0.1)


def test_margins_hand_worked_3x3():
    # Texts (normalized inside, so scale does not matter): t0 = (1, 0), t1 = (0, 1),
    # t2 = (0.6, 0.8). cos(t0,t1) = 0, cos(t0,t2) = 0.6, cos(t1,t2) = 0.8.
    text = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 4.0]])
    # Videos: v0 = (1, 0), v1 = (-1, 0), v2 = (0, 1).
    # cos(v0,v1) = -1, cos(v0,v2) = 0, cos(v1,v2) = 0.
    video = torch.tensor([[1.0, 0.0], [-2.0, 0.0], [0.0, 5.0]])
    beta, cap = 0.2, 0.15
    # m01 = min(0.2 * (1 - (0 - 1) / 2), 0.15)   = min(0.30, 0.15) = 0.15 (capped)
    # m02 = min(0.2 * (1 - (0.6 + 0) / 2), 0.15) = min(0.14, 0.15) = 0.14
    # m12 = min(0.2 * (1 - (0.8 + 0) / 2), 0.15) = min(0.12, 0.15) = 0.12
    want = torch.tensor([[0.0, 0.15, 0.14],
                         [0.15, 0.0, 0.12],
                         [0.14, 0.12, 0.0]])
    margins = adaptive_margins(text, video, beta, cap)
    torch.testing.assert_close(margins, want)
    assert torch.equal(margins.diagonal(), torch.zeros(3))


def test_fixed_margin_is_the_cap_off_the_diagonal():
    # Table 4's fixed-margin row: m_ij = delta for every i != j, whatever the features.
    # Near-identical features: adaptive margins far below the cap, fixed ones at it.
    text, video = 1 + 0.1 * torch.randn(5, 8), 1 + 0.1 * torch.randn(5, 8)
    fixed = pair_margins(text, video, LossConfig(beta=0.2, margin_cap=0.1, fixed=True))
    want = torch.full((5, 5), 0.1).fill_diagonal_(0.0)
    torch.testing.assert_close(fixed, want)
    adaptive = pair_margins(text, video, LossConfig(beta=0.2, margin_cap=0.1))
    torch.testing.assert_close(adaptive, adaptive_margins(text, video, 0.2, 0.1))
    assert adaptive.max() < 0.05


def test_margins_carry_no_gradient():
    text = torch.randn(4, 8, requires_grad=True)
    video = torch.randn(4, 8, requires_grad=True)
    assert not adaptive_margins(text, video, 0.2, 0.1).requires_grad


def test_margins_reject_mismatched_shapes():
    with pytest.raises(ValueError, match="video_mean"):
        adaptive_margins(torch.randn(4, 8), torch.randn(3, 8), 0.2, 0.1)


@pytest.mark.parametrize("beta, cap", [(0.0, 0.1), (0.2, 0.0)])
def test_zero_beta_or_cap_is_plain_infonce(beta, cap):
    logits = torch.randn(6, 6) * 10
    margins = adaptive_margins(torch.randn(6, 16), torch.randn(6, 16), beta, cap)
    loss = margin_contrastive_loss(logits, margins, math.log(100.0))
    torch.testing.assert_close(loss, _plain_infonce(logits))
    torch.testing.assert_close(margin_contrastive_loss(logits, None, 4.0), _plain_infonce(logits))


def test_margins_add_scaled_off_diagonal():
    logits = torch.randn(5, 5) * 10
    margins = torch.rand(5, 5) * 0.1  # a non-zero diagonal must be ignored
    # s = exp(logit_scale) as it is (the parameter is clamped after optimizer steps, not here).
    loss = margin_contrastive_loss(logits, margins, math.log(200.0))
    shifted = logits + 200.0 * margins * (1 - torch.eye(5))
    torch.testing.assert_close(loss, _plain_infonce(shifted))
    loss = margin_contrastive_loss(logits, margins, math.log(20.0))
    torch.testing.assert_close(loss, _plain_infonce(logits + 20.0 * margins * (1 - torch.eye(5))))


def test_margin_loss_is_larger_than_plain():
    logits = torch.randn(8, 8) * 5
    margins = adaptive_margins(torch.randn(8, 16), torch.randn(8, 16), 0.2, 0.1)
    assert margin_contrastive_loss(logits, margins, 4.0) > margin_contrastive_loss(logits, None, 4.0)


def test_negative_infinity_entries_are_excluded():
    # Row 0 keeps only its positive and video 2; video 1 keeps only its positive and text 2.
    neg_inf = float("-inf")
    logits = torch.tensor([[2.0, neg_inf, 1.0],
                           [0.5, 3.0, neg_inf],
                           [neg_inf, -1.0, 0.0]], requires_grad=True)
    margins = torch.full((3, 3), 0.1)
    s = 10.0  # logit_scale = log 10, so s * m = 1 off the diagonal

    def ce(positive, negatives):
        return -positive + math.log(math.exp(positive) + sum(math.exp(n + s * 0.1) for n in negatives))

    rows = ce(2.0, [1.0]) + ce(3.0, [0.5]) + ce(0.0, [-1.0])
    cols = ce(2.0, [0.5]) + ce(3.0, [-1.0]) + ce(0.0, [1.0])
    want = (rows / 3 + cols / 3) / 2
    loss = margin_contrastive_loss(logits, margins, math.log(s))
    assert loss.item() == pytest.approx(want, rel=1e-6)
    loss.backward()
    assert torch.isfinite(logits.grad).all()
    assert torch.equal(logits.grad.isneginf(), torch.zeros(3, 3, dtype=torch.bool))
    assert logits.grad[0, 1] == 0 and logits.grad[1, 2] == 0 and logits.grad[2, 0] == 0


def test_negative_infinity_on_the_diagonal_is_an_error():
    logits = torch.zeros(3, 3)
    logits[1, 1] = float("-inf")
    with pytest.raises(RuntimeError, match="positive"):
        margin_contrastive_loss(logits, None, 4.0)


def test_non_square_logits_are_an_error():
    with pytest.raises(ValueError, match="square"):
        margin_contrastive_loss(torch.zeros(3, 4), None, 4.0)


def test_gradients_match_finite_differences():
    logits = torch.randn(4, 4, dtype=torch.float64, requires_grad=True)
    logit_scale = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    margins = adaptive_margins(torch.randn(4, 8), torch.randn(4, 8), 0.2, 0.1).double()
    assert torch.autograd.gradcheck(
        lambda x, s: margin_contrastive_loss(x, margins, s), (logits, logit_scale))


def test_computes_in_fp32_under_autocast():
    logits = (torch.randn(6, 6) * 10).bfloat16()
    margins = adaptive_margins(torch.randn(6, 8), torch.randn(6, 8), 0.2, 0.1)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        loss = margin_contrastive_loss(logits, margins, math.log(50.0))
    assert loss.dtype == torch.float32
    want = _plain_infonce(logits.float() + 50.0 * margins)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-5)


def test_gathers_are_identity_without_a_process_group():
    x = torch.randn(3, 5, requires_grad=True)
    assert all_gather_with_grad(x) is x
    gathered = all_gather_no_grad(x)
    assert torch.equal(gathered, x) and not gathered.requires_grad
