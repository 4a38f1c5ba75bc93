"""Write randomly initialized tiny CLIP and AST checkpoints in the released file formats.

The synthetic benchmark (synthetic/demo.py) trains from these files instead of OpenAI's CLIP and
the AST authors' AudioSet checkpoint, so the demo goes through the real loading code:

    clip_tiny.pt    a plain CLIP state dict with OpenAI's key names (``visual.conv1.weight``,
                    ``transformer.resblocks.N.*`` ...), read by ``modules.clip.load_clip_state_dict``
                    and ``CLIP.from_state_dict``; embed_dim equals the text width, so the text
                    layers can initialize the resampler and fusion blocks (docs/design.md §7).
    ast_tiny.pth    the AudioSet checkpoint format (DataParallel ``module.v.*`` trunk plus the
                    ``module.mlp_head.*`` classifier), read by ``modules.ast.AST.from_checkpoint``.

Usage:

    python -m synthetic.make_tiny_checkpoints --out_dir demo_runs/checkpoints --seed 0
"""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict, dataclass
from typing import Optional, Sequence

import torch
from torch import nn

from atomic_io import save_torch
from modules.ast import AST, DATAPARALLEL_PREFIX, DEIT_HEAD_DIM, DEIT_LN_EPS, TRUNK_PREFIX, ASTConfig
from modules.clip import CLIP, HEAD_WIDTH, CLIPConfig

CLIP_FILE = "clip_tiny.pt"
AST_FILE = "ast_tiny.pth"
# The AudioSet classifier of the released checkpoint: LayerNorm then Linear over 527 classes.
AUDIOSET_CLASSES = 527
HEAD_PREFIX = "mlp_head."


@dataclass
class TinyCheckpointConfig:
    """Sizes of the tiny towers (every field is a CLI flag of the same name).

    Args:
        width: CLIP text width = joint width D = vision width (a multiple of 64: one head per 64).
        clip_layers: blocks per CLIP tower; must be >= the fusion and resampler layers that
            copy CLIP's text layers.
        image_resolution / patch_size: CLIP input side and patch side in pixels.
        context_length: CLIP text positions (>= --max_words, >= --max_frames).
        ast_width / ast_depth: AST trunk width (a multiple of 64) and blocks.
        seed: random initialization.
    """

    width: int = 64
    clip_layers: int = 2
    image_resolution: int = 32
    patch_size: int = 8
    context_length: int = 32
    ast_width: int = 64
    ast_depth: int = 2
    seed: int = 0

    def clip_config(self) -> CLIPConfig:
        return CLIPConfig(embed_dim=self.width, image_resolution=self.image_resolution,
                          vision_layers=self.clip_layers, vision_width=self.width,
                          vision_patch_size=self.patch_size, context_length=self.context_length,
                          transformer_width=self.width, transformer_heads=self.width // HEAD_WIDTH,
                          transformer_layers=self.clip_layers)

    def ast_config(self) -> ASTConfig:
        if self.ast_width < DEIT_HEAD_DIM or self.ast_width % DEIT_HEAD_DIM:
            raise ValueError(f"--ast_width {self.ast_width} must be a positive multiple of {DEIT_HEAD_DIM} "
                             "(the head count is read back from checkpoints as width / 64)")
        return ASTConfig(embed_dim=self.ast_width, depth=self.ast_depth,
                         num_heads=self.ast_width // DEIT_HEAD_DIM)


def audioset_head(width: int, num_classes: int) -> nn.Sequential:
    """The AST classifier: LayerNorm then Linear (keys ``0.*`` and ``1.*`` under ``mlp_head.``).

    Args:
        width: AST token width W; num_classes: output classes.
    """
    return nn.Sequential(nn.LayerNorm(width, eps=DEIT_LN_EPS), nn.Linear(width, num_classes))


def ast_to_audioset_checkpoint(trunk_state: dict, head_state: dict) -> dict:
    """Pure converter, the inverse of ``modules.ast.audioset_checkpoint_to_ast``.

    Args:
        trunk_state: ``AST.state_dict()`` (patch_embed, tokens, pos_embed, blocks, norm).
        head_state: the classifier's state dict (``audioset_head``).
    Returns: ``module.v.<trunk key>`` and ``module.mlp_head.<head key>`` -> cloned tensors.
    """
    out = {f"{DATAPARALLEL_PREFIX}{TRUNK_PREFIX}{key}": value.detach().clone()
           for key, value in trunk_state.items()}
    out.update({f"{DATAPARALLEL_PREFIX}{HEAD_PREFIX}{key}": value.detach().clone()
                for key, value in head_state.items()})
    return out


def make_tiny_checkpoints(out_dir: str, cfg: TinyCheckpointConfig) -> dict:
    """Write clip_tiny.pt and ast_tiny.pth under out_dir; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    torch.manual_seed(cfg.seed)
    clip = CLIP(cfg.clip_config())
    ast = AST(cfg.ast_config())
    head = audioset_head(cfg.ast_width, AUDIOSET_CLASSES)
    paths = {"clip": os.path.join(out_dir, CLIP_FILE), "ast": os.path.join(out_dir, AST_FILE)}
    save_torch(clip.state_dict(), paths["clip"])
    save_torch(ast_to_audioset_checkpoint(ast.state_dict(), head.state_dict()), paths["ast"])
    return paths


def parse_args(argv: Optional[Sequence[str]]) -> tuple[str, TinyCheckpointConfig]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out_dir", required=True, help="folder for clip_tiny.pt and ast_tiny.pth")
    for name, value in asdict(TinyCheckpointConfig()).items():
        parser.add_argument(f"--{name}", type=type(value), default=value, help=f"default: {value}")
    args = vars(parser.parse_args(argv))
    out_dir = args.pop("out_dir")
    return out_dir, TinyCheckpointConfig(**args)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    out_dir, cfg = parse_args(argv)
    paths = make_tiny_checkpoints(out_dir, cfg)
    print(json.dumps(paths))
    return paths


if __name__ == "__main__":
    main()
