"""Checkpoints trained with the released AVIGATE code -> this codebase's state dict.

The released code (Jeong et al., CVPR 2025; a CLIP4Clip descendant run with ``--loose_type
--sim_header seqTransf``) saves ``model.state_dict()`` of its CLIP4Clip class as
``pytorch_model.bin.N``. Its key names map onto ours as follows (W_a AST width, D joint
width, Q audio queries, F = ``--max_frames``, N a block index):

    released key                                        ours                              change
    clip.<CLIP key> (visual.*, transformer.*, token_embedding.weight, positional_embedding,
      ln_final.*, text_projection, logit_scale)         clip.<same key>                   -
    clip.audio.v.<AST trunk key> (patch_embed.proj.*, cls_token, dist_token, pos_embed,
      blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}.*, norm.*)
                                                        ast.<same key>                    -
    clip.audio.v.head.*, clip.audio.v.head_dist.*,
      clip.audio.mlp_head.*                             dropped (unused classifier heads; optional)
    clip.audio_projection [W_a, D], applied as x @ W    audio_projection.weight [D, W_a]  transposed
    query_tokens [D, Q]                                 resampler.queries [Q, D]          transposed
    query_position_embeddings.weight [Q, D]             resampler.query_position [Q, D]   -
    transformer_Fusion.resblocks.N.<leaf>               resampler.blocks.N.<leaf>         -
      leaves: ln_1, attn, ln_2, mlp.c_fc, mlp.c_proj, ln_3, cross_attn
    frame_position_embeddings.weight [77, D]            fusion.frame_position [F, D]      first F rows
    transformerClip.resblocks.N.<leaf>                  fusion.blocks.N.<leaf>            -
      leaves: ln_1, attn, ln_2, mlp.c_fc, mlp.c_proj, ln_3, cross_attn, ln_4
    transformerClip.resblocks.N.cross_ff.cross_fc.weight   fusion.blocks.N.mlp_c.c_fc.weight
    transformerClip.resblocks.N.cross_ff.cross_proj.weight fusion.blocks.N.mlp_c.c_proj.weight
    transformerClip.resblocks.N.attn_gate.ag_fc.weight     fusion.blocks.N.gates.att.fc1.weight
    transformerClip.resblocks.N.attn_gate.ag_proj.weight   fusion.blocks.N.gates.att.fc2.weight
    transformerClip.resblocks.N.ff_gate.fg_fc.weight       fusion.blocks.N.gates.ff.fc1.weight
    transformerClip.resblocks.N.ff_gate.fg_proj.weight     fusion.blocks.N.gates.ff.fc2.weight

The frame position table is an embedding over CLIP's 77 text positions of which the release
uses rows 0..F-1 only, so the other rows are dropped. Floating-point tensors are cast to
fp32 (the release keeps its CLIP weights, the AST's linear layers and the audio projection in
fp16). A ``module.`` prefix on every key (a wrapped model saved as is) is stripped.

Sources: the key names and shapes come from public copies of the released AVIGATE code
(its modeling.py, module_cross.py and module_clip.py as found in public forks of the
official repository, whose own model files are not in the public index we could search);
CLIP's and the AST trunk's names are those of the OpenAI CLIP archive and of timm's DeiT.
Assumed, not seen in a released checkpoint file: that timm's distilled DeiT heads
(``clip.audio.v.head.*``, ``clip.audio.v.head_dist.*``) are present (they are accepted and
dropped either way) and that no AudioSet classifier (``clip.audio.mlp_head.*``) is saved (it
would be dropped too).

``released_to_native`` is the pure dict-to-dict converter; ``load_released_checkpoint``
converts and loads strictly, reporting missing / unexpected / mis-shaped keys in the
released names together with the expected layout.
"""
from __future__ import annotations

import re
from typing import Callable, Optional

import torch
from torch import nn

WRAPPER_PREFIX = "module."
# Keys only the released layout has; any of them marks a state dict as released.
RELEASED_MARKERS = ("transformerClip.resblocks.", "transformer_Fusion.resblocks.",
                    "clip.audio_projection", "clip.audio.v.", "query_tokens")
DROPPED_PREFIXES = ("clip.audio.v.head.", "clip.audio.v.head_dist.", "clip.audio.mlp_head.")

