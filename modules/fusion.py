"""Gated fusion transformer (DESIGN §3) and its text-guided extension (DESIGN §4).

Block l on frames x (start x = v0 = frames + P[0:F]) and resampled audio Â:

    c = [mean_f x ; mean_q Â] (+ t with text_gate)
    g_att, g_ff = tanh(MLP_att(c)), tanh(MLP_ff(c))
    x += g_att * MHA(q=ln_3(x [+ g_q t/|t|]), k=v=Â)     (text injection: text_query / query_gate)
    x += g_ff  * FFN_c(ln_4(x))
    x += MHSA(ln_1(x))      padded frames masked as keys
    x += FFN(ln_2(x))
    output V = r x_L + (1 - r) v0                          (r = fusion_residual)

Two paths compute the same thing:
- ``fuse_reference`` (also ``forward``): the plain computation, row b fused under text b.
- ``prepare_videos`` / ``prepare_texts`` / ``fuse_pairs``: text-guided scoring of many
  (text, video) pairs. Everything that depends on the video alone (v0, frame masks, the
  K/V projections of Â for every layer, mean_q Â, the layer-0 gate terms and, when the
  query carries no text, the layer-0 cross-attention) and on the text alone (t/|t|, the
  gates' text terms) is computed once; ``fuse_pairs`` runs only the per-pair remainder on
  pair batches [P, F, D] gathered by (text index, video index). The gates' first linear
  splits by input block, W c = W_x mean_f x + W_a mean_q Â + W_t t, which is what lets
  the video and text terms be computed once.

Shapes: B batch, P pairs, F frames, Q audio queries, D width, H heads, Dh = D / H,
L fusion layers, Nt / Nv texts / videos.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from modules.layers import (NEW_WEIGHT_STD, TF_LN_EPS, LayerNorm, Mlp, MultiheadAttention,
                            QuickGELU, ResidualAttentionBlock, init_new_weights)
from modules.resampler import default_heads

GATE_MODES = ("soft", "hard", "none")
# Names of the per-layer gates: cross-attention, FFN_c and (query_gate) text injection.
GATE_ATT, GATE_FF, GATE_Q = "att", "ff", "q"


@dataclass
class FusionConfig:
    """Fusion transformer settings.

    Args:
        width: joint width D.
        layers: fusion blocks (``--cross_num_hidden_layers``, 4).
        heads: attention heads; None = width // 64 (CLIP's text heads).
        max_frames: frames per video F (``--max_frames``); size of the frame position table.
        mlp_ratio: FFN hidden width as a multiple of D.
        gate: "soft" (tanh gates), "hard" (1 where tanh(MLP(c)) > hard_gate_threshold, else 0;
            the backward pass goes straight through the tanh) or "none" (every gate fixed at 1,
            the "+Audio" ablation).
        hard_gate_threshold: 0.0, the midpoint of tanh's range: a hard gate opens exactly where
            the soft gate would add its branch with a positive sign, and since the gate MLP's
            output starts near zero and symmetric, about half the gates start open and the
            straight-through gradient reaches both states. Values outside (-1, 1) keep every
            gate open (< -1) or closed (>= 1).
        fusion_residual: r in V = r x_L + (1 - r) v0 (released recipe 0.05; 1.0 = paper).
        use_audio: False = the visual-only baseline, V = v0 (no fusion blocks are built).
        text_gate: gates see the text: c = [mean x ; mean Â ; t].
        text_query: the cross-attention query is ln_3(x + g_q t/|t|).
        query_gate: g_q = tanh(MLP_q([mean x ; mean Â ; t])) instead of 1. Gating the text
            injection implies the injection, so query_gate alone behaves as
            text_query + query_gate.
        ln_eps: LayerNorm epsilon (the released recipe's 1e-12).
    """

    width: int = 512
    layers: int = 4
    heads: Optional[int] = None
    max_frames: int = 12
    mlp_ratio: float = 4.0
    gate: str = "soft"
    hard_gate_threshold: float = 0.0
    fusion_residual: float = 0.05
    use_audio: bool = True
    text_gate: bool = False
    text_query: bool = False
    query_gate: bool = False
    ln_eps: float = TF_LN_EPS

    def __post_init__(self):
        if self.heads is None:
            self.heads = default_heads(self.width)
        if self.gate not in GATE_MODES:
            raise ValueError(f"FusionConfig.gate (--gate) must be one of {GATE_MODES}, got {self.gate!r}")
        if self.text_guided and not self.use_audio:
            raise ValueError("--no_audio (use_audio=False) turns the fusion off, so --text_gate / "
                             "--text_query / --query_gate would have no effect; drop them")
        if self.gate == "none" and (self.text_gate or self.query_gate):
            raise ValueError("--gate none fixes every gate at 1, so --text_gate / --query_gate would "
                             "have no effect; use --text_query for an ungated text injection")

    @property
    def text_guided(self) -> bool:
        """True when the fused video depends on the text it is compared with."""
        return self.text_gate or self.text_query or self.query_gate

    @property
    def injects_text(self) -> bool:
        """True when the cross-attention query carries the text."""
        return self.text_query or self.query_gate


@dataclass
class FusionOutput:
    """Fused frames and gate values.

    fused [B, F, D] (B rows or P pairs); gates: name ("att", "ff", "q") -> [B, L] values
    (empty without gates).
    """

    fused: torch.Tensor
    gates: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class VideoContext:
    """Per-video fusion inputs, independent of any text (``FusionTransformer.prepare_videos``).

    v0 [Nv, F, D]; frame_mask [Nv, F] bool; keys / values: per layer [Nv, H, Q, Dh];
    gate_terms: per layer, gate name -> [Nv, D/2] (W_a mean Â, plus W_x mean v0 at layer 0);
    cross0 [Nv, F, D]: layer-0 cross-attention output when the query carries no text, else None.
    """

    v0: torch.Tensor
    frame_mask: torch.Tensor
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    gate_terms: list[dict[str, torch.Tensor]]
    cross0: Optional[torch.Tensor]


@dataclass
class TextContext:
    """Per-text fusion inputs (``FusionTransformer.prepare_texts``).

    text_unit [Nt, D] (t / |t|, for the injected query; None without injection);
    gate_terms: per layer, gate name -> [Nt, D/2] (W_t t) for the gates that see the text.
    """

    text_unit: Optional[torch.Tensor]
    gate_terms: list[dict[str, torch.Tensor]]


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x [B, F, D], mask [B, F] -> mean over the valid frames [B, D] (0 when none is valid)."""
    w = mask.to(x.dtype).unsqueeze(-1)
    return (x * w).sum(1) / w.sum(1).clamp_min(1.0)


class GateMLP(nn.Module):
    """Linear(in, D/2, no bias) -> QuickGELU -> Linear(D/2, 1, no bias); one scalar per row.

    Args:
        width: D; the input is ``in_blocks`` vectors of width D concatenated.
        in_blocks: 2 for [mean x ; mean Â], 3 with the text.
    """

    def __init__(self, width: int, in_blocks: int):
        super().__init__()
        self.width = width
        self.fc1 = nn.Linear(in_blocks * width, width // 2, bias=False)
        self.act = QuickGELU()
        self.fc2 = nn.Linear(width // 2, 1, bias=False)

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        """c [B, in_blocks * D] -> pre-activation [B]."""
        return self.head(self.fc1(c))

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """First-layer output [B, D/2] -> pre-activation [B]."""
        return self.fc2(self.act(hidden)).squeeze(-1)

    def input_weight(self, block: int) -> torch.Tensor:
        """Columns of fc1 acting on input block 0 (mean x), 1 (mean Â) or 2 (t): [D/2, D]."""
        return self.fc1.weight[:, block * self.width:(block + 1) * self.width]


class FusionBlock(ResidualAttentionBlock):
    """One gated fusion block; ln_1/attn/ln_2/mlp carry CLIP's names (copied from CLIP, §7).

    Args:
        cfg: FusionConfig (width, heads, gate mode and text flags).
    """

    def __init__(self, cfg: FusionConfig):
        super().__init__(cfg.width, cfg.heads, mlp_ratio=cfg.mlp_ratio, ln_eps=cfg.ln_eps)
        d = cfg.width
        self.cfg = cfg
        self.ln_3 = LayerNorm(d, eps=cfg.ln_eps)
        self.cross_attn = MultiheadAttention(d, cfg.heads)
        self.ln_4 = LayerNorm(d, eps=cfg.ln_eps)
        self.mlp_c = Mlp(d, int(d * cfg.mlp_ratio), QuickGELU, bias=False)
        self.gates = nn.ModuleDict()
        if cfg.gate != "none":
            blocks = 3 if cfg.text_gate else 2
            self.gates[GATE_ATT] = GateMLP(d, blocks)
            self.gates[GATE_FF] = GateMLP(d, blocks)
        if cfg.query_gate:
            self.gates[GATE_Q] = GateMLP(d, 3)

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        """Gate pre-activation [B] -> gate value [B] (soft: tanh; hard: 0/1 straight-through)."""
        g = torch.tanh(pre)
        if self.cfg.gate == "hard":
            hard = (g > self.cfg.hard_gate_threshold).to(g.dtype)
            return hard + (g - g.detach())
        return g

    def text_blocks(self, name: str) -> bool:
        """Whether gate ``name`` takes the text as a third input block."""
        return name == GATE_Q or self.cfg.text_gate

    # ----- plain path -----------------------------------------------------------------
    def forward(self, x: torch.Tensor, frame_mask: torch.Tensor, audio: torch.Tensor,
                text: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """x [B, F, D], frame_mask [B, F] bool, audio [B, Q, D], text [B, D] or None
        -> (x [B, F, D], gates name -> [B])."""
        c2 = torch.cat([masked_mean(x, frame_mask), audio.mean(1)], dim=-1)
        c3 = torch.cat([c2, text], dim=-1) if text is not None else None
        gates = {name: self.activate(mlp(c3 if self.text_blocks(name) else c2))
                 for name, mlp in self.gates.items()}
        query = x
        if self.cfg.injects_text:
            g_q = gates[GATE_Q][:, None, None] if GATE_Q in gates else 1.0
            query = x + g_q * F.normalize(text, dim=-1)[:, None, :]
        return self._finish(x, frame_mask, gates, self.cross_attn(self.ln_3(query), key_value=audio)), gates

    def _finish(self, x: torch.Tensor, frame_mask: torch.Tensor, gates: dict[str, torch.Tensor],
                cross: torch.Tensor) -> torch.Tensor:
        """Gated cross-attention output cross [B, F, D] and FFN_c, then the CLIP-style block."""
        x = x + self._scale(gates, GATE_ATT, cross)
        x = x + self._scale(gates, GATE_FF, self.mlp_c(self.ln_4(x)))
        return super().forward(x, key_valid=frame_mask)

    @staticmethod
    def _scale(gates: dict[str, torch.Tensor], name: str, branch: torch.Tensor) -> torch.Tensor:
        """branch [B, F, D] times gate ``name`` [B] (gate "none": unscaled)."""
        return gates[name][:, None, None] * branch if name in gates else branch

    # ----- fast pair path -------------------------------------------------------------
    def forward_pairs(self, x: torch.Tensor, frame_mask: torch.Tensor, key: torch.Tensor,
                      value: torch.Tensor, gate_hidden: dict[str, torch.Tensor],
                      text_unit: Optional[torch.Tensor], cross: Optional[torch.Tensor],
                      add_frame_mean: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Per-pair remainder of ``forward`` from precomputed parts.

        Args:
            x: frames [P, F, D]; frame_mask [P, F] bool.
            key, value: this layer's projections of Â [P, H, Q, Dh].
            gate_hidden: gate name -> first-linear terms already known [P, D/2].
            text_unit: t / |t| [P, D] (injection only, else None).
            cross: precomputed cross-attention output [P, F, D] or None.
            add_frame_mean: add W_x mean_f x (False when gate_hidden already holds it).
        Returns: (x [P, F, D], gates name -> [P]).
        """
        if add_frame_mean:
            x_mean = masked_mean(x, frame_mask)
            gate_hidden = {name: h + F.linear(x_mean, self.gates[name].input_weight(0))
                           for name, h in gate_hidden.items()}
        gates = {name: self.activate(self.gates[name].head(h)) for name, h in gate_hidden.items()}
        if cross is None:
            query = x
            if self.cfg.injects_text:
                g_q = gates[GATE_Q][:, None, None] if GATE_Q in gates else 1.0
                query = x + g_q * text_unit[:, None, :]
            cross = self.cross_attn.attend(self.cross_attn.project_query(self.ln_3(query)), key, value)
        return self._finish(x, frame_mask, gates, cross), gates


class FusionTransformer(nn.Module):
    """Frame position embeddings + ``layers`` FusionBlocks + the residual blend.

    Args:
        cfg: FusionConfig.
    """

    def __init__(self, cfg: FusionConfig):
        super().__init__()
        self.cfg = cfg
        self.frame_position = nn.Parameter(torch.empty(cfg.max_frames, cfg.width))
        self.blocks = nn.ModuleList(FusionBlock(cfg) for _ in range(cfg.layers if cfg.use_audio else 0))
        init_new_weights(self)
        nn.init.normal_(self.frame_position, std=NEW_WEIGHT_STD)

    @property
    def text_guided(self) -> bool:
        return self.cfg.text_guided

    def embed_frames(self, frames: torch.Tensor) -> torch.Tensor:
        """frames [B, F, D] -> v0 = frames + P[0:F] [B, F, D]."""
        n = frames.shape[1]
        if n > self.cfg.max_frames or frames.shape[-1] != self.cfg.width:
            raise ValueError(f"fusion expects frames [B, F<={self.cfg.max_frames}, {self.cfg.width}] "
                             f"(--max_frames), got {tuple(frames.shape)}")
        return frames + self.frame_position[:n].to(frames.dtype)

    def _blend(self, x: torch.Tensor, v0: torch.Tensor) -> torch.Tensor:
        r = self.cfg.fusion_residual
        return r * x + (1.0 - r) * v0

    @staticmethod
    def _stack_gates(per_layer: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Per-layer dicts name -> [B] -> name -> [B, L]."""
        if not per_layer:
            return {}
        return {name: torch.stack([g[name] for g in per_layer], dim=-1) for name in per_layer[0]}

    def forward(self, frames: torch.Tensor, frame_mask: torch.Tensor, audio: torch.Tensor,
                text: Optional[torch.Tensor] = None) -> FusionOutput:
        """Plain fusion, row b under text b (the reference path, no reuse).

        Args:
            frames: frame embeddings [B, F, D]; frame_mask [B, F] (True/1 = real frame).
            audio: resampled audio Â [B, Q, D].
            text: text embeddings [B, D] (as the text encoder gives them); required when the
                fusion is text-guided, ignored otherwise.
        """
        v0 = self.embed_frames(frames)
        if not self.cfg.use_audio:
            return FusionOutput(v0)
        if self.text_guided and text is None:
            raise ValueError("this fusion is text-guided (--text_gate/--text_query/--query_gate): "
                             "pass the text embedding of every row")
        text = text if self.text_guided else None
        mask = frame_mask.bool()
        x, per_layer = v0, []
        for block in self.blocks:
            x, gates = block(x, mask, audio, text)
            per_layer.append(gates)
        return FusionOutput(self._blend(x, v0), self._stack_gates(per_layer))

    fuse_reference = forward

    # ----- fast text-guided path ------------------------------------------------------
    def prepare_videos(self, frames: torch.Tensor, frame_mask: torch.Tensor,
                       audio: torch.Tensor) -> VideoContext:
        """Text-independent fusion inputs, computed once per video.

        frames [Nv, F, D], frame_mask [Nv, F], audio Â [Nv, Q, D] -> VideoContext.
        """
        v0 = self.embed_frames(frames)
        mask = frame_mask.bool()
        audio_mean = audio.mean(1)
        keys, values, gate_terms = [], [], []
        for layer, block in enumerate(self.blocks):
            k, v = block.cross_attn.project_key_value(audio)
            keys.append(k)
            values.append(v)
            terms = {name: F.linear(audio_mean, mlp.input_weight(1)) for name, mlp in block.gates.items()}
            if layer == 0:
                v0_mean = masked_mean(v0, mask)
                terms = {name: t + F.linear(v0_mean, block.gates[name].input_weight(0))
                         for name, t in terms.items()}
            gate_terms.append(terms)
        cross0 = None
        if self.blocks and not self.cfg.injects_text:
            block = self.blocks[0]
            cross0 = block.cross_attn.attend(block.cross_attn.project_query(block.ln_3(v0)), keys[0], values[0])
        return VideoContext(v0, mask, keys, values, gate_terms, cross0)

    def prepare_texts(self, text: torch.Tensor) -> TextContext:
        """text [Nt, D] -> TextContext (t/|t| and the gates' text terms, once per text)."""
        unit = F.normalize(text, dim=-1) if self.cfg.injects_text else None
        gate_terms = [{name: F.linear(text, mlp.input_weight(2))
                       for name, mlp in block.gates.items() if block.text_blocks(name)}
                      for block in self.blocks]
        return TextContext(unit, gate_terms)

    def fuse_pairs(self, videos: VideoContext, texts: TextContext, text_index: torch.Tensor,
                   video_index: torch.Tensor) -> FusionOutput:
        """Fuse pair p = (texts[text_index[p]], videos[video_index[p]]) for every p.

        text_index, video_index: LongTensor [P] -> FusionOutput(fused [P, F, D], gates [P, L]).
        """
        if not self.text_guided:
            raise ValueError("fuse_pairs is for text-guided fusion; a text-agnostic fusion "
                             "fuses each video once with forward()")
        vi, ti = video_index, text_index
        v0 = videos.v0[vi]
        mask = videos.frame_mask[vi]
        unit = texts.text_unit[ti] if texts.text_unit is not None else None
        x, per_layer = v0, []
        for layer, block in enumerate(self.blocks):
            hidden = {}
            for name, term in videos.gate_terms[layer].items():
                text_term = texts.gate_terms[layer].get(name)
                hidden[name] = term[vi] + text_term[ti] if text_term is not None else term[vi]
            cross = videos.cross0[vi] if layer == 0 and videos.cross0 is not None else None
            x, gates = block.forward_pairs(x, mask, videos.keys[layer][vi], videos.values[layer][vi],
                                           hidden, unit, cross, add_frame_mean=layer > 0)
            per_layer.append(gates)
        return FusionOutput(self._blend(x, v0), self._stack_gates(per_layer))
