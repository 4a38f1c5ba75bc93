"""The frozen Audio Spectrogram Transformer (AST) that turns a log-mel fbank into audio tokens.

docs/design.md §1: a DeiT-base distilled trunk over the 128 x 1024 spectrogram cut into 16 x 16
patches with frequency and time stride 10 (12 x 101 = 1212 patches), plus CLS and
distillation tokens. ``AST.tokens`` returns the mean of the CLS and distillation outputs
followed by the 1212 patch outputs (1213 tokens) *before* the final LayerNorm: the trunk
is frozen (so its tokens can be cached once per clip, see dataloaders/audio_cache.py)
while ``AST.norm`` stays trainable.

Weights come from the AST authors' released AudioSet checkpoint through the pure
converter ``audioset_checkpoint_to_ast`` followed by a strict load. The same weights in
transformers' layout (``ASTModel`` / ``ASTForAudioClassification`` state dicts, .bin or
.safetensors, e.g. MIT/ast-finetuned-audioset-10-10-0.4593) go through ``hf_ast_to_trunk``;
``checkpoint_to_trunk`` picks the converter. Finding or downloading the released file is
modules/weights.py's job.

Shapes: B batch, A audio tokens (1 + patches), W width.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, replace
from functools import partial
from typing import Optional, Union

import torch
from timm.models.vision_transformer import Block
from torch import nn

from modules.layers import LayerNorm

# DeiT (and so AST) LayerNorms use this epsilon.
DEIT_LN_EPS = 1e-6
# DeiT's head width (tiny 192/3, small 384/6, base 768/12): the head count is not stored
# in a state dict, so it is inferred as width / this.
DEIT_HEAD_DIM = 64
# CLS and distillation tokens precede the patch tokens.
NUM_PREFIX_TOKENS = 2
# DeiT's initialization of the learned tokens and position embeddings.
TOKEN_INIT_STD = 0.02

CHECKPOINT_NAME = "audioset_10_10_0.4593.pth"
CHECKPOINT_SOURCE = (
    f"the AST authors' released AudioSet checkpoint '{CHECKPOINT_NAME}' "
    "(linked from the README of the AST repository, github.com/YuanGongND/ast)")
# Checkpoint entries that are not part of the trunk: the DataParallel wrapper prefix is
# stripped first, then these prefixes are dropped (AudioSet classifier, ImageNet heads).
DATAPARALLEL_PREFIX = "module."
TRUNK_PREFIX = "v."
DROPPED_PREFIXES = ("mlp_head.", "v.head.", "v.head_dist.")
SAFETENSORS_SUFFIX = ".safetensors"

# transformers' AST naming -> ours. The classification model nests the trunk under
# HF_MODEL_PREFIX and adds an AudioSet head (dropped). Block keys exist in two spellings:
# saved files (``encoder.layer.N.attention.attention.query`` ..., every transformers
# version's save_pretrained) and transformers 5's modules (``layers.N.attention.q_proj`` ...).
HF_MODEL_PREFIX = "audio_spectrogram_transformer."
HF_DROPPED_PREFIXES = ("classifier.",)
HF_MARKER_KEY = "embeddings.cls_token"
HF_TOP_LEVEL = {
    "embeddings.cls_token": "cls_token",
    "embeddings.distillation_token": "dist_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}
HF_BLOCK_KEY = re.compile(r"^(?:encoder\.layer|layers)\.(\d+)\.(.+)\.(weight|bias)$")
HF_BLOCK_MODULES = {
    "layernorm_before": "norm1", "layernorm_after": "norm2",
    "attention.output.dense": "attn.proj", "attention.o_proj": "attn.proj",
    "intermediate.dense": "mlp.fc1", "mlp.fc1": "mlp.fc1",
    "output.dense": "mlp.fc2", "mlp.fc2": "mlp.fc2",
}
# Separate q/k/v projections, concatenated in this order into timm's fused qkv.
HF_QKV_MODULES = {
    "attention.attention.query": "q", "attention.attention.key": "k", "attention.attention.value": "v",
    "attention.q_proj": "q", "attention.k_proj": "k", "attention.v_proj": "v",
}
QKV_ORDER = "qkv"


@dataclass
class ASTConfig:
    """Size of the AST trunk and of the spectrogram it reads.

    Args:
        embed_dim: token width W.
        depth: number of transformer blocks.
        num_heads: attention heads per block.
        mlp_ratio: MLP hidden width / W.
        patch_size: square patch side (mel bins and frames).
        freq_stride: patch stride along the mel axis.
        time_stride: patch stride along the time axis.
        num_mel_bins: mel bins of the input fbank.
        target_frames: frames of the input fbank.
    """

    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    patch_size: int = 16
    freq_stride: int = 10
    time_stride: int = 10
    num_mel_bins: int = 128
    target_frames: int = 1024

    @classmethod
    def tiny(cls) -> "ASTConfig":
        """A narrow, shallow trunk over the full-size spectrogram, for fast tests.

        Heads keep DeiT's width 64, so the config inferred from a tiny checkpoint is this one.
        """
        return cls(embed_dim=2 * DEIT_HEAD_DIM, depth=2, num_heads=2)

    @property
    def freq_patches(self) -> int:
        return (self.num_mel_bins - self.patch_size) // self.freq_stride + 1

    @property
    def time_patches(self) -> int:
        return (self.target_frames - self.patch_size) // self.time_stride + 1

    @property
    def num_patches(self) -> int:
        return self.freq_patches * self.time_patches

    @property
    def num_output_tokens(self) -> int:
        """A: the pooled CLS/distillation token plus one token per patch."""
        return 1 + self.num_patches


class SpectrogramPatchEmbed(nn.Module):
    """Overlapping patches of the spectrogram, linearly embedded (a strided Conv2d).

    Args:
        cfg: the AST configuration (patch size, strides, width).
    """

    def __init__(self, cfg: ASTConfig):
        super().__init__()
        self.proj = nn.Conv2d(1, cfg.embed_dim, kernel_size=cfg.patch_size,
                              stride=(cfg.freq_stride, cfg.time_stride))

    def forward(self, fbank: torch.Tensor) -> torch.Tensor:
        """fbank [B, T, M] (frames, mel bins) -> patches [B, P, W], mel-major order."""
        image = fbank.transpose(1, 2).unsqueeze(1)  # [B, 1, M, T]: mel is the image height
        return self.proj(image).flatten(2).transpose(1, 2)


class AST(nn.Module):
    """AST trunk (frozen unless --train_ast turns its requires_grad on) plus its final LayerNorm
    (trainable).

    ``norm`` (layers.LayerNorm) computes in fp32 and returns its input's dtype, so it takes
    fp16 tokens read from the cache as they are.

    Args:
        cfg: trunk and spectrogram sizes.
    """

    def __init__(self, cfg: ASTConfig):
        super().__init__()
        self.cfg = cfg
        width = cfg.embed_dim
        self.patch_embed = SpectrogramPatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.dist_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, NUM_PREFIX_TOKENS + cfg.num_patches, width))
        self.blocks = nn.ModuleList([
            Block(width, cfg.num_heads, mlp_ratio=cfg.mlp_ratio, qkv_bias=True,
                  norm_layer=partial(nn.LayerNorm, eps=DEIT_LN_EPS))
            for _ in range(cfg.depth)])
        self.norm = LayerNorm(width, eps=DEIT_LN_EPS)
        for param in (self.cls_token, self.dist_token, self.pos_embed):
            nn.init.trunc_normal_(param, std=TOKEN_INIT_STD)
        for param in self.trunk_parameters():
            param.requires_grad_(False)
        self.train()

    def trunk_modules(self) -> list[nn.Module]:
        """Everything but the final LayerNorm: the frozen part."""
        return [self.patch_embed, self.blocks]

    def trunk_parameters(self) -> list[nn.Parameter]:
        """Parameters of the frozen part (learned tokens, position embeddings, modules)."""
        params = [self.cls_token, self.dist_token, self.pos_embed]
        for module in self.trunk_modules():
            params.extend(module.parameters())
        return params

    def train(self, mode: bool = True) -> "AST":
        """Switch the trainable norm; the frozen trunk always stays in eval mode."""
        super().train(mode)
        for module in self.trunk_modules():
            module.eval()
        return self

    @property
    def trunk_trainable(self) -> bool:
        """Whether the trunk learns (``--train_ast`` turns its requires_grad on)."""
        return self.pos_embed.requires_grad

    def tokens(self, fbank: torch.Tensor) -> torch.Tensor:
        """Trunk output before the final LayerNorm; without gradient while the trunk is frozen.

        no_grad rather than inference_mode: the tokens feed ``norm`` and later layers that
        are trained, which inference tensors cannot.

        Args:
            fbank: normalized log-mel fbank [B, T, M] (T = target_frames, M = num_mel_bins).
        Returns:
            tokens [B, A, W]: mean(CLS, distillation) output, then the patch outputs.
        """
        expected = (self.cfg.target_frames, self.cfg.num_mel_bins)
        if fbank.dim() != 3 or tuple(fbank.shape[1:]) != expected:
            raise ValueError(f"AST.tokens expects fbank [B, {expected[0]}, {expected[1]}], "
                             f"got {tuple(fbank.shape)}")
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.trunk_trainable):
            x = self.patch_embed(fbank.to(self.pos_embed.dtype))  # [B, P, W]
            batch = x.shape[0]
            prefix = torch.cat([self.cls_token, self.dist_token], dim=1).expand(batch, -1, -1)
            x = torch.cat([prefix, x], dim=1) + self.pos_embed  # [B, 2 + P, W]
            for block in self.blocks:
                x = block(x)
            pooled = x[:, :NUM_PREFIX_TOKENS].mean(dim=1, keepdim=True)  # [B, 1, W]
            return torch.cat([pooled, x[:, NUM_PREFIX_TOKENS:]], dim=1)

    def forward(self, fbank: torch.Tensor) -> torch.Tensor:
        """fbank [B, T, M] -> normalized tokens [B, A, W] (trunk, then the trainable norm)."""
        return self.norm(self.tokens(fbank))

    @classmethod
    def from_checkpoint(cls, path_or_state_dict: Union[str, os.PathLike, dict],
                        cfg: Optional[ASTConfig] = None) -> "AST":
        """Build the AST from the released AudioSet checkpoint (a path or its state dict).

        Args:
            path_or_state_dict: path of ``audioset_10_10_0.4593.pth`` (or a file in the same
                format, or a transformers AST .bin/.safetensors file), or the loaded state dict.
            cfg: trunk configuration; inferred from the weight shapes when None (heads as
                width / 64, spectrogram size and strides from the defaults).
        """
        state_dict = path_or_state_dict
        if not isinstance(state_dict, dict):
            state_dict = load_audioset_checkpoint(path_or_state_dict)
        weights = checkpoint_to_trunk(state_dict)
        cfg = cfg or config_from_weights(weights)
        model = cls(cfg)
        load_strict(model, weights)
        return model


def load_audioset_checkpoint(path: Union[str, os.PathLike]) -> dict:
    """Read a checkpoint file (torch or .safetensors) on the CPU, with clear messages when it
    is missing or a folder. The state dict comes back as stored (see ``checkpoint_to_trunk``)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(
            f"AST checkpoint '{path}' is a folder; pass the weights file inside it (a transformers "
            "folder holds model.safetensors or pytorch_model.bin)")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"AST checkpoint not found: '{path}'. Download {CHECKPOINT_SOURCE} and pass its "
            "path.")
    if path.endswith(SAFETENSORS_SUFFIX):
        from safetensors.torch import load_file

        return load_file(path, device="cpu")
    return torch.load(path, map_location="cpu", weights_only=True)