AST_RELEASED, AST_NATIVE = "clip.audio.v.", "ast."
CLIP_PREFIX = "clip."
RESAMPLER_RELEASED, RESAMPLER_NATIVE = "transformer_Fusion.resblocks.", "resampler.blocks."
FUSION_RELEASED, FUSION_NATIVE = "transformerClip.resblocks.", "fusion.blocks."
FRAME_POSITION_RELEASED, FRAME_POSITION_NATIVE = "frame_position_embeddings.weight", "fusion.frame_position"

_ATTENTION = ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias")
_NORM = ("weight", "bias")
_LINEAR = ("weight", "bias")
# Leaves of one resampler block, the same names on both sides.
RESAMPLER_LEAVES = tuple(
    [f"attn.{p}" for p in _ATTENTION] + [f"cross_attn.{p}" for p in _ATTENTION]
    + [f"{ln}.{p}" for ln in ("ln_1", "ln_2", "ln_3") for p in _NORM]
    + [f"mlp.{fc}.{p}" for fc in ("c_fc", "c_proj") for p in _LINEAR])
# Leaves of one fusion block: released name -> our name.
FUSION_LEAVES = {**{leaf: leaf for leaf in RESAMPLER_LEAVES},
                 "ln_4.weight": "ln_4.weight", "ln_4.bias": "ln_4.bias",
                 "cross_ff.cross_fc.weight": "mlp_c.c_fc.weight",
                 "cross_ff.cross_proj.weight": "mlp_c.c_proj.weight",
                 "attn_gate.ag_fc.weight": "gates.att.fc1.weight",
                 "attn_gate.ag_proj.weight": "gates.att.fc2.weight",
                 "ff_gate.fg_fc.weight": "gates.ff.fc1.weight",
                 "ff_gate.fg_proj.weight": "gates.ff.fc2.weight"}
FUSION_LEAVES_NATIVE = {native: released for released, native in FUSION_LEAVES.items()}
RESAMPLER_LEAF_MAP = {leaf: leaf for leaf in RESAMPLER_LEAVES}
# (released prefix, our prefix, released leaf -> our leaf, our leaf -> released leaf)
BLOCK_FAMILIES = ((RESAMPLER_RELEASED, RESAMPLER_NATIVE, RESAMPLER_LEAF_MAP, RESAMPLER_LEAF_MAP),
                  (FUSION_RELEASED, FUSION_NATIVE, FUSION_LEAVES, FUSION_LEAVES_NATIVE))
BLOCK_KEY = re.compile(r"^(\d+)\.(.+)$")


def _transpose(value: torch.Tensor) -> torch.Tensor:
    return value.t().contiguous()


# Keys renamed as a whole: released key -> (our key, value transform or None).
SINGLE_KEYS: dict[str, tuple[str, Optional[Callable[[torch.Tensor], torch.Tensor]]]] = {
    "clip.audio_projection": ("audio_projection.weight", _transpose),
    "query_tokens": ("resampler.queries", _transpose),
    "query_position_embeddings.weight": ("resampler.query_position", None),
    FRAME_POSITION_RELEASED: (FRAME_POSITION_NATIVE, None),
}
SINGLE_KEYS_NATIVE = {native: released for released, (native, _) in SINGLE_KEYS.items()}
# Keys the AVIGATE parts of a released checkpoint always have (CLIP and the AST trunk are
# checked against the model by load_released_checkpoint).
REQUIRED_KEYS = tuple(SINGLE_KEYS) + ("clip.logit_scale", "clip.audio.v.norm.weight",
                                      "clip.audio.v.norm.bias")

EXPECTED_LAYOUT = """\
expected layout (the released AVIGATE code's model.state_dict(), W_a AST width, D width):
  clip.visual.* clip.transformer.* clip.token_embedding.weight clip.positional_embedding
  clip.ln_final.* clip.text_projection clip.logit_scale          (OpenAI CLIP names)
  clip.audio.v.{patch_embed.proj,cls_token,dist_token,pos_embed,blocks.N.*,norm}.*
                                                                 (AST trunk, timm DeiT names)
  clip.audio_projection [W_a, D]
  query_tokens [D, Q]   query_position_embeddings.weight [Q, D]
  transformer_Fusion.resblocks.N.{ln_1,attn,ln_2,mlp.c_fc,mlp.c_proj,ln_3,cross_attn}.*
  frame_position_embeddings.weight [77, D]
  transformerClip.resblocks.N.{ln_1,attn,ln_2,mlp.c_fc,mlp.c_proj,ln_3,cross_attn,ln_4}.*
  transformerClip.resblocks.N.{cross_ff.cross_fc,cross_ff.cross_proj,attn_gate.ag_fc,
                               attn_gate.ag_proj,ff_gate.fg_fc,ff_gate.fg_proj}.weight
  (optional, dropped: clip.audio.v.head.*, clip.audio.v.head_dist.*, clip.audio.mlp_head.*)"""
