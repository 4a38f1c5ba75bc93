"""AVIGATE model API (docs/design.md §7, §11): encoders, pretrained init, training logits == score,
gradients, bad inputs. Tiny configs; audio enters as cached AST tokens except where noted."""
from dataclasses import replace

import pytest
import torch

from modules.clip import CLIP
from modules.fusion import GATE_ATT
from modules.modeling import AVIGATE, AVIGATEConfig, TextFeatures, VideoFeatures
from modules.objective import ContrastiveObjective, ObjectiveConfig
from modules.similarity import global_local_scores
from tests.fusion_weights import spread_fusion_weights

SOT, EOT = 49406, 49407
VARIANTS = {"agnostic": {}, "text_gate": dict(text_gate=True),
            "text_query": dict(text_query=True), "all_flags": dict(text_gate=True, text_query=True, query_gate=True)}


def make_model(**flags) -> AVIGATE:
    model = AVIGATE(AVIGATEConfig.tiny(**flags))
    spread_fusion_weights(model.fusion, text_scales=True)  # gates and text terms on: the fusion matters
    return model


def objective(model: AVIGATE, **fields) -> ContrastiveObjective:
    """The training objective around ``model`` (ObjectiveConfig fields as keywords)."""
    return ContrastiveObjective(model, ObjectiveConfig(**fields))


