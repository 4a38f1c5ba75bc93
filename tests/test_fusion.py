"""Gated fusion transformer (docs/design.md §3, §4): gates, masks, ablations, fast pair path == reference."""
import itertools
from dataclasses import replace

import pytest
import torch

from modules.fusion import GATE_ATT, GATE_FF, GATE_Q, FusionConfig, FusionTransformer
from modules.layers import ResidualAttentionBlock
from tests.fusion_weights import spread_fusion_weights

D, F, Q, L = 64, 5, 4, 2
TEXT_FLAGS = list(itertools.product([False, True], repeat=3))


def make(**kw) -> FusionTransformer:
    """A fusion whose gates are far from zero and whose text terms are on (the §7 / §4a init
    leaves gates near 0 and text terms at 0)."""
    kw.setdefault("fusion_residual", 0.5)
    model = FusionTransformer(FusionConfig(width=D, layers=L, max_frames=F, **kw))
    spread_fusion_weights(model, text_scales=True)
    return model


def inputs(nv=4, nt=3):
    frames, audio, text = torch.randn(nv, F, D), torch.randn(nv, Q, D), torch.randn(nt, D)
    mask = torch.ones(nv, F, dtype=torch.bool)
    mask[1, 3:] = False
    mask[-1] = False  # a video without any valid frame
    return frames, mask, audio, text


def all_pairs(nt, nv):
    return torch.arange(nt).repeat_interleave(nv), torch.arange(nv).repeat(nt)


def test_config_validation_and_flags():
    assert not FusionConfig().text_guided
    assert FusionConfig(query_gate=True).text_guided and FusionConfig(query_gate=True).injects_text
    with pytest.raises(ValueError, match="--gate"):
        FusionConfig(gate="sigmoid")
    with pytest.raises(ValueError, match="--no_audio"):
        FusionConfig(use_audio=False, text_gate=True)
    with pytest.raises(ValueError, match="--gate none"):
        FusionConfig(gate="none", query_gate=True)


def test_shapes_and_named_gates():
    frames, mask, audio, text = inputs()
    out = make()(frames, mask, audio)
    assert out.fused.shape == (4, F, D) and set(out.gates) == {GATE_ATT, GATE_FF}
    assert all(g.shape == (4, L) for g in out.gates.values())
    out = make(text_query=True, query_gate=True)(frames, mask, audio, text[:1].expand(4, -1))
    assert set(out.gates) == {GATE_ATT, GATE_FF, GATE_Q}
    assert make(gate="none")(frames, mask, audio).gates == {}
    assert torch.isfinite(out.fused).all()
    with pytest.raises(ValueError, match="text-guided"):
        make(text_gate=True)(frames, mask, audio)


def test_visual_only_is_v0_without_blocks():
    frames, mask, audio, _ = inputs()
    model = make(use_audio=False)
    assert len(model.blocks) == 0
    torch.testing.assert_close(model(frames, mask, audio).fused, frames + model.frame_position[:F])


@pytest.mark.parametrize("flags", [{}, dict(text_gate=True, text_query=True, query_gate=True)])
def test_padded_frames_do_not_change_real_frames(flags):
    frames, mask, audio, text = inputs()
    model = make(**flags)
    text = text[:1].expand(4, -1)
    out = model(frames, mask, audio, text).fused
    noisy = frames + 100 * torch.randn_like(frames) * (~mask).unsqueeze(-1)
    out2 = model(noisy, mask, audio, text).fused
    torch.testing.assert_close(out2[mask], out[mask], atol=1e-5, rtol=1e-5)


def test_gate_none_equals_gates_forced_open():
    """gate="none" (gates fixed at 1) == hard gates with a threshold every tanh value passes."""
    frames, mask, audio, _ = inputs()
    always_open = make(gate="hard", hard_gate_threshold=-1.5)
    ungated = make(gate="none")
    weights = {k: v for k, v in always_open.state_dict().items() if ".gates." not in k}
    ungated.load_state_dict(weights, strict=True)
    out = always_open(frames, mask, audio)
    assert all((g == 1).all() for g in out.gates.values())
    torch.testing.assert_close(ungated(frames, mask, audio).fused, out.fused, atol=0, rtol=0)


def test_hard_gates_are_binary_with_straight_through_gradient():
    frames, mask, audio, _ = inputs()
    model = make(gate="hard")
    out = model(frames, mask, audio)
    values = torch.cat([g.flatten() for g in out.gates.values()])
    assert set(values.tolist()) <= {0.0, 1.0}
    out.fused.square().mean().backward()
    assert model.blocks[0].gates[GATE_ATT].fc1.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("flags", [{}, dict(text_query=True)])
