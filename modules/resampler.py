"""Audio resampler: Q learned queries read the projected AST tokens (docs/design.md §2).

Each block runs, on queries x and audio tokens a:

    x += MHSA(ln_1(x));  x += MHA(q=ln_3(x), k=v=ln_3(a));  x += FFN(ln_2(x))

``ln_1``/``attn``/``ln_2``/``mlp`` carry CLIP's names so CLIP's text layers copy into them
(docs/design.md §7); ``ln_3`` is one LayerNorm shared by the query and the audio side.

Shapes: B batch, A audio tokens, Q queries, D width.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from modules.layers import (TF_LN_EPS, LayerNorm, MultiheadAttention, NEW_WEIGHT_STD,
                            ResidualAttentionBlock, init_new_weights)

# CLIP's head width: ViT-B text layers use 512 / 8 = 64 dims per head.
HEAD_DIM = 64


def default_heads(width: int) -> int:
    """CLIP's head count for a width (width // 64), at least one head for tiny test widths."""
    return max(1, width // HEAD_DIM)


@dataclass
class ResamplerConfig:
    """Audio resampler settings.

    Args:
        width: joint width D (must equal the CLIP embedding width).
        num_queries: number of learned audio queries Q (12).
        layers: number of blocks (``--audio_query_layers``, 4).
        heads: attention heads; None = width // 64 (CLIP's text heads).
        mlp_ratio: FFN hidden width as a multiple of D.
        ln_eps: LayerNorm epsilon (the released recipe's 1e-12).
    """

    width: int = 512
    num_queries: int = 12
    layers: int = 4
    heads: Optional[int] = None
    mlp_ratio: float = 4.0
    ln_eps: float = TF_LN_EPS

    def __post_init__(self):
        if self.heads is None:
            self.heads = default_heads(self.width)


class ResamplerBlock(ResidualAttentionBlock):
    """CLIP-named self-attention block plus a cross-attention to the audio tokens.

    Args:
        dim: width D.
        num_heads: attention heads.
        mlp_ratio: FFN hidden width as a multiple of D.
        ln_eps: LayerNorm epsilon.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, ln_eps: float = TF_LN_EPS):
        super().__init__(dim, num_heads, mlp_ratio=mlp_ratio, ln_eps=ln_eps)
        self.ln_3 = LayerNorm(dim, eps=ln_eps)
        self.cross_attn = MultiheadAttention(dim, num_heads)

    def forward(self, x: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        """x [B, Q, D] queries, audio [B, A, D] tokens -> [B, Q, D]."""
        x = x + self.attn(self.ln_1(x))
        x = x + self.cross_attn(self.ln_3(x), key_value=self.ln_3(audio))
        return x + self.mlp(self.ln_2(x))


class AudioResampler(nn.Module):
    """Q learned queries with position embeddings, refined by ``layers`` ResamplerBlocks.

    Args:
        cfg: ResamplerConfig.
    """

    def __init__(self, cfg: ResamplerConfig):
        super().__init__()
        self.cfg = cfg
        self.blocks = nn.ModuleList(
            ResamplerBlock(cfg.width, cfg.heads, cfg.mlp_ratio, cfg.ln_eps) for _ in range(cfg.layers))
        init_new_weights(self)
        self.queries = nn.Parameter(torch.empty(cfg.num_queries, cfg.width))
        self.query_position = nn.Parameter(torch.empty(cfg.num_queries, cfg.width))
        nn.init.orthogonal_(self.queries)
        nn.init.normal_(self.query_position, std=NEW_WEIGHT_STD)

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        """audio [B, A, D] projected AST tokens -> resampled audio [B, Q, D]."""
        if audio.dim() != 3 or audio.shape[-1] != self.cfg.width:
            raise ValueError(f"resampler expects audio tokens [B, A, {self.cfg.width}], "
                             f"got {tuple(audio.shape)}")
        x = (self.queries + self.query_position).to(audio.dtype)
        x = x.unsqueeze(0).expand(audio.shape[0], -1, -1)
        for block in self.blocks:
            x = block(x, audio)
        return x
