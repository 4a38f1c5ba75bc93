"""Loading a checkpoint trained with the released AVIGATE code (modules/released_checkpoint.py):
a tiny model's weights written in the released layout (by this test's own inverse of the
converter) load through util.load_model_weights and score exactly like the native weights;
a released-layout checkpoint with missing or unexpected keys fails with a list of them."""
import re

import pytest
import torch

import util
from modules.modeling import AVIGATE, AVIGATEConfig
from modules.released_checkpoint import (ReleasedCheckpointError, is_released_layout,
                                         layout_problems, released_to_native)
from tests.fusion_weights import spread_fusion_weights

SOT, EOT = 49406, 49407
# CLIP's text context: the released frame position table has one row per text position.
RELEASED_FRAME_ROWS = 77
# The released fusion block's names for the leaves we renamed.
FUSION_RENAMES = (("mlp_c.c_fc.", "cross_ff.cross_fc."), ("mlp_c.c_proj.", "cross_ff.cross_proj."),
                  ("gates.att.fc1.", "attn_gate.ag_fc."), ("gates.att.fc2.", "attn_gate.ag_proj."),
                  ("gates.ff.fc1.", "ff_gate.fg_fc."), ("gates.ff.fc2.", "ff_gate.fg_proj."))


def to_released_layout(native: dict, generator: torch.Generator) -> dict:
    """Our state dict written as the released code saves it: renamed keys, the audio projection
    and query tokens transposed, a 77-row frame position table (extra rows random, never used),
    CLIP in fp16 as the release keeps it, plus the unused DeiT heads the release carries."""
    released = {}
    for key, value in native.items():
        if key == "audio_projection.weight":
            released["clip.audio_projection"] = value.t().clone()
        elif key == "resampler.queries":
            released["query_tokens"] = value.t().clone()
        elif key == "resampler.query_position":
            released["query_position_embeddings.weight"] = value.clone()
        elif key == "fusion.frame_position":
            extra = torch.randn(RELEASED_FRAME_ROWS - value.shape[0], value.shape[1], generator=generator)
            released["frame_position_embeddings.weight"] = torch.cat([value, extra])
        elif key.startswith("ast."):
            released["clip.audio.v." + key[len("ast."):]] = value.clone()
        elif key.startswith("resampler.blocks."):
            released["transformer_Fusion.resblocks." + key[len("resampler.blocks."):]] = value.clone()
        elif key.startswith("fusion.blocks."):
            leaf = key[len("fusion.blocks."):]
            for ours, theirs in FUSION_RENAMES:
                leaf = re.sub(rf"^(\d+)\.{re.escape(ours)}", rf"\g<1>.{theirs}", leaf)
            released["transformerClip.resblocks." + leaf] = value.clone()
        elif key.startswith("clip."):
            released[key] = value.clone()
        else:
            raise AssertionError(f"test inverse does not know {key}")
    width = native["ast.cls_token"].shape[-1]
    for head in ("head", "head_dist"):
        released[f"clip.audio.v.{head}.weight"] = torch.randn(10, width, generator=generator)
        released[f"clip.audio.v.{head}.bias"] = torch.randn(10, generator=generator)
    return released


def make_model(seed: int) -> AVIGATE:
    torch.manual_seed(seed)
    model = AVIGATE(AVIGATEConfig.tiny(padding_rule="released")).eval()  # the rule the layout implies
    spread_fusion_weights(model.fusion)  # gates and positions far from their init, so both matter
    with torch.no_grad():
        model.fusion.frame_position.normal_()
    return model


def scores(model: AVIGATE) -> torch.Tensor:
    """Scores of 3 texts against 3 videos (raw frames, fbank audio so the AST trunk counts)."""
    g = torch.Generator().manual_seed(7)
    cfg = model.cfg
    ids = torch.zeros(3, 8, dtype=torch.long)
    ids[:, 0], ids[:, 5] = SOT, EOT
    ids[:, 1:5] = torch.randint(1, 40000, (3, 4), generator=g)
    mask = (torch.arange(8) <= 5).long().expand(3, -1)
    res = cfg.clip.image_resolution
    frames = torch.randn(3, cfg.fusion.max_frames, 3, res, res, generator=g)
    frame_mask = torch.ones(3, cfg.fusion.max_frames, dtype=torch.long)
    frame_mask[1, 2:] = 0
    fbank = torch.randn(3, cfg.ast.target_frames, cfg.ast.num_mel_bins, generator=g)
    return model.score(model.encode_text(ids, mask), model.encode_video(frames, frame_mask, fbank))


@pytest.fixture(scope="module")
def trained():
    """(model, native weights, released-layout weights) of one random tiny model."""
    model = make_model(seed=1)
    native = {k: v.clone() for k, v in model.state_dict().items()}
    released = to_released_layout(native, torch.Generator().manual_seed(2))
    return model, native, released


