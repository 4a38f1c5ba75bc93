"""OpenAI CLIP's image and text towers, and loading of OpenAI's released weights (docs/design.md §1, §11).

Parameter names are exactly OpenAI's (``visual.conv1.weight``, ``transformer.resblocks.N.*``,
``ln_final``, ``text_projection``, ``logit_scale`` ...), so a released state dict loads with
``strict=True`` and nothing is renamed. The architecture is read off the state dict's
shapes (``config_from_state_dict``), so ViT-B/32, ViT-B/16 and test-sized models share
one code path. Heads follow OpenAI's rule: width // 64 in both towers. open_clip state
dicts (``text.*`` text towers, .safetensors files) are converted to OpenAI's names on load
(``open_clip_to_openai``); finding or downloading the released files is modules/weights.py's job.

Shapes: N images or texts, L tokens, P = grid² patches, W tower width, D joint width.
"""
from __future__ import annotations

import math
import os
import pickle
import re
import warnings
import zipfile
from dataclasses import dataclass
from typing import Union

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from modules.layers import CLIP_LN_EPS, LayerNorm, QuickGELU, ResidualAttentionBlock

HEAD_WIDTH = 64  # OpenAI: num_heads = width // 64
MLP_RATIO = 4.0
INIT_LOGIT_SCALE = math.log(1 / 0.07)
TOKEN_EMBEDDING_INIT_STD = 0.02
TEXT_POSITION_INIT_STD = 0.01
# Entries of OpenAI's TorchScript archives that are model metadata, not weights.
ARCHIVE_METADATA_KEYS = ("input_resolution", "context_length", "vocab_size")
# Containers other training code wraps a state dict in, and DataParallel's key prefix.
STATE_DICT_WRAPPER_KEYS = ("state_dict", "model")
DATA_PARALLEL_PREFIX = "module."
# open_clip's CustomTextCLIP keeps the text tower under this prefix.
OPEN_CLIP_TEXT_PREFIX = "text."
SAFETENSORS_SUFFIX = ".safetensors"
MODULES_DIR = os.path.dirname(os.path.abspath(__file__))
RELEASED_CHECKPOINTS = {"ViT-B/32": "ViT-B-32.pt", "ViT-B/16": "ViT-B-16.pt"}

PathLike = Union[str, os.PathLike]


@dataclass
class CLIPConfig:
    """CLIP architecture (defaults: ViT-B/32). Heads are width // 64 (OpenAI's rule)."""

    embed_dim: int = 512
    image_resolution: int = 224
    vision_layers: int = 12
    vision_width: int = 768
    vision_patch_size: int = 32
    context_length: int = 77
    vocab_size: int = 49408
    transformer_width: int = 512
    transformer_heads: int = 8
    transformer_layers: int = 12

    def __post_init__(self):
        for name in ("vision_width", "transformer_width"):
            width = getattr(self, name)
            if width < HEAD_WIDTH or width % HEAD_WIDTH:
                raise ValueError(f"CLIPConfig.{name}={width} must be a positive multiple of "
                                 f"{HEAD_WIDTH} (OpenAI's rule: heads = width // {HEAD_WIDTH})")
        if self.transformer_heads != self.transformer_width // HEAD_WIDTH:
            raise ValueError(f"CLIPConfig.transformer_heads={self.transformer_heads} breaks OpenAI's rule "
                             f"heads = width // {HEAD_WIDTH} (transformer_width={self.transformer_width})")
        if self.image_resolution % self.vision_patch_size:
            raise ValueError(f"CLIPConfig.image_resolution={self.image_resolution} is not a multiple "
                             f"of vision_patch_size={self.vision_patch_size}")

    @property
    def vision_heads(self) -> int:
        return self.vision_width // HEAD_WIDTH

    @classmethod
    def tiny(cls) -> "CLIPConfig":
        """A test-sized CLIP (32 px images, 8 px patches, width 64, 2 layers per tower).

        embed_dim equals the text width, as in ViT-B, so text layers copy into fusion blocks.
        """
        return cls(embed_dim=64, image_resolution=32, vision_layers=2, vision_width=64,
                   vision_patch_size=8, context_length=32, vocab_size=49408,
                   transformer_width=64, transformer_heads=1, transformer_layers=2)


