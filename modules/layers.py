"""Building blocks shared by the CLIP towers, the audio resampler and the fusion transformer.

Every block uses OpenAI CLIP's parameter names (``attn.in_proj_weight``, ``ln_1``,
``mlp.c_fc`` ...), so CLIP weights load into the towers unchanged and CLIP's text layers
copy into the new blocks by name (docs/design.md §7). Attention goes through
``F.scaled_dot_product_attention`` so CUDA picks fused kernels.

Shapes: B batch, L query length, K key length, D width, H heads, Dh = D / H.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

CLIP_LN_EPS = 1e-5
# The released AVIGATE recipe uses a TF-style LayerNorm (epsilon inside the square root)
# with this epsilon in the resampler and fusion transformer (docs/design.md §2).
TF_LN_EPS = 1e-12


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 and cast back, as CLIP does for fp16/bf16 activations."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(),
                            self.bias.float(), self.eps).to(x.dtype)


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the activation OpenAI's CLIP was trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def attention_mask_from_keys(key_valid: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Boolean SDPA mask [B, 1, 1, K] from key validity [B, K] (True = attend).

    A row with no valid key would give NaN (softmax over nothing); such rows attend to
    every key instead. Their outputs are meaningless but finite, and every caller
    excludes them downstream (masked means, zero gates).
    """
    if key_valid is None:
        return None
    key_valid = key_valid.bool()
    key_valid = key_valid | ~key_valid.any(dim=-1, keepdim=True)
    return key_valid[:, None, None, :]


class MultiheadAttention(nn.Module):
    """Multi-head attention with nn.MultiheadAttention's parameter layout, run by SDPA.

    The projections are exposed separately (``project_query``, ``project_key_value``,
    ``attend``) so a caller can compute the key/value projection of one input once and
    reuse it for many queries (text-guided scoring, docs/design.md §10).

    Args:
        dim: model width D.
        num_heads: number of heads H (D must be divisible by H).
    """

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.dim = dim
        self.num_heads = num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """[B, L, D] -> [B, H, L, Dh]"""
        b, n, _ = x.shape
        return x.view(b, n, self.num_heads, self.dim // self.num_heads).transpose(1, 2)

    def project_query(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, L, D] -> query heads [B, H, L, Dh]."""
        w, b = self.in_proj_weight[: self.dim], self.in_proj_bias[: self.dim]
        return self._split_heads(F.linear(x, w, b))

    def project_key_value(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, K, D] -> key and value heads, each [B, H, K, Dh]."""
        w, b = self.in_proj_weight[self.dim:], self.in_proj_bias[self.dim:]
        k, v = F.linear(x, w, b).chunk(2, dim=-1)
        return self._split_heads(k), self._split_heads(v)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               key_valid: Optional[torch.Tensor] = None, causal: bool = False) -> torch.Tensor:
        """q [B, H, L, Dh], k/v [B, H, K, Dh], key_valid [B, K] -> output [B, L, D]."""
        mask = attention_mask_from_keys(key_valid)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None)
        b, _, n, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, n, self.dim))

    def forward(self, query: torch.Tensor, key_value: Optional[torch.Tensor] = None,
                key_valid: Optional[torch.Tensor] = None, causal: bool = False) -> torch.Tensor:
        """query [B, L, D], key_value [B, K, D] (None: self-attention), key_valid [B, K]."""
        if key_value is None:
            q, k, v = F.linear(query, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
            q, k, v = self._split_heads(q), self._split_heads(k), self._split_heads(v)
        else:
            q = self.project_query(query)
            k, v = self.project_key_value(key_value)
        if causal and key_valid is not None:
            raise ValueError("causal attention with a key mask is not supported")
        return self.attend(q, k, v, key_valid=key_valid, causal=causal)


class Mlp(nn.Module):
    """Linear(D, hidden) -> activation -> Linear(hidden, D), CLIP naming (c_fc, c_proj).

    Args:
        dim: input/output width D.
        hidden_dim: inner width (4 D in CLIP).
        act_layer: activation class (QuickGELU for CLIP weights).
        bias: whether the two linear layers have biases (the fusion's FFN_c has none).
    """

    def __init__(self, dim: int, hidden_dim: int, act_layer: type[nn.Module] = QuickGELU,
                 bias: bool = True):
        super().__init__()
        self.c_fc = nn.Linear(dim, hidden_dim, bias=bias)
        self.gelu = act_layer()
        self.c_proj = nn.Linear(hidden_dim, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.gelu(self.c_fc(x)))


class ResidualAttentionBlock(nn.Module):
    """Pre-norm transformer block: x += MHSA(ln_1(x)); x += MLP(ln_2(x)).

    Args:
        dim: width D.
        num_heads: attention heads.
        mlp_ratio: MLP hidden width as a multiple of D.
        act_layer: MLP activation.
        ln_eps: LayerNorm epsilon (CLIP 1e-5; resampler/fusion 1e-12).
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0,
                 act_layer: type[nn.Module] = QuickGELU, ln_eps: float = CLIP_LN_EPS):
        super().__init__()
        self.ln_1 = LayerNorm(dim, eps=ln_eps)
        self.attn = MultiheadAttention(dim, num_heads)
        self.ln_2 = LayerNorm(dim, eps=ln_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer)

    def forward(self, x: torch.Tensor, key_valid: Optional[torch.Tensor] = None,
                causal: bool = False) -> torch.Tensor:
        """x [B, L, D], key_valid [B, L] (True = real token) -> [B, L, D]."""
        x = x + self.attn(self.ln_1(x), key_valid=key_valid, causal=causal)
        return x + self.mlp(self.ln_2(x))


# Names of the parameters a ResidualAttentionBlock shares with a CLIP text resblock; the
# resampler and fusion blocks copy exactly these from CLIP (docs/design.md §7).
SELF_ATTENTION_PARAM_PREFIXES = ("ln_1.", "attn.", "ln_2.", "mlp.")


def copy_clip_layer(clip_block_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Pure converter: one CLIP text resblock's state dict -> the entries a new block copies."""
    return {k: v.clone() for k, v in clip_block_state.items()
            if k.startswith(SELF_ATTENTION_PARAM_PREFIXES)}


# Standard deviation of the normal init of new linear and embedding weights (docs/design.md §7).
NEW_WEIGHT_STD = 0.02


def init_new_weights(module: nn.Module) -> None:
    """docs/design.md §7 init of newly added layers, applied to every submodule of ``module``.

    Linear weights ~ normal(0, 0.02) with zero biases, LayerNorm weight 1 / bias 0;
    attention input projections keep their xavier-uniform init (zero bias). Parameters
    held directly by a module (queries, position embeddings) are left to their owner.
    """
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=NEW_WEIGHT_STD)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, MultiheadAttention):
            nn.init.zeros_(m.in_proj_bias)
