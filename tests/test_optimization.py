"""BertAdam, the warmup-cosine schedule and the parameter groups of docs/design.md §7."""
import math

import pytest
import torch
from torch import nn

from modules.modeling import AVIGATE, AVIGATEConfig

from modules.optimization import (BertAdam, GroupClippedAdamW, OptimConfig, WarmupCosine,
                                  build_optimizer, build_scheduler, parameter_groups,
                                  parameter_role)


def test_bertadam_hand_worked_step():
    # p = [1, -2], g = [0.3, 0.4] (norm 0.5 < clip 1), lr 0.1, wd 0.2, betas (0.9, 0.98), eps 1e-6.
    # m = 0.1 g, v = 0.02 g^2, m / sqrt(v) = 0.1 / sqrt(0.02) * sign(g) = 0.70710... (no bias correction)
    # p' = p - 0.1 * (0.7071 * sign(g) + 0.2 * p)
    p = nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    opt = BertAdam([p], lr=0.1, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.2, max_grad_norm=1.0)
    p.grad = torch.tensor([0.3, 0.4], dtype=torch.float64)
    opt.step()
    ratio = 0.1 * 0.3 / (math.sqrt(0.02 * 0.09) + 1e-6)
    ratio2 = 0.1 * 0.4 / (math.sqrt(0.02 * 0.16) + 1e-6)
    expected = torch.tensor([1.0 - 0.1 * (ratio + 0.2 * 1.0), -2.0 - 0.1 * (ratio2 + 0.2 * -2.0)],
                            dtype=torch.float64)
    torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-12)


def test_bertadam_clips_each_group_separately():
    # Group a's gradient (norm 5) is clipped to norm 1; group b's (norm 0.5) is untouched.
    a = nn.Parameter(torch.zeros(2, dtype=torch.float64))
    b = nn.Parameter(torch.zeros(2, dtype=torch.float64))
    opt = BertAdam([{"params": [a]}, {"params": [b]}], lr=1.0, betas=(0.0, 0.0), eps=0.0,
                   max_grad_norm=1.0)
    a.grad = torch.tensor([3.0, 4.0], dtype=torch.float64)
    b.grad = torch.tensor([0.3, 0.4], dtype=torch.float64)
    opt.step()
    # With betas 0 the first moment is the (clipped) gradient: check it was stored clipped.
    torch.testing.assert_close(opt.state[a]["exp_avg"], torch.tensor([0.6, 0.8], dtype=torch.float64))
    torch.testing.assert_close(opt.state[b]["exp_avg"], torch.tensor([0.3, 0.4], dtype=torch.float64))


def test_global_clip_scope_clips_all_groups_together():
    """--grad_clip_scope global (the released loop): the joint norm 5.0249 is clipped to 1, so
    both groups shrink by the same factor."""
    a = nn.Parameter(torch.zeros(2, dtype=torch.float64))
    b = nn.Parameter(torch.zeros(2, dtype=torch.float64))
    opt = BertAdam([{"params": [a], "clip_scope": "global"}, {"params": [b], "clip_scope": "global"}],
                   lr=1.0, betas=(0.0, 0.0), eps=0.0, max_grad_norm=1.0)
    a.grad = torch.tensor([3.0, 4.0], dtype=torch.float64)
    b.grad = torch.tensor([0.3, 0.4], dtype=torch.float64)
    opt.step()
    factor = 1.0 / math.sqrt(25 + 0.25)
    torch.testing.assert_close(opt.state[a]["exp_avg"], factor * torch.tensor([3.0, 4.0], dtype=torch.float64))
    torch.testing.assert_close(opt.state[b]["exp_avg"], factor * torch.tensor([0.3, 0.4], dtype=torch.float64))


def test_released_decay_rule_decays_every_tensor_without_bias_in_its_name():
    model = _FakeModel()
    groups = {g["name"]: g for g in build_optimizer(model, OptimConfig(decay_rule="released")).param_groups}
    assert "clip.logit_scale" in groups["clip/decay"]["param_names"]
    assert "ast.norm.weight" in groups["new/decay"]["param_names"]
    assert "ast.norm.bias" in groups["new/no_decay"]["param_names"]
    with pytest.raises(ValueError, match="--weight_decay_rule"):
        OptimConfig(decay_rule="all")


def test_warmup_cosine_values():
    f = WarmupCosine(total_steps=100, warmup=0.1)
    assert f(0) == 0.0
    assert f(5) == pytest.approx(0.5)
    assert f(10) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.1)))
    assert f(50) == pytest.approx(0.5)
    assert f(100) == pytest.approx(0.0, abs=1e-12)


def test_scheduler_drives_group_lrs_and_roundtrips():
    p = nn.Parameter(torch.zeros(2))
    opt = BertAdam([{"params": [p], "lr": 2.0}])
    sched = build_scheduler(opt, total_steps=20, warmup_proportion=0.1)
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.0, 1.0, 2.0 * 0.5 * (1 + math.cos(math.pi * 0.1)),
                                 2.0 * 0.5 * (1 + math.cos(math.pi * 0.15))])
    restored = build_scheduler(BertAdam([{"params": [p], "lr": 2.0}]), total_steps=20,
                               warmup_proportion=0.1)
    restored.load_state_dict(sched.state_dict())
    assert restored.last_epoch == 4
    assert restored.lr_lambdas[0].total_steps == 20