class Transformer(nn.Module):
    """A stack of CLIP blocks, stored as ``resblocks`` (OpenAI's name).

    Args:
        width: token width W.
        layers: number of blocks.
        heads: attention heads.
        causal: whether every block masks attention to later tokens (the text tower).
    """

    def __init__(self, width: int, layers: int, heads: int, causal: bool):
        super().__init__()
        self.causal = causal
        self.grad_checkpointing = False
        self.resblocks = nn.ModuleList(
            ResidualAttentionBlock(width, heads, MLP_RATIO, QuickGELU, CLIP_LN_EPS) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, L, W] -> [N, L, W]."""
        recompute = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.resblocks:
            if recompute:
                x = checkpoint(block, x, None, self.causal, use_reentrant=False)
            else:
                x = block(x, causal=self.causal)
        return x


class VisionTransformer(nn.Module):
    """CLIP's image tower: 2-D patches + CLS -> transformer -> ln_post(CLS) @ proj.

    Args:
        input_resolution: image side in pixels.
        patch_size: patch side in pixels (conv1 kernel and stride).
        width: token width W.
        layers: number of transformer blocks.
        heads: attention heads.
        output_dim: joint embedding width D.
    """

    def __init__(self, input_resolution: int, patch_size: int, width: int, layers: int,
                 heads: int, output_dim: int):
        super().__init__()
        self.input_resolution = input_resolution
        grid = input_resolution // patch_size
        scale = width ** -0.5
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(grid * grid + 1, width))
        self.ln_pre = LayerNorm(width, eps=CLIP_LN_EPS)
        self.transformer = Transformer(width, layers, heads, causal=False)
        self.ln_post = LayerNorm(width, eps=CLIP_LN_EPS)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images [N, 3, H, W] (H = W = input_resolution, CLIP-normalized) -> [N, D]."""
        if images.shape[-2:] != (self.input_resolution, self.input_resolution):
            raise ValueError(f"images are {tuple(images.shape[-2:])} pixels; this CLIP expects "
                             f"{self.input_resolution}x{self.input_resolution}")
        x = self.conv1(images.to(self.conv1.weight.dtype))      # [N, W, grid, grid]
        x = x.flatten(2).transpose(1, 2)                          # [N, P, W]
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)  # [N, 1 + P, W]
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(x[:, 0]) @ self.proj