def test_released_layout_loads_and_scores_like_native(trained, tmp_path):
    model, native, released = trained
    assert is_released_layout(released) and not is_released_layout(native)
    path = tmp_path / "pytorch_model.bin.4"
    torch.save(released, path)
    from_released = make_model(seed=3)
    from_native = make_model(seed=4)
    assert not torch.equal(from_released.fusion.frame_position, native["fusion.frame_position"])
    util.load_model_weights(from_released, str(path))
    torch.save(native, tmp_path / "native.bin")
    util.load_model_weights(from_native, str(tmp_path / "native.bin"))
    for key, value in from_native.state_dict().items():
        assert torch.equal(from_released.state_dict()[key], value), key
    # Same tensors as the native load, so the same scores as the model that was saved.
    torch.testing.assert_close(scores(from_released), scores(model), rtol=0, atol=0)


def test_converter_transposes_slices_casts_and_strips_wrapper(trained):
    _, native, released = trained
    wrapped = {"module." + k: (v.half() if k.startswith("clip.visual.") else v) for k, v in released.items()}
    converted = released_to_native(wrapped, num_frames=native["fusion.frame_position"].shape[0])
    assert set(converted) == set(native)
    assert converted["audio_projection.weight"].shape == released["clip.audio_projection"].shape[::-1]
    assert torch.equal(converted["resampler.queries"], released["query_tokens"].t())
    assert converted["fusion.frame_position"].shape[0] == 4
    assert all(v.dtype == torch.float32 for v in converted.values() if v.is_floating_point())
    # fp16 weights of the release arrive as their fp16 values in fp32.
    assert torch.equal(converted["clip.visual.proj"], native["clip.visual.proj"].half().float())
    # Without num_frames the whole 77-row table is kept.
    assert released_to_native(released)["fusion.frame_position"].shape[0] == RELEASED_FRAME_ROWS


def test_missing_and_unexpected_released_keys_are_listed(trained, tmp_path):
    _, _, released = trained
    broken = dict(released)
    del broken["transformerClip.resblocks.1.attn_gate.ag_proj.weight"]
    del broken["query_position_embeddings.weight"]
    broken["transformerClip.resblocks.0.extra_gate.weight"] = torch.zeros(2)
    broken["similarity_dense.weight"] = torch.zeros(2)
    missing, unexpected = layout_problems(broken)
    assert set(missing) == {"transformerClip.resblocks.1.attn_gate.ag_proj.weight",
                            "query_position_embeddings.weight"}
    assert unexpected == ["similarity_dense.weight", "transformerClip.resblocks.0.extra_gate.weight"]
    path = tmp_path / "broken.bin"
    torch.save(broken, path)
    with pytest.raises(ReleasedCheckpointError) as err:
        util.load_model_weights(make_model(seed=5), str(path))
    message = str(err.value)
    assert str(path) in message and "expected layout" in message
    for key in missing + unexpected:
        assert key in message, key


def test_checkpoint_that_does_not_fit_the_model_names_released_keys(trained, tmp_path):
    # A complete released checkpoint of a model with a third fusion layer and a deeper CLIP
    # text tower than the flags build: the surplus keys are reported in the released names.
    _, _, released = trained
    bigger = dict(released)
    for key, value in released.items():
        for prefix in ("transformerClip.resblocks.1.", "clip.transformer.resblocks.1."):
            if key.startswith(prefix):
                bigger[key.replace(".1.", ".2.", 1)] = value.clone()
    bigger["clip.audio_projection"] = torch.zeros(released["clip.audio_projection"].shape[0], 32)
    path = tmp_path / "bigger.bin"
    torch.save(bigger, path)
    with pytest.raises(ReleasedCheckpointError) as err:
        util.load_model_weights(make_model(seed=6), str(path))
    message = str(err.value)
    surplus = [k for k in bigger if k not in released]
    assert f"unexpected keys ({len(surplus)})" in message and "missing keys" not in message
    assert "transformerClip.resblocks.2.ln_1.weight" in message
    assert "clip.transformer.resblocks.2.ln_1.weight" in message
    assert "clip.audio_projection: converted (32, 128), model (64, 128)" in message
    assert "--cross_num_hidden_layers" in message


def test_short_frame_position_table_is_rejected(trained):
    _, _, released = trained
    short = dict(released)
    short["frame_position_embeddings.weight"] = released["frame_position_embeddings.weight"][:3]
    with pytest.raises(ReleasedCheckpointError, match="max_frames 4"):
        released_to_native(short, num_frames=4)


def test_released_layout_under_another_padding_rule_is_refused(trained, tmp_path):
    _, _, released = trained
    path = tmp_path / "pytorch_model.bin.4"
    torch.save(released, path)
    with pytest.raises(ReleasedCheckpointError, match="--padding_rule released, but the model uses --padding_rule masked"):
        util.load_model_weights(AVIGATE(AVIGATEConfig.tiny()), str(path))