class _FakeCLIP(nn.Module):
    """Parameter names of OpenAI CLIP, two resblocks per tower."""

    def __init__(self, d=4):
        super().__init__()
        self.token_embedding = nn.Embedding(10, d)
        self.positional_embedding = nn.Parameter(torch.zeros(5, d))
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.ModuleList([nn.Linear(d, d) for _ in range(2)])
        self.ln_final = nn.LayerNorm(d)
        self.text_projection = nn.Parameter(torch.zeros(d, d))
        self.logit_scale = nn.Parameter(torch.zeros(()))
        self.visual = nn.Module()
        self.visual.conv1 = nn.Conv2d(3, d, 2, bias=False)
        self.visual.class_embedding = nn.Parameter(torch.zeros(d))
        self.visual.positional_embedding = nn.Parameter(torch.zeros(5, d))
        self.visual.ln_pre = nn.LayerNorm(d)
        self.visual.transformer = nn.Module()
        self.visual.transformer.resblocks = nn.ModuleList([nn.Linear(d, d) for _ in range(2)])
        self.visual.ln_post = nn.LayerNorm(d)
        self.visual.proj = nn.Parameter(torch.zeros(d, d))


class _FakeModel(nn.Module):
    def __init__(self, d=4):
        super().__init__()
        self.clip = _FakeCLIP(d)
        self.ast = nn.Module()
        self.ast.blocks = nn.ModuleList([nn.Linear(d, d)])
        self.ast.norm = nn.LayerNorm(d)
        self.audio_projection = nn.Linear(d, d, bias=False)
        self.resampler = nn.Module()
        self.resampler.queries = nn.Parameter(torch.zeros(3, d))
        self.resampler.ln = nn.LayerNorm(d)


def test_parameter_roles():
    assert parameter_role("ast.blocks.0.weight", 0) == "frozen"
    assert parameter_role("ast.norm.weight", 0) == "new"
    assert parameter_role("clip.visual.conv1.weight", 0) == "frozen"
    assert parameter_role("clip.visual.ln_pre.bias", 0) == "frozen"
    assert parameter_role("clip.token_embedding.weight", 0) == "frozen"
    assert parameter_role("clip.transformer.resblocks.0.weight", 0) == "clip"
    assert parameter_role("clip.transformer.resblocks.0.weight", 1) == "frozen"
    assert parameter_role("clip.visual.transformer.resblocks.1.weight", 1) == "clip"
    assert parameter_role("clip.logit_scale", 5) == "clip"
    assert parameter_role("resampler.queries", 0) == "query"
    assert parameter_role("resampler.query_position", 0) == "new"
    assert parameter_role("audio_projection.weight", 0) == "new"


def test_parameter_groups_lrs_decay_and_freezing():
    model = _FakeModel()
    cfg = OptimConfig(lr=1e-4, coef_lr=1e-3, freeze_layer_num=1)
    opt = build_optimizer(model, cfg)
    groups = {g["name"]: g for g in opt.param_groups}
    assert set(groups) == {"clip/decay", "clip/no_decay", "new/decay", "new/no_decay", "query/decay"}
    assert groups["clip/decay"]["lr"] == pytest.approx(1e-7)
    assert groups["new/decay"]["lr"] == pytest.approx(1e-4)
    assert groups["query/decay"]["lr"] == pytest.approx(1e-2)
    assert groups["clip/no_decay"]["weight_decay"] == 0.0
    assert groups["clip/decay"]["weight_decay"] == pytest.approx(0.2)
    assert set(groups["clip/decay"]["param_names"]) == {
        "clip.transformer.resblocks.1.weight", "clip.text_projection",
        "clip.visual.transformer.resblocks.1.weight", "clip.visual.proj"}
    assert "clip.logit_scale" in groups["clip/no_decay"]["param_names"]
    assert set(groups["new/no_decay"]["param_names"]) == {
        "ast.norm.weight", "ast.norm.bias", "resampler.ln.weight", "resampler.ln.bias"}
    assert groups["new/decay"]["param_names"] == ["audio_projection.weight"]
    grouped = {n for g in groups.values() for n in g["param_names"]}
    for name, p in model.named_parameters():
        assert p.requires_grad == (name in grouped), name
    assert not model.clip.visual.conv1.weight.requires_grad
    assert not model.clip.transformer.resblocks[0].weight.requires_grad


def test_adamw_variant_uses_the_same_groups():
    model = _FakeModel()
    cfg = OptimConfig(name="adamw")
    opt = build_optimizer(model, cfg)
    assert isinstance(opt, GroupClippedAdamW)
    assert [g["name"] for g in opt.param_groups] == [g["name"] for g in parameter_groups(model, cfg)]
    with pytest.raises(ValueError, match="--optimizer"):
        build_optimizer(model, OptimConfig(name="sgd"))