# How the released code treats padded frames (modules.fusion.PADDING_RULES): implied by the layout.
PADDING_RULE = "released"
# Keys listed per category in an error message.
ERROR_KEYS_SHOWN = 20


class ReleasedCheckpointError(ValueError):
    """A state dict in the released layout that does not convert or does not fit the model."""


def strip_wrapper_prefix(state_dict: dict) -> dict:
    """Drop a ``module.`` prefix carried by every key (a DataParallel/DDP model saved as is)."""
    if state_dict and all(key.startswith(WRAPPER_PREFIX) for key in state_dict):
        return {key[len(WRAPPER_PREFIX):]: value for key, value in state_dict.items()}
    return dict(state_dict)


def is_released_layout(state_dict: dict) -> bool:
    """True when the keys are those of the released AVIGATE code (not this codebase's)."""
    return any(key.startswith(RELEASED_MARKERS) for key in strip_wrapper_prefix(state_dict))


def file_is_released_layout(path: str) -> bool:
    """Whether the state dict in ``path`` has the released layout (read memory-mapped where the
    file format allows, so only its keys are touched)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # the legacy (non-zip) format cannot be memory-mapped
        state = torch.load(path, map_location="cpu", weights_only=True)
    return isinstance(state, dict) and is_released_layout(state)


def check_padding_rule(padding_rule: str, source: str) -> None:
    """A released-layout checkpoint was trained under the released padding rule (blank-frame
    embeddings in padded slots, means over all F frames, no key mask; docs/design.md §3): refuse a
    model that treats padded frames otherwise, whose scores on short clips would not be the
    release's."""
    if padding_rule != PADDING_RULE:
        raise ReleasedCheckpointError(
            f"{source} is a checkpoint of the released AVIGATE code, trained with --padding_rule {PADDING_RULE}, "
            f"but the model uses --padding_rule {padding_rule}: on clips shorter than --max_frames its scores would "
            f"not be the release's. Leave --padding_rule out (the checkpoint implies {PADDING_RULE}) or pass "
            f"--padding_rule {PADDING_RULE}")


def _block_leaf(key: str, prefix: str) -> Optional[tuple[str, str]]:
    """(layer index, leaf) of ``prefix``N.leaf, or None."""
    match = BLOCK_KEY.match(key[len(prefix):]) if key.startswith(prefix) else None
    return (match.group(1), match.group(2)) if match else None


def native_key(released: str) -> Optional[str]:
    """Our name for a released key; "" for a key that is dropped; None for an unknown key."""
    if released in SINGLE_KEYS:
        return SINGLE_KEYS[released][0]
    if released.startswith(DROPPED_PREFIXES):
        return ""
    for prefix, native, leaves, _ in BLOCK_FAMILIES:
        if released.startswith(prefix):
            parts = _block_leaf(released, prefix)
            if parts is None or parts[1] not in leaves:
                return None
            return f"{native}{parts[0]}.{leaves[parts[1]]}"
    if released.startswith(AST_RELEASED):
        return AST_NATIVE + released[len(AST_RELEASED):]
    if released.startswith(CLIP_PREFIX) and not released.startswith("clip.audio"):
        return released
    return None


def released_key(native: str) -> str:
    """The released name of one of our keys (for error messages)."""
    if native in SINGLE_KEYS_NATIVE:
        return SINGLE_KEYS_NATIVE[native]
    for released, prefix, _, leaves in BLOCK_FAMILIES:
        parts = _block_leaf(native, prefix)
        if parts is not None and parts[1] in leaves:
            return f"{released}{parts[0]}.{leaves[parts[1]]}"
    if native.startswith(AST_NATIVE):
        return AST_RELEASED + native[len(AST_NATIVE):]
    if native.startswith(CLIP_PREFIX):
        return native
    return f"{native} (ours; no released counterpart)"


def _block_problems(keys: set, prefix: str, leaves) -> list[str]:
    """Missing keys of the blocks under ``prefix``: every leaf of every layer 0..max seen."""
    layers = {int(parts[0]) for key in keys if (parts := _block_leaf(key, prefix)) is not None}
    if not layers:
        return [f"{prefix}0.{leaf}" for leaf in leaves]
    return [f"{prefix}{n}.{leaf}" for n in range(max(layers) + 1) for leaf in leaves
            if f"{prefix}{n}.{leaf}" not in keys]