class CLIP(nn.Module):
    """OpenAI CLIP: ``visual`` (image tower) plus the text tower's parameters at top level.

    Args:
        cfg: the architecture (``config_from_state_dict`` reads it off released weights).
    """

    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.cfg = cfg
        self.visual = VisionTransformer(cfg.image_resolution, cfg.vision_patch_size, cfg.vision_width,
                                        cfg.vision_layers, cfg.vision_heads, cfg.embed_dim)
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.transformer_width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, cfg.transformer_width))
        self.transformer = Transformer(cfg.transformer_width, cfg.transformer_layers,
                                       cfg.transformer_heads, causal=True)
        self.ln_final = LayerNorm(cfg.transformer_width, eps=CLIP_LN_EPS)
        self.text_projection = nn.Parameter(torch.empty(cfg.transformer_width, cfg.embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(INIT_LOGIT_SCALE))
        self._init_text_parameters()

    def _init_text_parameters(self):
        """OpenAI's initialisation of the text tower (residual projections scaled by depth)."""
        width, layers = self.cfg.transformer_width, self.cfg.transformer_layers
        nn.init.normal_(self.token_embedding.weight, std=TOKEN_EMBEDDING_INIT_STD)
        nn.init.normal_(self.positional_embedding, std=TEXT_POSITION_INIT_STD)
        attn_std, fc_std = width ** -0.5, (2 * width) ** -0.5
        proj_std = attn_std * (2 * layers) ** -0.5
        for block in self.transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(self.text_projection, std=attn_std)

    @classmethod
    def from_state_dict(cls, state_dict: dict[str, torch.Tensor]) -> "CLIP":
        """Build the architecture the state dict describes and load it strictly, in fp32.

        The model is built on the meta device (no random init of weights about to be
        replaced) and takes fp32 copies of the given tensors.
        """
        with torch.device("meta"):
            model = cls(config_from_state_dict(state_dict))
        expected = {k: v.shape for k, v in model.state_dict().items()}
        problems = state_dict_problems(expected, state_dict)
        if problems:
            raise ValueError("state dict does not fit the CLIP its shapes describe:\n  " + "\n  ".join(problems))
        weights = {k: v.to(torch.float32, copy=True) for k, v in state_dict.items()}
        model.load_state_dict(weights, strict=True, assign=True)
        return model

    def set_grad_checkpointing(self, enable: bool = True):
        """Recompute block activations in backward (training only) to save memory."""
        self.visual.transformer.grad_checkpointing = enable
        self.transformer.grad_checkpointing = enable

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """images [N, 3, H, W] -> embeddings [N, D] (not normalized)."""
        return self.visual(images)

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [N, L] (L <= context_length, [sot] ... [eot] then zeros) -> embeddings [N, D].

        The causal mask keeps padding after the end token from reaching it, so any L up to
        the context length gives the same embedding.
        """
        n, length = ids.shape
        if length > self.cfg.context_length:
            raise ValueError(f"{length} text tokens exceed this CLIP's context length "
                             f"{self.cfg.context_length}; lower --max_words")
        x = self.token_embedding(ids) + self.positional_embedding[:length]   # [N, L, W]
        x = self.ln_final(self.transformer(x))
        eot = ids.argmax(dim=-1)  # the end token has the largest id
        return x[torch.arange(n, device=ids.device), eot] @ self.text_projection


def _block_count(state_dict: dict[str, torch.Tensor], prefix: str) -> int:
    """1 + the highest block index under ``prefix`` (0 if none); gaps surface as missing keys."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    indices = [int(m.group(1)) for m in map(pattern.match, state_dict) if m]
    return max(indices) + 1 if indices else 0


# Keys the architecture is read from, with their number of dimensions.
CONFIG_KEYS = {"visual.conv1.weight": 4, "visual.positional_embedding": 2, "text_projection": 2,
               "positional_embedding": 2, "token_embedding.weight": 2, "ln_final.weight": 1}


def config_from_state_dict(state_dict: dict[str, torch.Tensor]) -> CLIPConfig:
    """Read the CLIP architecture off a state dict's shapes (OpenAI's naming)."""
    missing = [k for k in CONFIG_KEYS if k not in state_dict]
    offending = [f"{k} has shape {tuple(state_dict[k].shape)}, expected {n} dimensions"
                 for k, n in CONFIG_KEYS.items() if k in state_dict and state_dict[k].dim() != n]
    vision_layers = _block_count(state_dict, "visual.transformer.resblocks.")
    text_layers = _block_count(state_dict, "transformer.resblocks.")
    if not vision_layers:
        missing.append("visual.transformer.resblocks.0.*")
    if not text_layers:
        missing.append("transformer.resblocks.0.*")
    if missing or offending:
        raise ValueError(f"state dict is not an OpenAI-format CLIP: missing keys {missing}; "
                         f"offending keys {offending}")
    conv = state_dict["visual.conv1.weight"]
    num_positions = state_dict["visual.positional_embedding"].shape[0]
    grid = math.isqrt(num_positions - 1)
    if grid * grid != num_positions - 1 or conv.shape[-1] != conv.shape[-2]:
        raise ValueError(
            "state dict is not an OpenAI-format CLIP: offending keys "
            f"['visual.positional_embedding' with {num_positions} rows (must be grid² + 1), "
            f"'visual.conv1.weight' with shape {tuple(conv.shape)} (square patches)]")
    width = state_dict["ln_final.weight"].shape[0]
    return CLIPConfig(
        embed_dim=state_dict["text_projection"].shape[1],
        image_resolution=grid * conv.shape[-1],
        vision_layers=vision_layers,
        vision_width=conv.shape[0],
        vision_patch_size=conv.shape[-1],
        context_length=state_dict["positional_embedding"].shape[0],
        vocab_size=state_dict["token_embedding.weight"].shape[0],
        transformer_width=width,
        transformer_heads=width // HEAD_WIDTH,
        transformer_layers=text_layers,
    )


def state_dict_problems(expected: dict[str, torch.Size], state_dict: dict[str, torch.Tensor]) -> list[str]:
    """Missing keys, unexpected keys and shape mismatches of ``state_dict`` against ``expected``."""
    missing = sorted(k for k in expected if k not in state_dict)
    unexpected = sorted(k for k in state_dict if k not in expected)
    mismatched = [f"{k}: shape {tuple(state_dict[k].shape)}, expected {tuple(expected[k])}"
                  for k in expected if k in state_dict and state_dict[k].shape != expected[k]]
    problems = [f"missing key {k}" for k in missing] + [f"unexpected key {k}" for k in unexpected]
    return problems + [f"offending key {m}" for m in mismatched]


def unwrap_state_dict(checkpoint_obj: dict) -> dict[str, torch.Tensor]:
    """Pure converter: a saved checkpoint -> OpenAI-named fp32 weights.

    Unwraps {"state_dict": ...} / {"model": ...}, strips DataParallel's "module." prefix,
    drops the metadata entries of OpenAI's archives and converts fp16 weights to fp32.
    """
    for key in STATE_DICT_WRAPPER_KEYS:
        if isinstance(checkpoint_obj.get(key), dict):
            checkpoint_obj = checkpoint_obj[key]
            break
    weights = {}
    for key, value in checkpoint_obj.items():
        key = key[len(DATA_PARALLEL_PREFIX):] if key.startswith(DATA_PARALLEL_PREFIX) else key
        if key in ARCHIVE_METADATA_KEYS:
            continue
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"checkpoint entry {key!r} is a {type(value).__name__}, not a tensor; "
                             "expected a CLIP state dict")
        weights[key] = value.float() if value.is_floating_point() else value
    return weights


