"""CLIP towers and checkpoint loading.

Parity is checked against open_clip (an independent implementation) with random weights;
open_clip's CLIP uses OpenAI's state-dict names, so its state dict loads unchanged.
"""
import warnings

import open_clip
import pytest
import torch
from torch import nn

import modules.clip as clip_module
from modules.clip import CLIP, CLIPConfig, config_from_state_dict, load_clip_state_dict
from modules.layers import ResidualAttentionBlock

PARITY_RTOL = 1e-5
SOT, EOT = 49406, 49407


def max_relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def random_text_ids(num: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """ids [num, length]: [sot] + random BPE ids + [eot], then zeros, with varied lengths."""
    ids = torch.zeros(num, length, dtype=torch.long)
    for row in range(num):
        n_words = int(torch.randint(0, length - 1, (1,), generator=generator))
        words = torch.randint(0, SOT, (n_words,), generator=generator)
        ids[row, : n_words + 2] = torch.cat([torch.tensor([SOT]), words, torch.tensor([EOT])])
    return ids


def perturbed(sd: dict[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Add noise to the 0/1-D weights so that no LayerNorm or bias sits at its trivial init.

    Matrices are already random at init; leaving them alone keeps the full-width tests fast.
    """
    return {k: v + 0.02 * torch.randn(v.shape, generator=generator) if v.dim() <= 1 else v
            for k, v in sd.items()}


@pytest.fixture
def tiny_state_dict() -> dict[str, torch.Tensor]:
    return perturbed(CLIP(CLIPConfig.tiny()).state_dict(), torch.Generator().manual_seed(1))


@pytest.mark.heavy
@pytest.mark.parametrize("name, patch_size", [("ViT-B-32-quickgelu", 32), ("ViT-B-16-quickgelu", 16)])
def test_parity_with_open_clip(name, patch_size):
    g = torch.Generator().manual_seed(0)
    ref = open_clip.create_model(name, pretrained=None)
    ref.load_state_dict(perturbed(ref.state_dict(), g))
    ref.eval()
    ours = CLIP.from_state_dict(ref.state_dict()).eval()
    assert ours.cfg == CLIPConfig(vision_patch_size=patch_size)
    images = torch.randn(2, 3, 224, 224, generator=g)
    ids = random_text_ids(3, 77, g)
    with torch.no_grad():
        image_err = max_relative_error(ours.encode_image(images), ref.encode_image(images))
        text_err = max_relative_error(ours.encode_text(ids), ref.encode_text(ids))
    print(f"{name}: max relative error image {image_err:.2e}, text {text_err:.2e}")
    assert image_err < PARITY_RTOL and text_err < PARITY_RTOL


class _Archive(nn.Module):
    """A TorchScript-able module tree whose state dict is given (OpenAI's archive layout)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def write_openai_archive(sd: dict[str, torch.Tensor], metadata: dict[str, int], path) -> None:
    """Save fp16 weights plus input_resolution/context_length/vocab_size as a TorchScript archive."""
    root = _Archive()
    for key, value in sd.items():
        *parents, leaf = key.split(".")
        module = root
        for name in parents:
            if not hasattr(module, name):
                module.add_module(name, nn.Module())
            module = getattr(module, name)
        module.register_parameter(leaf, nn.Parameter(value.half(), requires_grad=False))
    for key, value in metadata.items():
        root.register_buffer(key, torch.tensor(value))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.script(root).save(str(path))


def test_loads_openai_torchscript_archive(tmp_path, tiny_state_dict):
    cfg = CLIPConfig.tiny()
    path = tmp_path / "tiny-openai.pt"
    metadata = {"input_resolution": cfg.image_resolution, "context_length": cfg.context_length,
                "vocab_size": cfg.vocab_size}
    write_openai_archive(tiny_state_dict, metadata, path)
    loaded = load_clip_state_dict(path)
    assert sorted(loaded) == sorted(tiny_state_dict)
    for key, value in tiny_state_dict.items():
        assert loaded[key].dtype == torch.float32, key
        assert torch.equal(loaded[key], value.half().float()), key
    model = CLIP.from_state_dict(loaded)
    for key, value in model.state_dict().items():
        assert torch.equal(value, tiny_state_dict[key].half().float()), key


@pytest.mark.parametrize("wrap", ["bare", "state_dict", "model", "module_prefix"])
def test_loads_plain_state_dict_files(tmp_path, tiny_state_dict, wrap):
    sd = {k: v.half() for k, v in tiny_state_dict.items()}
    saved = {"bare": sd, "state_dict": {"state_dict": sd, "epoch": 3}, "model": {"model": sd},
             "module_prefix": {"state_dict": {"module." + k: v for k, v in sd.items()}}}[wrap]
    path = tmp_path / "clip.pt"
    torch.save(saved, path)
    loaded = load_clip_state_dict(str(path))
    assert sorted(loaded) == sorted(tiny_state_dict)
    assert all(torch.equal(loaded[k], v.float()) and loaded[k].dtype == torch.float32 for k, v in sd.items())


def test_released_names_resolve_to_modules_dir(tmp_path, monkeypatch, tiny_state_dict):
    monkeypatch.setattr(clip_module, "MODULES_DIR", str(tmp_path))
    torch.save(tiny_state_dict, tmp_path / "ViT-B-16.pt")
    loaded = load_clip_state_dict("ViT-B/16")
    assert all(torch.equal(loaded[k], v) for k, v in tiny_state_dict.items())


@pytest.mark.parametrize("name, file_name", [("ViT-B/32", "ViT-B-32.pt"), ("ViT-B/16", "ViT-B-16.pt")])
def test_missing_checkpoint_message(tmp_path, monkeypatch, name, file_name):
    monkeypatch.setattr(clip_module, "MODULES_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError) as info:
        load_clip_state_dict(name)
    message = str(info.value)
    assert str(tmp_path / file_name) in message
    assert f'clip.load("{name}")' in message and "~/.cache/clip/" in message and "OpenAI" in message


def test_missing_checkpoint_path_message(tmp_path):
    path = tmp_path / "nowhere" / "clip.pt"
    with pytest.raises(FileNotFoundError, match="ViT-B-32.pt") as info:
        load_clip_state_dict(path)
    assert str(path) in str(info.value)


def test_malformed_state_dict_lists_keys(tiny_state_dict):
    sd = dict(tiny_state_dict)
    del sd["ln_final.bias"]
    sd["transformer.resblocks.1.mlp.c_fc.weight"] = torch.zeros(3, 64)
    sd["visual.extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError) as info:
        CLIP.from_state_dict(sd)
    message = str(info.value)
    for key in ("ln_final.bias", "transformer.resblocks.1.mlp.c_fc.weight", "visual.extra.weight"):
        assert key in message


def test_state_dict_without_architecture_keys_lists_them(tiny_state_dict):
    sd = {k: v for k, v in tiny_state_dict.items() if not k.startswith("visual.")}
    sd["token_embedding.weight"] = torch.zeros(10)
    with pytest.raises(ValueError) as info:
        config_from_state_dict(sd)
    message = str(info.value)
    for key in ("visual.conv1.weight", "visual.positional_embedding", "visual.transformer.resblocks.0",
                "token_embedding.weight"):
        assert key in message


def test_non_square_position_table_is_rejected(tiny_state_dict):
    sd = dict(tiny_state_dict)
    sd["visual.positional_embedding"] = torch.zeros(19, 64)
    with pytest.raises(ValueError, match="visual.positional_embedding"):
        config_from_state_dict(sd)


@pytest.mark.parametrize("cfg", [
    CLIPConfig(),                                 # ViT-B/32
    CLIPConfig(vision_patch_size=16),             # ViT-B/16
    CLIPConfig(image_resolution=336, vision_patch_size=14, vision_layers=24, vision_width=1024,
               embed_dim=768, transformer_width=768, transformer_heads=12),  # ViT-L/14@336
    CLIPConfig.tiny(),
])
def test_config_read_from_shapes(cfg):
    with torch.device("meta"):
        model = CLIP(cfg)
    assert config_from_state_dict(model.state_dict()) == cfg
    assert model.cfg.vision_heads == cfg.vision_width // 64


def test_vit_b16_shapes():
    with torch.device("meta"):
        model = CLIP(CLIPConfig(vision_patch_size=16))
    sd = model.state_dict()
    assert sd["visual.conv1.weight"].shape == (768, 3, 16, 16)
    assert sd["visual.positional_embedding"].shape == (14 * 14 + 1, 768)
    assert model.visual.transformer.resblocks[0].attn.num_heads == 12
    assert model.transformer.resblocks[0].attn.num_heads == 8


def test_configs_breaking_openai_head_rule_are_rejected():
    with pytest.raises(ValueError, match="vision_width=32"):
        CLIPConfig(vision_width=32)
    with pytest.raises(ValueError, match="transformer_heads=4"):
        CLIPConfig(transformer_heads=4)


def test_file_with_pickled_objects_is_rejected(tmp_path, tiny_state_dict):
    path = tmp_path / "with_args.pt"
    torch.save({"state_dict": tiny_state_dict, "args": warnings.WarningMessage("m", UserWarning, "f", 1)}, path)
    with pytest.raises(ValueError, match="with_args.pt"):
        load_clip_state_dict(path)


def test_text_blocks_are_shared_blocks():
    model = CLIP(CLIPConfig.tiny())
    assert len(model.transformer.resblocks) == 2
    assert all(isinstance(b, ResidualAttentionBlock) for b in model.transformer.resblocks)
    assert model.cfg.embed_dim == model.cfg.transformer_width


def test_short_ids_match_context_padded_ids(tiny_state_dict):
    model = CLIP.from_state_dict(tiny_state_dict).eval()
    ids = random_text_ids(4, 12, torch.Generator().manual_seed(2))
    padded = torch.cat([ids, torch.zeros(4, model.cfg.context_length - 12, dtype=torch.long)], dim=1)
    with torch.no_grad():
        short, full = model.encode_text(ids), model.encode_text(padded)
    assert short.shape == (4, model.cfg.embed_dim)
    torch.testing.assert_close(short, full, rtol=1e-5, atol=1e-6)


def test_text_pools_at_end_token(tiny_state_dict):
    model = CLIP.from_state_dict(tiny_state_dict).eval()
    ids = torch.tensor([[SOT, 320, 1929, EOT, 0, 0]])
    after_end = ids.clone()
    after_end[0, 4:] = 500                  # tokens after the end token are never seen (causal)
    before_end = ids.clone()
    before_end[0, 2] = 2368
    with torch.no_grad():
        base = model.encode_text(ids)
        assert torch.equal(base, model.encode_text(after_end))
        assert not torch.allclose(base, model.encode_text(before_end))


def test_bad_input_sizes_raise(tiny_state_dict):
    model = CLIP.from_state_dict(tiny_state_dict)
    with pytest.raises(ValueError, match="32x32"):
        model.encode_image(torch.zeros(1, 3, 48, 48))
    with pytest.raises(ValueError, match="context length 32"):
        model.encode_text(torch.zeros(1, 40, dtype=torch.long))


def _loss_and_grads(model: CLIP, images, ids, weights):
    model.zero_grad()
    out = torch.cat([model.encode_image(images), model.encode_text(ids)])
    (out * weights).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_grad_checkpointing_matches_plain_backward(tiny_state_dict, monkeypatch):
    checkpointed = []

    def counting_checkpoint(fn, *args, **kwargs):
        checkpointed.append(kwargs["use_reentrant"])
        return torch.utils.checkpoint.checkpoint(fn, *args, **kwargs)

    monkeypatch.setattr(clip_module, "checkpoint", counting_checkpoint)
    g = torch.Generator().manual_seed(3)
    model = CLIP.from_state_dict(tiny_state_dict).train()
    images = torch.randn(2, 3, 32, 32, generator=g)
    ids = random_text_ids(3, 16, g)
    weights = torch.randn(5, model.cfg.embed_dim, generator=g)
    out_plain, grads_plain = _loss_and_grads(model, images, ids, weights)
    assert not checkpointed
    model.set_grad_checkpointing(True)
    out_ckpt, grads_ckpt = _loss_and_grads(model, images, ids, weights)
    num_blocks = model.cfg.vision_layers + model.cfg.transformer_layers
    assert checkpointed == [False] * num_blocks
    torch.testing.assert_close(out_ckpt, out_plain, rtol=0, atol=0)
    assert sorted(grads_ckpt) == sorted(grads_plain)
    for name, grad in grads_plain.items():
        torch.testing.assert_close(grads_ckpt[name], grad, rtol=1e-6, atol=1e-7, msg=name)
    # Every parameter except logit_scale (used only by the loss) gets a gradient.
    assert set(grads_plain) == {n for n, _ in model.named_parameters()} - {"logit_scale"}


def test_grad_checkpointing_is_off_in_eval(tiny_state_dict, monkeypatch):
    checkpointed = []
    monkeypatch.setattr(clip_module, "checkpoint", lambda *args, **kwargs: checkpointed.append(1))
    model = CLIP.from_state_dict(tiny_state_dict).eval()
    model.set_grad_checkpointing(True)
    model.encode_image(torch.randn(1, 3, 32, 32)).sum().backward()
    assert not checkpointed


def test_from_state_dict_gives_trainable_fp32_copies(tiny_state_dict):
    half = {k: v.half() for k, v in tiny_state_dict.items()}
    model = CLIP.from_state_dict(half)
    params = dict(model.named_parameters())
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" and p.requires_grad for p in params.values())
    original = tiny_state_dict["ln_final.weight"].clone()
    fp32_model = CLIP.from_state_dict(tiny_state_dict)
    with torch.no_grad():
        fp32_model.ln_final.weight.add_(1.0)
    assert torch.equal(tiny_state_dict["ln_final.weight"], original)   # the model owns its weights
