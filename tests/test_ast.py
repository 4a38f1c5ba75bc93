"""AST trunk: parity with transformers' ASTModel through the released checkpoint format,
frozen-ness, and checkpoint loading errors."""
import pytest
import torch
from transformers import ASTConfig as HFASTConfig
from transformers import ASTModel

from modules.ast import (AST, CHECKPOINT_NAME, ASTConfig, audioset_checkpoint_to_ast,
                         config_from_weights)

PARITY_RTOL = 1e-4
HF_TO_AUDIOSET = {
    "embeddings.cls_token": "cls_token",
    "embeddings.distillation_token": "dist_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}
HF_LAYER_TO_AUDIOSET = {
    "attention.o_proj": "attn.proj",
    "layernorm_before": "norm1",
    "layernorm_after": "norm2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}


def hf_reference(cfg: ASTConfig) -> ASTModel:
    """transformers' ASTModel of the same size with every weight random.

    Weights have std 1/sqrt(fan_in) (not the 0.02 init, whose near-uniform attention would
    hide a q/k mix-up) and no token, bias or norm parameter keeps a trivial value.
    """
    hf_cfg = HFASTConfig(hidden_size=cfg.embed_dim, num_hidden_layers=cfg.depth,
                         num_attention_heads=cfg.num_heads,
                         intermediate_size=int(cfg.embed_dim * cfg.mlp_ratio),
                         patch_size=cfg.patch_size, frequency_stride=cfg.freq_stride,
                         time_stride=cfg.time_stride, num_mel_bins=cfg.num_mel_bins,
                         max_length=cfg.target_frames, layer_norm_eps=1e-6)
    model = ASTModel(hf_cfg).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "layernorm" in name:
                param.copy_(float(name.endswith("weight")) + 0.1 * torch.randn_like(param))
            elif param.dim() > 1 and "embeddings" not in name or "projection.weight" in name:
                param.normal_(0.0, param[0].numel() ** -0.5)
            else:
                param.normal_(0.0, 0.5)
    return model


def hf_to_audioset(hf_state: dict) -> dict:
    """transformers' AST naming -> the released AudioSet checkpoint (DataParallel, timm DeiT)."""
    out = {}
    for key, value in hf_state.items():
        if key in HF_TO_AUDIOSET:
            out[f"module.v.{HF_TO_AUDIOSET[key]}"] = value
            continue
        _, index, rest = key.split(".", 2)
        prefix = f"module.v.blocks.{index}."
        if rest.startswith(("attention.q_proj", "attention.k_proj", "attention.v_proj")):
            if rest.startswith("attention.q_proj"):
                kind = rest.rsplit(".", 1)[1]
                parts = [hf_state[f"layers.{index}.attention.{p}_proj.{kind}"] for p in "qkv"]
                out[prefix + f"attn.qkv.{kind}"] = torch.cat(parts, dim=0)
            continue
        module, kind = rest.rsplit(".", 1)
        out[prefix + f"{HF_LAYER_TO_AUDIOSET[module]}.{kind}"] = value
    width = hf_state["layernorm.weight"].shape[0]
    # Entries of the released file that are not part of the trunk.
    out["module.mlp_head.0.weight"] = torch.ones(width)
    out["module.mlp_head.1.weight"] = torch.zeros(527, width)
    out["module.v.head.weight"] = torch.zeros(1000, width)
    out["module.v.head_dist.bias"] = torch.zeros(1000)
    return out


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def check_parity(cfg: ASTConfig, batch: int) -> None:
    ref = hf_reference(cfg)
    ours = AST.from_checkpoint(hf_to_audioset(ref.state_dict()), cfg)
    fbank = torch.randn(batch, cfg.target_frames, cfg.num_mel_bins)
    with torch.no_grad():
        out = ref(fbank, output_hidden_states=True)
        ref_trunk = out.hidden_states[-1]  # last block output, before the final LayerNorm
        tokens = ours.tokens(fbank)
        normed = ours.norm(tokens)
    assert tokens.shape == (batch, cfg.num_output_tokens, cfg.embed_dim)
    ref_pooled = ref_trunk[:, :2].mean(dim=1)
    assert relative_error(tokens[:, 0], ref_pooled) <= PARITY_RTOL
    assert relative_error(tokens[:, 1:], ref_trunk[:, 2:]) <= PARITY_RTOL
    assert relative_error(normed[:, 1:], out.last_hidden_state[:, 2:]) <= PARITY_RTOL
    # docs/design.md §1 normalizes the pooled token; transformers' pooler averages the normalized
    # CLS and distillation tokens instead, so compare with its final LayerNorm of the mean.
    assert relative_error(normed[:, 0], ref.layernorm(ref_pooled)) <= PARITY_RTOL


def test_tokens_match_transformers_tiny():
    check_parity(ASTConfig.tiny(), batch=2)


@pytest.mark.heavy
def test_tokens_match_transformers_full_width():
    check_parity(ASTConfig(depth=2), batch=1)


def test_grid_and_token_count():
    cfg = ASTConfig()
    assert (cfg.freq_patches, cfg.time_patches) == (12, 101)
    assert cfg.num_output_tokens == 1213
    model = AST(ASTConfig.tiny())
    assert model.pos_embed.shape == (1, 2 + 12 * 101, 128)


def test_config_inferred_from_checkpoint_and_fp16_accepted(tmp_path):
    cfg = ASTConfig(embed_dim=128, depth=3, num_heads=2)
    state = {k: v.half() for k, v in hf_to_audioset(hf_reference(cfg).state_dict()).items()}
    path = tmp_path / CHECKPOINT_NAME
    torch.save(state, path)
    model = AST.from_checkpoint(path)
    assert (model.cfg.embed_dim, model.cfg.depth, model.cfg.num_heads) == (128, 3, 2)
    assert model.cfg.mlp_ratio == 4.0
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert torch.equal(model.pos_embed, state["module.v.pos_embed"].float())


def test_converter_drops_heads_and_strips_prefixes():
    state = hf_to_audioset(hf_reference(ASTConfig.tiny()).state_dict())
    weights = audioset_checkpoint_to_ast(state)
    assert set(weights) == set(AST(ASTConfig.tiny()).state_dict())
    assert config_from_weights(weights) == ASTConfig.tiny()


def test_strict_load_names_bad_keys():
    state = hf_to_audioset(hf_reference(ASTConfig.tiny()).state_dict())
    state["module.v.blocks.0.extra.weight"] = torch.zeros(1)
    del state["module.v.dist_token"]
    expected = r"missing keys \['dist_token'\].*blocks\.0\.extra\.weight"
    with pytest.raises(RuntimeError, match=expected):
        AST.from_checkpoint(state, ASTConfig.tiny())


def test_missing_checkpoint_names_file_and_source(tmp_path):
    path = tmp_path / "nowhere" / CHECKPOINT_NAME
    with pytest.raises(FileNotFoundError) as err:
        AST.from_checkpoint(path)
    message = str(err.value)
    assert str(path) in message
    assert "AST repository" in message and CHECKPOINT_NAME in message


def test_trunk_frozen_norm_trainable():
    model = AST(ASTConfig.tiny())
    model.train()
    assert model.norm.training
    assert not model.blocks.training and not any(m.training for m in model.blocks.modules())
    assert not model.patch_embed.training
    fbank = torch.randn(2, 1024, 128)
    model(fbank).square().mean().backward()
    trunk = [name for name, p in model.named_parameters() if not name.startswith("norm.")]
    assert trunk
    for name, param in model.named_parameters():
        if name.startswith("norm."):
            assert param.requires_grad and param.grad is not None and param.grad.abs().sum() > 0
        else:
            assert not param.requires_grad and param.grad is None, name


def test_tokens_reject_wrong_shape():
    with pytest.raises(ValueError, match=r"\[B, 1024, 128\]"):
        AST(ASTConfig.tiny()).tokens(torch.zeros(1, 128, 1024))