def test_zero_gates_give_the_visual_self_attention_path(flags):
    """Zero att/ff gates remove every audio (and injected-text) path: x_L is then CLIP-style
    self-attention blocks over v0, so V = r * SelfBlocks(v0) + (1 - r) * v0. That is NOT the
    visual-only baseline V = v0 (--no_audio) unless r = 0."""
    frames, mask, audio, text = inputs()
    model = make(**flags)
    with torch.no_grad():
        for block in model.blocks:
            block.gates[GATE_ATT].fc2.weight.zero_()
            block.gates[GATE_FF].fc2.weight.zero_()
    text = text[:1].expand(4, -1)
    out = model(frames, mask, audio, text)
    other = model(frames, mask, torch.randn_like(audio) * 5, -text)
    torch.testing.assert_close(other.fused, out.fused, atol=0, rtol=0)
    v0 = frames + model.frame_position[:F]
    x = v0
    for block in model.blocks:
        x = ResidualAttentionBlock.forward(block, x, key_valid=mask)
    r = model.cfg.fusion_residual
    torch.testing.assert_close(out.fused, r * x + (1 - r) * v0, atol=1e-6, rtol=1e-6)
    assert (out.fused - v0)[mask].abs().max() > 1e-3


@pytest.mark.parametrize("text_gate,text_query,query_gate", TEXT_FLAGS)
@pytest.mark.parametrize("gate", ["soft", "hard"])
def test_fast_pair_path_equals_reference(text_gate, text_query, query_gate, gate):
    frames, mask, audio, text = inputs(nv=5, nt=4)
    model = make(gate=gate, text_gate=text_gate, text_query=text_query, query_gate=query_gate)
    if not model.text_guided:
        with pytest.raises(ValueError, match="text-agnostic"):
            model.fuse_pairs(None, None, None, None)
        return
    ti, vi = all_pairs(4, 5)
    perm = torch.randperm(ti.shape[0])  # arbitrary pair order
    ti, vi = ti[perm], vi[perm]
    fast = model.fuse_pairs(model.prepare_videos(frames, mask, audio), model.prepare_texts(text), ti, vi)
    ref = model.fuse_reference(frames[vi], mask[vi], audio[vi], text[ti])
    err = (fast.fused - ref.fused).abs().max().item()
    gate_err = max((fast.gates[k] - ref.gates[k]).abs().max().item() for k in ref.gates)
    print(f"gate={gate} text_gate={text_gate} text_query={text_query} query_gate={query_gate}: "
          f"max |fast - reference| fused {err:.2e}, gates {gate_err:.2e}")
    assert set(fast.gates) == set(ref.gates)
    assert err <= 1e-5 and gate_err <= 1e-5


def test_text_guidance_reaches_the_fused_video():
    frames, mask, audio, text = inputs(nv=2, nt=3)
    for flags in (dict(text_gate=True), dict(text_query=True), dict(query_gate=True)):
        model = make(**flags)
        ti, vi = all_pairs(3, 2)
        out = model.fuse_pairs(model.prepare_videos(frames, mask, audio), model.prepare_texts(text), ti, vi)
        fused = out.fused.view(3, 2, F, D)
        assert (fused[0, 0] - fused[1, 0]).abs().max() > 1e-4, flags
        # Layer-0 gates see the text only through text_gate (later layers see it through x).
        layer0 = out.gates[GATE_ATT].view(3, 2, L)[:, :, 0]
        assert ((layer0[0] - layer0[1]).abs().max() > 0) == flags.get("text_gate", False), flags


def test_agnostic_fusion_ignores_text_and_rows_are_independent():
    frames, mask, audio, text = inputs()
    model = make()
    out = model(frames, mask, audio)
    torch.testing.assert_close(model(frames, mask, audio, text[:1].expand(4, -1)).fused, out.fused)
    torch.testing.assert_close(model(frames[1:3], mask[1:3], audio[1:3]).fused, out.fused[1:3],
                               atol=1e-5, rtol=1e-5)


def test_too_many_frames_is_an_error():
    model = make()
    with pytest.raises(ValueError, match="--max_frames"):
        model(torch.randn(1, F + 1, D), torch.ones(1, F + 1), torch.randn(1, Q, D))


def test_query_gate_alone_equals_text_query_plus_query_gate():
    frames, mask, audio, text = inputs()
    a = make(query_gate=True)
    b = FusionTransformer(replace(a.cfg, text_query=True))
    b.load_state_dict(a.state_dict())
    text = text[:1].expand(4, -1)
    torch.testing.assert_close(a(frames, mask, audio, text).fused, b(frames, mask, audio, text).fused)


@pytest.mark.parametrize("text_gate,text_query,query_gate", [f for f in TEXT_FLAGS if any(f)])
@pytest.mark.parametrize("gate", ["soft", "hard"])
def test_grid_path_equals_reference(text_gate, text_query, query_gate, gate):
    """fuse_grid (audio keys per video, pairs video-major) == the plain path for every pair."""
    frames, mask, audio, text = inputs(nv=5, nt=4)
    model = make(gate=gate, text_gate=text_gate, text_query=text_query, query_gate=query_gate)
    texts, videos = torch.tensor([3, 0, 2]), torch.tensor([4, 1, 0, 2])
    out = model.fuse_grid(model.prepare_videos(frames, mask, audio), model.prepare_texts(text), texts, videos)
    vi, ti = videos.repeat_interleave(3), texts.repeat(4)  # video-major
    ref = model.fuse_reference(frames[vi], mask[vi], audio[vi], text[ti])
    torch.testing.assert_close(out.fused, ref.fused, atol=1e-5, rtol=1e-5)
    for name in ref.gates:
        torch.testing.assert_close(out.gates[name], ref.gates[name], atol=1e-5, rtol=1e-5)