def texts(n, length=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(n, length, dtype=torch.long)
    mask = torch.zeros(n, length, dtype=torch.long)
    for i in range(n):
        words = 2 + i % 5
        ids[i, 0], ids[i, words + 1] = SOT, EOT
        ids[i, 1:words + 1] = torch.randint(1, 40000, (words,), generator=g)
        mask[i, :words + 2] = 1
    return ids, mask


def videos(model, n, seed=0):
    cfg = model.cfg
    g = torch.Generator().manual_seed(seed)
    res = cfg.clip.image_resolution
    frames = torch.randn(n, cfg.fusion.max_frames, 3, res, res, generator=g)
    mask = torch.ones(n, cfg.fusion.max_frames, dtype=torch.long)
    if n > 1:
        mask[1, 2:] = 0
    tokens = torch.randn(n, cfg.ast.num_output_tokens, cfg.ast.embed_dim, generator=g)
    return frames, mask, tokens


@pytest.mark.parametrize("name", list(VARIANTS))
def test_encoders_shapes_and_cacheable_features(name):
    model = make_model(**VARIANTS[name]).eval()
    ids, tmask = texts(3)
    frames, fmask, tokens = videos(model, 4)
    t = model.encode_text(ids, tmask)
    v = model.encode_video(frames, fmask, tokens)
    d, f = model.cfg.clip.embed_dim, model.cfg.fusion.max_frames
    assert t.text.shape == (3, d) and v.frames.shape == (4, f, d) and v.audio.shape == (4, 4, d)
    assert (v.frames[1, 2:] == 0).all() and v.frame_mask.dtype == torch.bool
    assert v.index is not None  # text-guided models: the agnostic view's index (stage 1)
    scores = model.score(t, v)
    parts = VideoFeatures.cat([v.select(slice(0, 1)), v.select(torch.tensor([1, 2, 3]))])
    torch.testing.assert_close(model.score(TextFeatures.cat([t.select(slice(0, 2)), t.select(slice(2, 3))]),
                                           parts.to("cpu").detach()), scores)
    half = model.score(t, v.to(dtype=torch.float16))
    assert half.dtype == torch.float32 and (half - scores).abs().max() < 0.5
    gates = model.score_with_gates(t, v).gates
    expect = (3, 4, 2) if model.text_guided else (4, 2)
    assert gates[GATE_ATT].shape == expect


def test_padded_frame_pixels_and_padding_tokens_do_not_matter():
    model = make_model(text_gate=True).eval()
    ids, tmask = texts(3)
    frames, fmask, tokens = videos(model, 3)
    scores = model.score(model.encode_text(ids, tmask), model.encode_video(frames, fmask, tokens))
    noisy = frames + 10 * torch.randn_like(frames) * (fmask == 0)[:, :, None, None, None]
    padded_ids = torch.cat([ids, torch.zeros(3, 6, dtype=torch.long)], 1)
    padded_mask = torch.cat([tmask, torch.zeros(3, 6, dtype=torch.long)], 1)
    again = model.score(model.encode_text(padded_ids, padded_mask), model.encode_video(noisy, fmask, tokens))
    torch.testing.assert_close(again, scores, atol=1e-5, rtol=1e-5)


def test_fbank_and_cached_tokens_give_the_same_features():
    model = make_model().eval()
    frames, fmask, _ = videos(model, 2)
    fbank = torch.randn(2, model.cfg.ast.target_frames, model.cfg.ast.num_mel_bins)
    a = model.encode_video(frames, fmask, fbank)
    b = model.encode_video(frames, fmask, model.ast.tokens(fbank))
    torch.testing.assert_close(a.index, b.index)
    with pytest.raises(ValueError, match="neither an fbank"):
        model.encode_video(frames, fmask, torch.randn(2, 7, 5))


@pytest.mark.parametrize("name", list(VARIANTS))
def test_training_logits_equal_score(name):
    model = make_model(**VARIANTS[name])
    ids, tmask = texts(4)
    frames, fmask, tokens = videos(model, 4)
    out = objective(model)(ids, tmask, frames, fmask, tokens)
    model.eval()
    scores = model.score(model.encode_text(ids, tmask), model.encode_video(frames, fmask, tokens))
    err = (out.logits.detach() - scores).abs().max().item()
    print(f"{name}: max |training logits - score| = {err:.2e}")
    assert err <= 1e-5
    assert torch.isfinite(out.loss) and set(out.gate_stats) >= {GATE_ATT}


def test_hardest_k_keeps_positive_and_k_hardest_negatives():
    model = AVIGATE(AVIGATEConfig.tiny(text_gate=True))
    ids, tmask = texts(5)
    frames, fmask, tokens = videos(model, 5)
    out = objective(model, training_pairs="hardest_k", hardest_k=2)(ids, tmask, frames, fmask, tokens)
    logits = out.logits.detach()
    kept = torch.isfinite(logits)
    assert (kept.sum(1) == 3).all() and kept.diagonal().all()
    model.eval()
    v = model.encode_video(frames, fmask, tokens)
    scores = model.score(model.encode_text(ids, tmask), v)
    torch.testing.assert_close(logits[kept], scores[kept], atol=1e-5, rtol=1e-5)
    v0 = model.fusion.embed_frames(v.frames)
    cheap = global_local_scores(model.encode_text(ids, tmask).text, v0, v.frame_mask, model.logit_scale, 1.0)
    cheap.fill_diagonal_(float("-inf"))
    for i in range(5):  # the kept negatives are the two best text-agnostic ones
        assert set(torch.nonzero(kept[i]).flatten().tolist()) == {i, *cheap[i].topk(2).indices.tolist()}
    out.loss.backward()


def test_own_caption_diagnostic_fuses_each_video_with_its_caption():
    model = AVIGATE(AVIGATEConfig.tiny(text_query=True, text_init="normal"))
    ids, tmask = texts(4)
    frames, fmask, tokens = videos(model, 4)
    logits = objective(model, training_pairs="own_caption")(ids, tmask, frames, fmask, tokens).logits.detach()
    model.eval()
    t = model.encode_text(ids, tmask)
    v = model.encode_video(frames, fmask, tokens)
    fused = model.fusion(v.frames, v.frame_mask, v.audio, t.text).fused  # video j under caption j
    expect = global_local_scores(t.text, fused, v.frame_mask, model.logit_scale, 1.0)
    torch.testing.assert_close(logits, expect, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits.diagonal(), model.score(t, v).diagonal(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("flags", [{}, dict(text_gate=True, text_query=True, query_gate=True)])
def test_gradients_reach_trainable_parts_not_the_ast_trunk(flags):
    model = make_model(**flags)
    ids, tmask = texts(3)
    frames, fmask, tokens = videos(model, 3)
    objective(model)(ids, tmask, frames, fmask, tokens).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    for name in ("resampler.queries", "resampler.blocks.0.cross_attn.in_proj_weight",
                 "fusion.blocks.0.gates.att.fc1.weight", "fusion.blocks.1.gates.ff.fc2.weight",
                 "fusion.blocks.1.mlp_c.c_fc.weight", "fusion.frame_position", "audio_projection.weight",
                 "ast.norm.weight", "clip.token_embedding.weight", "clip.transformer.resblocks.0.attn.in_proj_weight",
                 "clip.visual.conv1.weight", "clip.logit_scale"):
        assert grads[name] is not None and grads[name].abs().sum() > 0, name
    if flags:
        assert grads["fusion.blocks.0.gates.q.fc1.weight"].abs().sum() > 0
    trunk = [n for n, p in model.ast.named_parameters() if not n.startswith("norm.")]
    assert trunk and all(grads["ast." + n] is None for n in trunk)


def test_gradient_checkpointing_changes_nothing():
    a = make_model(**VARIANTS["all_flags"])
    b = AVIGATE(a.cfg)
    b.load_state_dict(a.state_dict())
    b.set_grad_checkpointing(True)
    ids, tmask = texts(3)
    frames, fmask, tokens = videos(a, 3)
    la = objective(a)(ids, tmask, frames, fmask, tokens).loss
    lb = objective(b, pairs_per_chunk=2)(ids, tmask, frames, fmask, tokens).loss  # 5 recomputed chunks
    la.backward()
    lb.backward()
    torch.testing.assert_close(la, lb)
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        if pa.grad is not None:
            # fp32 sums over 5 chunks instead of one: rounding grows with the gradient's scale
            scale = max(1.0, float(pa.grad.abs().max()))
            torch.testing.assert_close(pa.grad, pb.grad, atol=1e-6 * scale, rtol=1e-4, msg=n)


@pytest.mark.parametrize("name", ["agnostic", "all_flags"])
def test_bad_inputs_stay_finite(name):
    model = make_model(**VARIANTS[name])
    ids, tmask = texts(3)
    frames, fmask, tokens = videos(model, 3)
    fmask[0] = 0  # no valid frame at all
    tokens[2] = 0  # all-zero audio (tokens)
    out = objective(model)(ids, tmask, frames, fmask, tokens)
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(out.logits).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    one = objective(model)(ids[:1], tmask[:1], frames[1:2], fmask[1:2], tokens[1:2])  # batch of one
    assert torch.isfinite(one.loss)
    model.eval()
    silent = model.encode_video(frames[:1], fmask[:1],
                                torch.zeros(1, model.cfg.ast.target_frames, model.cfg.ast.num_mel_bins))
    assert torch.isfinite(model.score(model.encode_text(ids, tmask), silent)).all()


def test_texts_longer_than_the_context_are_truncated_keeping_the_end_token():
    model = make_model().eval()
    context = model.cfg.clip.context_length
    ids = torch.randint(1, 40000, (2, context + 8))
    ids[:, 0] = SOT
    ids[0, -1] = EOT
    ids[1, 5], ids[1, 6:] = EOT, 0
    mask = (ids > 0).long()
    t = model.encode_text(ids, mask).text
    assert torch.isfinite(t).all()
    truncated = torch.cat([ids[:1, :context - 1], ids[:1, -1:]], 1)
    torch.testing.assert_close(t[:1], model.clip.encode_text(truncated))
    torch.testing.assert_close(t[1:], model.clip.encode_text(ids[1:, :7]))


def test_mismatched_feature_shapes_name_both():
    model = make_model(text_gate=True).eval()
    frames, fmask, tokens = videos(model, 2)
    v = model.encode_video(frames, fmask, tokens)
    with pytest.raises(ValueError, match=r"\(3, 32\).*\(2, 4, 64\)"):
        model.score(TextFeatures(torch.randn(3, 32)), v)
    with pytest.raises(ValueError, match=r"frame_mask \(2, 3\).*frames \(2, 4, 64\)"):
        VideoFeatures(v.frames, v.frame_mask[:, :3], v.audio)


def test_visual_only_model_has_no_audio_path():
    model = AVIGATE(AVIGATEConfig.tiny(use_audio=False))
    assert model.ast is None and model.resampler is None
    ids, tmask = texts(2)
    frames, fmask, _ = videos(model, 2)
    out = objective(model)(ids, tmask, frames, fmask, None)
    out.loss.backward()
    model.eval()
    v = model.encode_video(frames, fmask)
    torch.testing.assert_close(model.score(model.encode_text(ids, tmask), v), out.logits.detach())


def test_from_pretrained_copies_clip_text_layers_and_inits_new_parts():
    cfg = AVIGATEConfig.tiny()
    clip_sd = {k: v + 0.01 * torch.randn_like(v) for k, v in CLIP(cfg.clip).state_dict().items()}
    model = AVIGATE.from_pretrained(cfg, clip_sd)
    for owner in (model.resampler, model.fusion):
        for layer, block in enumerate(owner.blocks):
            for key, value in block.state_dict().items():
                if key.startswith(("ln_1.", "attn.", "ln_2.", "mlp.")):
                    torch.testing.assert_close(value, clip_sd[f"transformer.resblocks.{layer}.{key}"])
    torch.testing.assert_close(model.fusion.frame_position, clip_sd["positional_embedding"][:4])
    torch.testing.assert_close(model.clip.text_projection, clip_sd["text_projection"])
    block = model.fusion.blocks[0]
    assert block.cross_attn.out_proj.weight.std().item() == pytest.approx(0.02, rel=0.2)
    assert (block.cross_attn.out_proj.bias == 0).all() and (block.ln_4.weight == 1).all()
    assert block.gates[GATE_ATT].fc1.weight.std().item() == pytest.approx(0.02, rel=0.2)
    with pytest.raises(ValueError, match="fit AVIGATEConfig.clip"):
        AVIGATE.from_pretrained(cfg, {k: v for k, v in clip_sd.items() if k != "text_projection"})


def test_width_and_depth_mismatches_are_clear_errors():
    tiny = AVIGATEConfig.tiny()
    with pytest.raises(ValueError, match="joint width"):
        replace(tiny, fusion=replace(tiny.fusion, width=128))
    wide_text = replace(tiny, clip=replace(tiny.clip, transformer_width=128, transformer_heads=2))
    with pytest.raises(ValueError, match="text width 128"):
        AVIGATE.from_pretrained(wide_text, CLIP(wide_text.clip).state_dict())
    deep = replace(tiny, fusion=replace(tiny.fusion, layers=3))
    with pytest.raises(ValueError, match="fusion has 3 layers"):
        AVIGATE.from_pretrained(deep, CLIP(deep.clip).state_dict())


@pytest.mark.parametrize("flags", [dict(text_gate=True), dict(text_query=True), dict(query_gate=True),
                                   dict(text_gate=True, text_query=True, query_gate=True), {}])
@pytest.mark.parametrize("training_pairs", ["all", "hardest_k"])
def test_every_trainable_parameter_takes_part_in_the_loss(flags, training_pairs):
    """DDP (without unused-parameter search) needs every trainable parameter in the graph of
    every step: none may be left without a gradient, in any variant and pair selection."""
    from modules.optimization import freeze_parameters
    model = AVIGATE(AVIGATEConfig.tiny(**flags))  # the residual (zero) start
    freeze_parameters(model, freeze_layer_num=0)
    ids, tmask = texts(3)
    frames, fmask, tokens = videos(model, 3)
    objective(model, training_pairs=training_pairs, hardest_k=1)(ids, tmask, frames, fmask, tokens).loss.backward()
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not unused, unused