def open_clip_to_openai(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Pure converter: an open_clip state dict -> OpenAI key names.

    open_clip's ``CLIP`` (e.g. ``ViT-B-32-quickgelu``) already uses OpenAI's names
    (``visual.*``, ``transformer.resblocks.N.attn.in_proj_weight`` ...: checked against
    open_clip_torch 3.3); its ``CustomTextCLIP`` keeps the text tower under ``text.``
    (``text.token_embedding.weight``, ``text.transformer.*``, ``text.ln_final.*``,
    ``text.text_projection``), which moves back to the top level here. A text projection
    stored as a Linear (``text.text_projection.weight``, open_clip's ``proj_bias``) has no
    OpenAI counterpart and is refused. Only the key names are checked: a GELU (not
    QuickGELU) open_clip model loads but computes with OpenAI's QuickGELU, so convert only
    quickgelu models (OpenAI-trained weights are).
    """
    if any(key.startswith(OPEN_CLIP_TEXT_PREFIX + "text_projection.") for key in state_dict):
        raise ValueError("open_clip state dict has a Linear text projection (text.text_projection.weight); "
                         "OpenAI's CLIP has a bias-free projection matrix, so it cannot be converted")
    return {key[len(OPEN_CLIP_TEXT_PREFIX):] if key.startswith(OPEN_CLIP_TEXT_PREFIX) else key: value
            for key, value in state_dict.items()}


def resolve_checkpoint_path(name_or_path: PathLike) -> str:
    """"ViT-B/32" / "ViT-B/16" -> modules/ViT-B-32.pt / modules/ViT-B-16.pt; paths pass through."""
    name = os.fspath(name_or_path)
    if name in RELEASED_CHECKPOINTS:
        return os.path.join(MODULES_DIR, RELEASED_CHECKPOINTS[name])
    return name


def _missing_checkpoint_error(name_or_path: PathLike, path: str) -> FileNotFoundError:
    """Say which file was looked for, what it should be and where OpenAI's release puts it."""
    model = {file: name for name, file in RELEASED_CHECKPOINTS.items()}.get(os.path.basename(path))
    if model is None:
        expected = "an OpenAI CLIP archive (ViT-B-32.pt or ViT-B-16.pt) or a CLIP state-dict file"
        origin = 'clip.load("ViT-B/32") or clip.load("ViT-B/16")'
    else:
        expected = f"{RELEASED_CHECKPOINTS[model]}, OpenAI's released weights for {model}"
        origin = f'clip.load("{model}")'
    return FileNotFoundError(
        f"CLIP checkpoint not found: {path} (from {os.fspath(name_or_path)!r}). Expected {expected}: "
        f"the TorchScript archive that OpenAI's CLIP package downloads with {origin} and caches "
        f"under ~/.cache/clip/. Put the file at {path}; the names 'ViT-B/32' and 'ViT-B/16' "
        f"look for ViT-B-32.pt and ViT-B-16.pt in {MODULES_DIR}.")


def _is_torchscript_archive(path: str) -> bool:
    """TorchScript archives are zip files whose record folder holds constants.pkl."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.split("/", 1)[-1] == "constants.pkl" for name in archive.namelist())


def load_clip_state_dict(name_or_path: PathLike) -> dict[str, torch.Tensor]:
    """Released name, OpenAI TorchScript archive, or a state-dict file (.pt/.bin/.safetensors, OpenAI
    or open_clip names) -> fp32 OpenAI-named weights."""
    path = resolve_checkpoint_path(name_or_path)
    if not os.path.isfile(path):
        raise _missing_checkpoint_error(name_or_path, path)
    if path.endswith(SAFETENSORS_SUFFIX):
        from safetensors.torch import load_file

        checkpoint_obj = load_file(path, device="cpu")
    elif _is_torchscript_archive(path):
        with warnings.catch_warnings():
            # Reading OpenAI's archive format is deliberate; torch flags TorchScript as legacy.
            warnings.simplefilter("ignore", FutureWarning)
            checkpoint_obj = torch.jit.load(path, map_location="cpu").state_dict()
    else:
        try:
            checkpoint_obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            raise ValueError(f"{path} holds objects other than tensors; save only the CLIP state dict "
                             f"(torch.save(model.state_dict(), path))") from err
    if not isinstance(checkpoint_obj, dict):
        raise ValueError(f"{path} holds a {type(checkpoint_obj).__name__}, not a CLIP state dict")
    return open_clip_to_openai(unwrap_state_dict(checkpoint_obj))