def is_transformers_ast(state_dict: dict) -> bool:
    """Whether a state dict uses transformers' AST names (``[audio_spectrogram_transformer.]embeddings.*``)."""
    return any(key.endswith(HF_MARKER_KEY) for key in state_dict)


def checkpoint_to_trunk(state_dict: dict) -> dict:
    """Any supported AST state dict (released AudioSet format or transformers') -> this module's."""
    if is_transformers_ast(state_dict):
        return hf_ast_to_trunk(state_dict)
    return audioset_checkpoint_to_ast(state_dict)


def hf_ast_to_trunk(state_dict: dict) -> dict:
    """transformers ``ASTModel`` / ``ASTForAudioClassification`` state dict -> this module's.

    Same tensors under other names; the separate q/k/v projections of each block are
    concatenated (q, k, v) into timm's ``attn.qkv``; the classifier is dropped and
    floating-point weights become fp32. Our LayerNorms keep DeiT's eps (1e-6, the original
    AST's) whatever transformers' config says.
    """
    weights, qkv = {}, {}
    for key, value in state_dict.items():
        key = key[len(HF_MODEL_PREFIX):] if key.startswith(HF_MODEL_PREFIX) else key
        if key.startswith(HF_DROPPED_PREFIXES):
            continue
        if key in HF_TOP_LEVEL:
            weights[HF_TOP_LEVEL[key]] = value
            continue
        match = HF_BLOCK_KEY.match(key)
        if match is None or match.group(2) not in {**HF_BLOCK_MODULES, **HF_QKV_MODULES}:
            raise KeyError(f"unexpected key {key!r} in a transformers AST state dict")
        index, module, kind = match.groups()
        if module in HF_QKV_MODULES:
            qkv.setdefault((index, kind), {})[HF_QKV_MODULES[module]] = value
        else:
            weights[f"blocks.{index}.{HF_BLOCK_MODULES[module]}.{kind}"] = value
    for (index, kind), parts in qkv.items():
        if set(parts) != set(QKV_ORDER):
            raise KeyError(f"transformers AST block {index}: attention {kind} lacks "
                           f"{sorted(set(QKV_ORDER) - set(parts))} of the q/k/v projections")
        weights[f"blocks.{index}.attn.qkv.{kind}"] = torch.cat([parts[p] for p in QKV_ORDER], dim=0)
    return {key: value.float() if value.is_floating_point() else value for key, value in weights.items()}