def _agnostic_twin(model: FusionTransformer) -> FusionTransformer:
    """The text-agnostic fusion with ``model``'s weights minus its text terms."""
    cfg = replace(model.cfg, text_gate=False, text_query=False, query_gate=False)
    twin = FusionTransformer(cfg)
    text_terms = set(model.text_term_names())
    twin.load_state_dict({k: v for k, v in model.state_dict().items() if k not in text_terms}, strict=True)
    return twin


@pytest.mark.parametrize("text_gate,text_query,query_gate", [f for f in TEXT_FLAGS if any(f)])
def test_residual_start_equals_the_agnostic_fusion(text_gate, text_query, query_gate):
    """docs/design.md §4a: with text_init "zero" every text term starts at 0, so every pair's fused video
    equals the text-agnostic fusion with the same other weights (exactly: the text terms add 0)."""
    frames, mask, audio, text = inputs(nv=4, nt=3)
    model = FusionTransformer(FusionConfig(width=D, layers=L, max_frames=F, fusion_residual=0.5,
                                           text_gate=text_gate, text_query=text_query, query_gate=query_gate))
    with torch.no_grad():  # make the agnostic gates non-trivial; text terms stay at their zero init
        for layer, block in enumerate(model.blocks):
            for gate in block.gates.values():
                gate.fc1.weight.normal_(std=0.3)
    twin = _agnostic_twin(model)
    ti, vi = all_pairs(3, 4)
    pairs = model.fuse_pairs(model.prepare_videos(frames, mask, audio), model.prepare_texts(text), ti, vi)
    plain = model(frames[vi], mask[vi], audio[vi], text[ti])
    agnostic = twin(frames, mask, audio)
    torch.testing.assert_close(plain.fused, agnostic.fused[vi], atol=0, rtol=0)
    torch.testing.assert_close(pairs.fused, agnostic.fused[vi], atol=1e-6, rtol=1e-6)
    for name in (GATE_ATT, GATE_FF):
        torch.testing.assert_close(plain.gates[name], agnostic.gates[name][vi], atol=0, rtol=0)
    if query_gate:
        assert (plain.gates[GATE_Q] == 0).all()


@pytest.mark.parametrize("text_gate,text_query,query_gate", [f for f in TEXT_FLAGS if any(f)])
def test_text_terms_start_at_zero_but_receive_gradients(text_gate, text_query, query_gate):
    """The zero-started terms move: the gates' text columns, the query gate's output layer and
    the injection scale get gradients at step 0; the query gate's text columns sit behind its
    zero output layer, so they get theirs once that layer has moved (after one step)."""
    frames, mask, audio, text = inputs(nv=4, nt=4)
    model = FusionTransformer(FusionConfig(width=D, layers=L, max_frames=F, fusion_residual=0.5,
                                           text_gate=text_gate, text_query=text_query, query_gate=query_gate))
    params = dict(model.named_parameters())
    zero = [n for n in model.text_term_names() if params[n].abs().sum() == 0]
    assert zero
    behind_q_output = [n for n in zero if ".gates.q.fc1" in n]
    mask = torch.ones_like(mask)

    def backward():
        model.zero_grad()
        model(frames, mask, audio, text).fused.square().mean().backward()

    backward()
    for name in set(zero) - set(behind_q_output):
        assert params[name].grad is not None and params[name].grad.abs().sum() > 0, name
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= 0.1 * p.grad
    backward()
    for name in behind_q_output:
        assert params[name].grad.abs().sum() > 0, name


def test_agnostic_view_equals_the_agnostic_twin_after_training_moved_the_text_terms():
    frames, mask, audio, _ = inputs()
    model = make(text_gate=True, text_query=True, query_gate=True)
    torch.testing.assert_close(model.agnostic(frames, mask, audio).fused, _agnostic_twin(model)(frames, mask, audio).fused,
                               atol=0, rtol=0)


def test_normal_text_init_is_the_earlier_random_start():
    model = FusionTransformer(FusionConfig(width=D, layers=L, max_frames=F, text_gate=True, text_query=True,
                                           text_init="normal"))
    assert all(b.gates[GATE_ATT].fc1_text.weight.abs().sum() > 0 for b in model.blocks)
    assert all(b.text_scale.item() == 1.0 for b in model.blocks)
    with pytest.raises(ValueError, match="--text_init"):
        FusionConfig(text_init="ones")
