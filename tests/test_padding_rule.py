"""The released code's padded-frame rule (--padding_rule released, docs/design.md §3) and the logit
scale's clamp after optimizer steps (docs/design.md §5): the two numeric differences from the released
AVIGATE code that issue 11 makes selectable / identical."""
import math

import pytest
import torch

from modules.fusion import GATE_ATT, FusionConfig, FusionTransformer
from modules.modeling import AVIGATE, AVIGATEConfig
from modules.objective import ContrastiveObjective, ObjectiveConfig
from modules.optimization import OptimConfig, build_optimizer
from modules.similarity import MAX_LOG_LOGIT_SCALE
from tests.fusion_weights import spread_fusion_weights

D, F, Q = 64, 3, 4


def fusion(rule: str, **flags) -> FusionTransformer:
    torch.manual_seed(0)
    model = FusionTransformer(FusionConfig(width=D, layers=2, max_frames=F, fusion_residual=0.5,
                                           padding_rule=rule, **flags))
    spread_fusion_weights(model)
    return model


def inputs():
    g = torch.Generator().manual_seed(1)
    frames, audio = torch.randn(2, F, D, generator=g), torch.randn(2, Q, D, generator=g)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    return frames, mask, audio


def test_released_rule_feeds_the_gate_the_mean_over_all_frames():
    """Hand-computed layer-0 gate input: [mean over all F slots of v0 ; mean_q audio]."""
    frames, mask, audio = inputs()
    seen = {}
    for rule in ("released", "masked"):
        model = fusion(rule)
        handle = model.blocks[0].gates[GATE_ATT].register_forward_pre_hook(
            lambda module, args, rule=rule: seen.__setitem__(rule, args[0].detach().clone()))
        model(frames, mask, audio)
        handle.remove()
    v0 = frames + fusion("released").frame_position[:F].detach()
    all_frames = torch.cat([v0.mean(1), audio.mean(1)], dim=-1)
    real_frames = torch.cat([v0[0, :2].mean(0, keepdim=True), v0[1:].mean(1)], dim=0)
    torch.testing.assert_close(seen["released"], all_frames)
    torch.testing.assert_close(seen["masked"][:, :D], real_frames)
    assert (seen["released"][0, :D] - seen["masked"][0, :D]).abs().max() > 1e-3  # video 0 has a padded slot


def test_released_rule_lets_padded_frames_serve_as_keys():
    """Released == the masked computation with every slot marked real (means and keys)."""
    frames, mask, audio = inputs()
    released, masked = fusion("released"), fusion("masked")
    out = released(frames, mask, audio).fused
    torch.testing.assert_close(out, masked(frames, torch.ones_like(mask), audio).fused, atol=0, rtol=0)
    real = masked(frames, mask, audio).fused
    assert (out[0, :2] - real[0, :2]).abs().max() > 1e-3  # padded keys change the real frames
    torch.testing.assert_close(out[1], real[1], atol=1e-6, rtol=0)  # no padding: no difference


@pytest.mark.parametrize("flags", [dict(text_gate=True, text_query=True, query_gate=True), dict(text_query=True)])
def test_released_rule_fast_paths_equal_its_reference(flags):
    frames, mask, audio = inputs()
    text = torch.randn(3, D)
    model = fusion("released", **flags)
    vctx, tctx = model.prepare_videos(frames, mask, audio), model.prepare_texts(text)
    ti, vi = torch.arange(3).repeat(2), torch.arange(2).repeat_interleave(3)
    ref = model(frames[vi], mask[vi], audio[vi], text[ti]).fused
    torch.testing.assert_close(model.fuse_grid(vctx, tctx, torch.arange(3), torch.arange(2)).fused, ref,
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.fuse_pairs(vctx, tctx, ti, vi).fused, ref, atol=1e-5, rtol=1e-5)


def test_released_rule_fills_padded_slots_with_the_blank_frame_embedding():
    torch.manual_seed(0)
    released = AVIGATE(AVIGATEConfig.tiny(padding_rule="released")).eval()
    masked = AVIGATE(AVIGATEConfig.tiny()).eval()
    masked.load_state_dict(released.state_dict())
    res = released.cfg.clip.image_resolution
    frames = torch.randn(2, 4, 3, res, res)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    with torch.no_grad():
        emb = released.frame_embeddings(frames, mask)
        blank = released.clip.encode_image(torch.zeros(1, 3, res, res))[0]
        torch.testing.assert_close(emb[0, 2], blank)
        torch.testing.assert_close(emb[0, 3], blank)
        torch.testing.assert_close(emb[mask.bool()], masked.frame_embeddings(frames, mask)[mask.bool()],
                                   atol=1e-5, rtol=1e-5)
        assert (masked.frame_embeddings(frames, mask)[0, 2:] == 0).all()
        # Whatever the padded slots' pixels were, the released rule embeds a blank frame there.
        noisy = frames.clone()
        noisy[0, 2:] = 100.0
        torch.testing.assert_close(released.frame_embeddings(noisy, mask), emb)


def test_logit_scale_moves_under_training_and_never_exceeds_the_cap():
    torch.manual_seed(0)
    model = AVIGATE(AVIGATEConfig.tiny())
    with torch.no_grad():
        model.logit_scale.fill_(MAX_LOG_LOGIT_SCALE - 0.05)
    optimizer = build_optimizer(model, OptimConfig(lr=0.5, coef_lr=1.0, max_grad_norm=0.0, weight_decay=0.0))
    objective = ContrastiveObjective(model, ObjectiveConfig())
    cfg = model.cfg
    ids = torch.randint(1, 40000, (4, 6))
    ids[:, 0], ids[:, 5] = 49406, 49407
    res = cfg.clip.image_resolution
    frames, tokens = torch.randn(4, 4, 3, res, res), torch.randn(4, cfg.ast.num_output_tokens, cfg.ast.embed_dim)
    values = [model.logit_scale.item()]
    for _ in range(6):
        objective(ids, torch.ones_like(ids), frames, torch.ones(4, 4), tokens).loss.backward()
        assert model.logit_scale.grad is not None and model.logit_scale.grad.abs() > 0
        optimizer.step()
        optimizer.zero_grad()
        model.clamp_logit_scale_()
        values.append(model.logit_scale.item())
    assert max(values) <= MAX_LOG_LOGIT_SCALE + 1e-7 and math.isclose(MAX_LOG_LOGIT_SCALE, math.log(100))
    assert len(set(values)) > 1  # it moved