def audioset_checkpoint_to_ast(state_dict: dict) -> dict:
    """Released AudioSet checkpoint (DataParallel, ``module.v.*``) -> this module's state dict.

    Drops the AudioSet classifier and the unused ImageNet heads, strips the ``module.`` and
    ``v.`` prefixes and casts floating-point weights (possibly fp16) to fp32. Keys already in
    this module's naming (e.g. from ``hf_ast_to_trunk``) pass through unchanged.
    """
    weights = {}
    for key, value in state_dict.items():
        if key.startswith(DATAPARALLEL_PREFIX):
            key = key[len(DATAPARALLEL_PREFIX):]
        if key.startswith(DROPPED_PREFIXES):
            continue
        if key.startswith(TRUNK_PREFIX):
            key = key[len(TRUNK_PREFIX):]
        weights[key] = value.float() if value.is_floating_point() else value
    return weights


def config_from_weights(weights: dict) -> ASTConfig:
    """Infer width, depth, MLP ratio and patch size from converted weights (see from_checkpoint)."""
    required = ("patch_embed.proj.weight", "pos_embed", "blocks.0.mlp.fc1.weight")
    missing = [key for key in required if key not in weights]
    if missing:
        raise KeyError(f"not an AST AudioSet checkpoint: missing {missing} (after stripping "
                       f"'{DATAPARALLEL_PREFIX}{TRUNK_PREFIX}'); expected {CHECKPOINT_SOURCE}")
    width, _, patch, _ = weights["patch_embed.proj.weight"].shape
    depth = 1 + max(int(key.split(".")[1]) for key in weights if key.startswith("blocks."))
    hidden = weights["blocks.0.mlp.fc1.weight"].shape[0]
    cfg = replace(ASTConfig(), embed_dim=width, depth=depth,
                  num_heads=max(1, width // DEIT_HEAD_DIM), mlp_ratio=hidden / width,
                  patch_size=patch)
    positions = weights["pos_embed"].shape[1]
    if positions != NUM_PREFIX_TOKENS + cfg.num_patches:
        raise ValueError(
            f"checkpoint pos_embed has {positions} positions but a {cfg.num_mel_bins} x "
            f"{cfg.target_frames} spectrogram with stride ({cfg.freq_stride}, {cfg.time_stride}) "
            f"needs {NUM_PREFIX_TOKENS + cfg.num_patches}; pass a matching ASTConfig")
    return cfg


def load_strict(model: AST, weights: dict) -> None:
    """Load every tensor of the trunk and norm, failing with the missing/unexpected keys."""
    result = model.load_state_dict(weights, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise RuntimeError(f"AST checkpoint does not match the model: missing keys "
                           f"{result.missing_keys}, unexpected keys {result.unexpected_keys}")
