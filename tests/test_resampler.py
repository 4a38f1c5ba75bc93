"""Audio resampler (docs/design.md §2): shapes, CLIP names, init, LayerNorm epsilon, per-row independence."""
import pytest
import torch

from modules.layers import TF_LN_EPS
from modules.resampler import AudioResampler, ResamplerConfig

D, Q, A = 64, 4, 9


def make(**kw) -> AudioResampler:
    return AudioResampler(ResamplerConfig(width=D, num_queries=Q, layers=2, **kw))


def test_shapes_and_defaults():
    cfg = ResamplerConfig()
    assert (cfg.width, cfg.num_queries, cfg.layers, cfg.heads) == (512, 12, 4, 8)
    out = make()(torch.randn(3, A, D))
    assert out.shape == (3, Q, D)
    assert torch.isfinite(out).all()


def test_block_parameter_names_follow_clip_plus_cross_attention():
    names = set(make().blocks[0].state_dict())
    for prefix in ("ln_1.", "attn.in_proj_weight", "attn.out_proj.", "ln_2.", "mlp.c_fc.", "mlp.c_proj.",
                   "ln_3.", "cross_attn.in_proj_weight"):
        assert any(n.startswith(prefix) for n in names), prefix


def test_init_orthogonal_queries_and_tf_layernorm_eps():
    model = make()
    q = model.queries.detach()
    torch.testing.assert_close(q @ q.T, torch.eye(Q), atol=1e-5, rtol=0)
    assert all(m.eps == TF_LN_EPS for m in model.modules() if isinstance(m, torch.nn.LayerNorm))
    assert model.query_position.std().item() == pytest.approx(0.02, rel=0.3)


def test_rows_are_independent_and_audio_matters():
    model = make()
    audio = torch.randn(4, A, D)
    full = model(audio)
    torch.testing.assert_close(model(audio[2:3]), full[2:3], atol=1e-5, rtol=1e-5)
    changed = audio.clone()
    changed[1] += torch.randn(A, D)
    out = model(changed)
    torch.testing.assert_close(out[0], full[0], atol=1e-5, rtol=1e-5)
    assert (out[1] - full[1]).abs().max() > 1e-4


def test_gradients_reach_queries_and_every_block():
    model = make()
    model(torch.randn(2, A, D)).square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_zero_audio_is_finite_and_wrong_width_is_named():
    model = make()
    assert torch.isfinite(model(torch.zeros(1, A, D))).all()
    with pytest.raises(ValueError, match=r"\(2, 9, 32\)"):
        model(torch.randn(2, A, 32))