def layout_problems(state_dict: dict) -> tuple[list[str], list[str]]:
    """(missing, unexpected) released keys of a state dict in the released layout."""
    keys = set(strip_wrapper_prefix(state_dict))
    unexpected = sorted(key for key in keys if native_key(key) is None)
    missing = [key for key in REQUIRED_KEYS if key not in keys]
    missing += _block_problems(keys, RESAMPLER_RELEASED, RESAMPLER_LEAVES)
    missing += _block_problems(keys, FUSION_RELEASED, tuple(FUSION_LEAVES))
    return missing, unexpected


def _listing(label: str, keys: list[str]) -> str:
    shown = ", ".join(keys[:ERROR_KEYS_SHOWN])
    more = f" ... and {len(keys) - ERROR_KEYS_SHOWN} more" if len(keys) > ERROR_KEYS_SHOWN else ""
    return f"{label} ({len(keys)}): [{shown}{more}]"


def _raise(source: str, problem: str, sections: list[tuple[str, list[str]]]) -> None:
    details = "; ".join(_listing(label, keys) for label, keys in sections if keys)
    raise ReleasedCheckpointError(f"{source}: {problem}; {details}\n{EXPECTED_LAYOUT}")


def released_to_native(state_dict: dict, num_frames: Optional[int] = None,
                       source: str = "released checkpoint") -> dict:
    """A state dict saved by the released AVIGATE code -> this codebase's names and shapes.

    Args:
        state_dict: released keys (optionally all under ``module.``) -> tensors.
        num_frames: rows of the frame position table to keep (the model's F); None keeps all.
        source: what to name in error messages (e.g. the file path).

    Returns:
        our key -> fp32 (floating-point) tensor.

    Raises:
        ReleasedCheckpointError: listing the missing and unexpected released keys and the
            expected layout, or naming a frame position table shorter than ``num_frames``.
    """
    state_dict = strip_wrapper_prefix(state_dict)
    missing, unexpected = layout_problems(state_dict)
    if missing or unexpected:
        _raise(source, "not a complete checkpoint of the released AVIGATE code",
               [("missing keys", missing), ("unexpected keys", unexpected)])
    converted = {}
    for key, value in state_dict.items():
        name = native_key(key)
        if not name:
            continue
        transform = SINGLE_KEYS[key][1] if key in SINGLE_KEYS else None
        if transform is not None:
            if value.dim() != 2:
                raise ReleasedCheckpointError(f"{source}: {key} must be a matrix, got shape "
                                              f"{tuple(value.shape)}\n{EXPECTED_LAYOUT}")
            value = transform(value)
        if key == FRAME_POSITION_RELEASED and num_frames is not None:
            if value.shape[0] < num_frames:
                raise ReleasedCheckpointError(
                    f"{source}: {key} has {value.shape[0]} rows, fewer than the model's "
                    f"--max_frames {num_frames}; lower --max_frames")
            value = value[:num_frames]
        converted[name] = value.float() if value.is_floating_point() else value
    return converted


def load_released_checkpoint(model: nn.Module, state_dict: dict,
                             source: str = "released checkpoint") -> None:
    """Convert a released-layout state dict and load every tensor of ``model`` from it.

    Raises:
        ReleasedCheckpointError: keys the model needs that the checkpoint lacks, keys it has
            that the model does not, and shape mismatches, all in the released names, with
            the expected layout.
    """
    frame_position = getattr(getattr(model, "fusion", None), "frame_position", None)
    num_frames = frame_position.shape[0] if frame_position is not None else None
    converted = released_to_native(state_dict, num_frames=num_frames, source=source)
    expected = model.state_dict()
    missing = [released_key(k) for k in expected if k not in converted]
    unexpected = [released_key(k) for k in converted if k not in expected]
    mis_shaped = [f"{released_key(k)}: converted {tuple(converted[k].shape)}, model {tuple(v.shape)}"
                  for k, v in expected.items() if k in converted and converted[k].shape != v.shape]
    if missing or unexpected or mis_shaped:
        _raise(source, "a released AVIGATE checkpoint that does not match the model built from "
                       "the flags (check --max_frames, --cross_num_hidden_layers, "
                       "--audio_query_layers, --pretrained_clip_name, --gate, the text flags)",
               [("missing keys", missing), ("unexpected keys", unexpected),
                ("shape mismatches (after conversion)", mis_shaped)])
    model.load_state_dict(converted, strict=True)
