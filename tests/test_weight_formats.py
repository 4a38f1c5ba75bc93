"""Weights in the other formats users have, converted on load, against the native path and the
reference libraries (random weights): open_clip CLIP state dicts and transformers AST ones."""
import open_clip
import pytest
import torch
from open_clip.model import CLIPTextCfg, CLIPVisionCfg
from safetensors.torch import save_file
from transformers import ASTForAudioClassification

from modules.ast import AST, ASTConfig, audioset_checkpoint_to_ast, checkpoint_to_trunk, hf_ast_to_trunk
from modules.clip import CLIP, CLIPConfig, load_clip_state_dict, open_clip_to_openai
from test_ast import hf_reference, hf_to_audioset, relative_error
from test_clip import perturbed, random_text_ids

PARITY_RTOL = 1e-5
AST_PARITY_RTOL = 1e-4


def tiny_open_clip(custom_text: bool) -> torch.nn.Module:
    """open_clip CLIP (OpenAI key names) or CustomTextCLIP (``text.*``) of CLIPConfig.tiny()'s size."""
    cfg = CLIPConfig.tiny()
    vision = CLIPVisionCfg(layers=cfg.vision_layers, width=cfg.vision_width, patch_size=cfg.vision_patch_size,
                           image_size=cfg.image_resolution)
    text = CLIPTextCfg(context_length=cfg.context_length, vocab_size=cfg.vocab_size, width=cfg.transformer_width,
                       heads=cfg.transformer_heads, layers=cfg.transformer_layers)
    kind = open_clip.model.CustomTextCLIP if custom_text else open_clip.model.CLIP
    model = kind(embed_dim=cfg.embed_dim, vision_cfg=vision, text_cfg=text, quick_gelu=True)
    model.load_state_dict(perturbed(model.state_dict(), torch.Generator().manual_seed(4)))
    return model.eval()


def save(state_dict: dict, path, fmt: str) -> None:
    if fmt == "safetensors":
        save_file({k: v.contiguous() for k, v in state_dict.items()}, str(path))
    elif fmt == "training_checkpoint":  # open_clip's train loop: epoch, name, state_dict (DDP), optimizer
        wrapped = {"module." + k: v for k, v in state_dict.items()}
        torch.save({"epoch": 3, "name": "run", "state_dict": wrapped, "optimizer": {"state": {}}}, path)
    else:
        torch.save(state_dict, path)


@pytest.mark.parametrize("custom_text", [False, True])
@pytest.mark.parametrize("fmt", ["pt", "safetensors", "training_checkpoint"])
def test_open_clip_state_dicts_match_open_clip(tmp_path, custom_text, fmt):
    ref = tiny_open_clip(custom_text)
    keys = set(ref.state_dict())
    assert any(k.startswith("text.") for k in keys) == custom_text
    path = tmp_path / f"open_clip.{'safetensors' if fmt == 'safetensors' else 'pt'}"
    save(ref.state_dict(), path, fmt)
    ours = CLIP.from_state_dict(load_clip_state_dict(path)).eval()
    assert ours.cfg == CLIPConfig.tiny()
    g = torch.Generator().manual_seed(5)
    images = torch.randn(2, 3, 32, 32, generator=g)
    ids = random_text_ids(3, 32, g)
    with torch.no_grad():
        assert relative_error(ours.encode_image(images), ref.encode_image(images)) < PARITY_RTOL
        assert relative_error(ours.encode_text(ids), ref.encode_text(ids)) < PARITY_RTOL


def test_custom_text_converts_to_the_native_names():
    custom, plain = tiny_open_clip(True), tiny_open_clip(False)
    plain.load_state_dict(open_clip_to_openai(custom.state_dict()))  # strict: every key placed
    native = plain.state_dict()
    converted = open_clip_to_openai(custom.state_dict())
    assert sorted(converted) == sorted(native)
    assert all(torch.equal(converted[k], native[k]) for k in native)


def test_linear_text_projection_is_refused():
    state = open_clip_to_openai(tiny_open_clip(False).state_dict())
    state = {("text." + k if not k.startswith("visual.") else k): v for k, v in state.items()}
    state["text.text_projection.weight"] = state.pop("text.text_projection").t()
    with pytest.raises(ValueError, match="text.text_projection.weight"):
        open_clip_to_openai(state)


def hf_files(tmp_path, cfg: ASTConfig) -> tuple:
    """A random transformers ASTModel and its weights in the layouts users have."""
    ref = hf_reference(cfg)
    ref.save_pretrained(tmp_path / "hf")  # model.safetensors, saved-file names (encoder.layer.N...)
    classifier = ASTForAudioClassification(ref.config)
    classifier.audio_spectrogram_transformer.load_state_dict(ref.state_dict())
    torch.save(classifier.state_dict(), tmp_path / "pytorch_model.bin")  # prefix + in-memory names
    torch.save(ref.state_dict(), tmp_path / "ast_model.bin")
    return ref, {"safetensors": tmp_path / "hf" / "model.safetensors", "classifier_bin": tmp_path / "pytorch_model.bin",
                 "model_bin": tmp_path / "ast_model.bin"}


@pytest.mark.parametrize("layout", ["safetensors", "classifier_bin", "model_bin"])
def test_transformers_ast_files_match_native_and_transformers(tmp_path, layout):
    cfg = ASTConfig.tiny()
    ref, files = hf_files(tmp_path, cfg)
    ours = AST.from_checkpoint(files[layout]).eval()
    assert ours.cfg == cfg
    native = audioset_checkpoint_to_ast(hf_to_audioset(ref.state_dict()))
    assert sorted(ours.state_dict()) == sorted(native)
    assert all(torch.equal(ours.state_dict()[k], native[k]) for k in native)  # same weights as the .pth path
    fbank = torch.randn(2, cfg.target_frames, cfg.num_mel_bins, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        ref_trunk = ref(fbank, output_hidden_states=True).hidden_states[-1]
        tokens = ours.tokens(fbank)
    assert relative_error(tokens[:, 0], ref_trunk[:, :2].mean(dim=1)) <= AST_PARITY_RTOL
    assert relative_error(tokens[:, 1:], ref_trunk[:, 2:]) <= AST_PARITY_RTOL


def test_converter_dispatch_and_errors(tmp_path):
    ref = hf_reference(ASTConfig.tiny())
    hf_state = ref.state_dict()
    assert sorted(checkpoint_to_trunk(hf_state)) == sorted(hf_ast_to_trunk(hf_state))
    audioset = hf_to_audioset(hf_state)
    assert sorted(checkpoint_to_trunk(audioset)) == sorted(audioset_checkpoint_to_ast(audioset))
    broken = {k: v for k, v in hf_state.items() if "k_proj" not in k}
    with pytest.raises(KeyError, match="lacks"):
        hf_ast_to_trunk(broken)
    with pytest.raises(KeyError, match="unexpected key 'layers.0.extra.weight'"):
        hf_ast_to_trunk({**hf_state, "layers.0.extra.weight": torch.zeros(1)})
    with pytest.raises(IsADirectoryError, match="model.safetensors"):
        AST.from_checkpoint(tmp_path)