def test_groups_of_the_real_model_follow_design_section_7():
    model = AVIGATE(AVIGATEConfig.tiny(text_gate=True, text_query=True, query_gate=True))
    cfg = OptimConfig(lr=1e-4, coef_lr=1e-3, freeze_layer_num=0)
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, total_steps=10, warmup_proportion=0.1)
    assert all(g["lr"] == 0.0 for g in opt.param_groups)  # warmup starts at 0, as released
    lr_of = {n: g["initial_lr"] for g in opt.param_groups for n in g["param_names"]}
    decay_of = {n: g["weight_decay"] for g in opt.param_groups for n in g["param_names"]}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(lr_of) == trainable
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert {n for n in frozen if not n.startswith("ast.")} == {
        "clip.token_embedding.weight", "clip.positional_embedding", "clip.visual.conv1.weight",
        "clip.visual.class_embedding", "clip.visual.positional_embedding",
        "clip.visual.ln_pre.weight", "clip.visual.ln_pre.bias"}
    assert all(n.startswith("ast.norm.") for n in trainable if n.startswith("ast."))
    for name in trainable:
        if name.startswith("clip."):
            expected = 1e-7
        elif name == "resampler.queries":
            expected = 1e-2
        else:
            expected = 1e-4
        assert lr_of[name] == pytest.approx(expected), name
        assert decay_of[name] == (0.2 if dict(model.named_parameters())[name].ndim >= 2 else 0.0), name
    assert lr_of["audio_projection.weight"] == pytest.approx(1e-4)
    assert lr_of["ast.norm.weight"] == pytest.approx(1e-4)
    # After k scheduler steps every group runs at its base lr x warmup_cosine(k / 10).
    for _ in range(3):
        opt.step()
        sched.step()
    factor = 0.5 * (1 + math.cos(math.pi * 0.3))
    assert {g["name"]: g["lr"] for g in opt.param_groups} == pytest.approx(
        {g["name"]: g["initial_lr"] * factor for g in opt.param_groups})


def test_freeze_clip_train_ast_and_query_lr_scale_roles():
    assert parameter_role("clip.transformer.resblocks.3.weight", 0, freeze_clip=True) == "frozen"
    assert parameter_role("clip.visual.proj", 0, freeze_clip=True) == "frozen"
    assert parameter_role("clip.logit_scale", 0, freeze_clip=True) == "clip"  # not part of a tower
    assert parameter_role("ast.blocks.0.weight", 0, train_ast=True) == "ast"
    assert parameter_role("ast.pos_embed", 0, train_ast=True) == "ast"
    assert parameter_role("ast.norm.weight", 0, train_ast=True) == "new"
    cfg = OptimConfig(lr=1e-4, coef_lr=1e-3, query_lr_scale=7.0, train_ast=True)
    groups = {g["name"]: g for g in parameter_groups(_FakeModel(), cfg)}
    assert groups["query/decay"]["lr"] == pytest.approx(7e-4)
    with pytest.raises(ValueError, match="--freeze_agnostic"):
        OptimConfig(freeze_agnostic=True, freeze_clip=True)


def _one_step(model, cfg: OptimConfig) -> dict:
    """One optimizer step of the training objective; returns the parameters' changes."""
    from tests.test_modeling import objective, texts, videos
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = build_optimizer(model, cfg)
    ids, tmask = texts(3)
    frames, fmask, _ = videos(model, 3)
    fbank = torch.randn(3, model.cfg.ast.target_frames, model.cfg.ast.num_mel_bins)
    objective(model)(ids, tmask, frames, fmask, fbank).loss.backward()
    opt.step()
    return {n: (p.detach() - before[n]).abs().max().item() for n, p in model.named_parameters()}


def test_train_ast_trains_the_trunk_from_the_fbank():
    model = AVIGATE(AVIGATEConfig.tiny())
    change = _one_step(model, OptimConfig(lr=1e-2, coef_lr=1.0, train_ast=True, warmup_proportion=0.0))
    assert model.ast.trunk_trainable
    for name in ("ast.blocks.0.attn.qkv.weight", "ast.patch_embed.proj.weight", "ast.pos_embed"):
        assert change[name] > 0, name
    # Frozen (the default): the trunk runs without gradient and stays as it is.
    model = AVIGATE(AVIGATEConfig.tiny())
    change = _one_step(model, OptimConfig(lr=1e-2, coef_lr=1.0))
    assert not model.ast.trunk_trainable and change["ast.blocks.0.attn.qkv.weight"] == 0
    assert change["ast.norm.weight"] > 0


def test_freeze_clip_keeps_both_towers():
    model = AVIGATE(AVIGATEConfig.tiny())
    change = _one_step(model, OptimConfig(lr=1e-2, coef_lr=1.0, freeze_clip=True))
    towers = [n for n in change if n.startswith("clip.") and n != "clip.logit_scale"]
    assert towers and all(change[n] == 0 for n in towers)
    assert all(not p.requires_grad for n, p in model.named_parameters() if n in towers)
    assert change["fusion.blocks.0.gates.att.fc1.weight"] > 0 and change["audio_projection.weight"] > 0
