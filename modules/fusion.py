"""Gated fusion transformer (docs/design.md §3), its text-guided extension (§4) and residual text
guidance (§4a).

Block l on frames x (start x = v0 = frames + P[0:F]) and resampled audio Â:

    c = [mean_f x ; mean_q Â]      (+ t with text_gate)
    g_att, g_ff = tanh(MLP_att(c)), tanh(MLP_ff(c))
    x += g_att * MHA(q=ln_3(x [+ g_q t/|t|]), k=v=Â)     (text injection: text_query / query_gate)
    x += g_ff  * FFN_c(ln_4(x))
    x += MHSA(ln_1(x))      padded frames masked as keys (padding_rule "masked")
    x += FFN(ln_2(x))
    output V = r x_L + (1 - r) v0                          (r = fusion_residual)

Residual start (§4a): the gates' first linear is stored per input block, ``fc1`` on
[mean x ; mean Â] and ``fc1_text`` on t, and every text-dependent term starts at zero
(``fc1_text``, the query gate's output layer ``fc2``, and ``text_scale``, the injection's
scale when the injection has no gate). A text-guided fusion then equals the text-agnostic one
with the same other weights until training moves those terms, and with t := 0 it is the
text-agnostic fusion at any time (``agnostic``).

Three paths compute the same thing:
- ``forward`` (= ``fuse_reference``): the plain computation, row b fused under text b.
- ``prepare_videos`` / ``prepare_texts`` / ``fuse_pairs``: many (text, video) pairs.
  Everything that depends on the video alone (v0, frame masks, the K/V projections of Â for
  every layer, mean_q Â, the layer-0 gate terms and, when the query carries no text, the
  layer-0 cross-attention) and on the text alone (t/|t|, the gates' text terms) is computed
  once; ``fuse_pairs`` runs only the per-pair remainder on pair batches [P, F, D] gathered by
  (text index, video index).
- ``fuse_grid``: every pair of a block of texts x a block of videos; like ``fuse_pairs`` but
  the audio keys/values stay per video: the frames of all texts fused with one video are
  stacked as queries of one attention call, so nothing of size [P, H, Q, Dh] is made.

Shapes: B batch, P pairs, F frames, Q audio queries, D width, H heads, Dh = D / H,
L fusion layers, Nt / Nv texts / videos, Tc / Vc texts / videos of a grid block.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from modules.architecture import GATE_MODES, PADDING_RULES, TEXT_INITS
from modules.layers import (NEW_WEIGHT_STD, TF_LN_EPS, LayerNorm, Mlp, MultiheadAttention,
                            QuickGELU, ResidualAttentionBlock, init_new_weights)
from modules.resampler import default_heads

# Names of the per-layer gates: cross-attention, FFN_c and (query_gate) text injection.
GATE_ATT, GATE_FF, GATE_Q = "att", "ff", "q"
# Parameter names (relative to a FusionBlock) that exist only because the fusion sees the text.
TEXT_TERM_SUFFIXES = (".fc1_text.weight", ".text_scale")


def is_text_term(name: str) -> bool:
    """Whether a parameter name (of the fusion or of a model holding it) is a text term: it
    exists only because the fusion sees the text (docs/design.md §4a)."""
    return name.endswith(TEXT_TERM_SUFFIXES) or f".gates.{GATE_Q}." in name


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
        query_gate: g_q = tanh(MLP_q([mean x ; mean Â ; t])) instead of a learned scalar.
            Gating the text injection implies the injection, so query_gate alone behaves as
            text_query + query_gate.
        text_init: "zero" (docs/design.md §4a residual start: every text-dependent term starts at 0,
            so the fusion starts as the text-agnostic one) or "normal" (the earlier init: text
            columns and the query gate normal(0, 0.02), injection scale 1).
        padding_rule: "masked" (padded frames excluded from the gate input means and masked
            as self-attention keys) or "released" (the released code: means over all F frames,
            no key mask; padded slots then hold whatever the caller put there, see
            AVIGATE.frame_embeddings).
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
    text_init: str = "zero"
    padding_rule: str = "masked"
    ln_eps: float = TF_LN_EPS

    def __post_init__(self):
        if self.heads is None:
            self.heads = default_heads(self.width)
        if self.gate not in GATE_MODES:
            raise ValueError(f"FusionConfig.gate (--gate) must be one of {GATE_MODES}, got {self.gate!r}")
        if self.padding_rule not in PADDING_RULES:
            raise ValueError(f"FusionConfig.padding_rule (--padding_rule) must be one of {PADDING_RULES}, "
                             f"got {self.padding_rule!r}")
        if self.text_init not in TEXT_INITS:
            raise ValueError(f"FusionConfig.text_init (--text_init) must be one of {TEXT_INITS}, "
                             f"got {self.text_init!r}")
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
    (empty without gates); unblended [B, F, D]: x_L before the residual blend (``forward``
    only, for diagnostics such as tools/probe_sound.py; None without fusion blocks).
    """

    fused: torch.Tensor
    gates: dict[str, torch.Tensor] = field(default_factory=dict)
    unblended: Optional[torch.Tensor] = None


@dataclass
class VideoContext:
    """Per-video fusion inputs, independent of any text (``FusionTransformer.prepare_videos``).

    v0 [Nv, F, D]; frame_mask [Nv, F] bool (the mask the fusion uses: all True under the
    released padding rule); keys / values: per layer [Nv, H, Q, Dh]; gate_terms: per layer,
    gate name -> [Nv, D/2] (W_a mean Â, plus W_x mean v0 at layer 0); cross0 [Nv, F, D]:
    layer-0 cross-attention output when the query carries no text, else None.
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

    text_unit [Nt, D]: t/|t|, what the cross-attention query adds (times each block's gate
    or scale); None without injection. gate_terms: per layer, gate name -> [Nt, D/2] (W_t t)
    for the gates that see the text.
    """

    text_unit: Optional[torch.Tensor]
    gate_terms: list[dict[str, torch.Tensor]]


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x [B, F, D], mask [B, F] -> mean over the valid frames [B, D] (0 when none is valid)."""
    w = mask.to(x.dtype).unsqueeze(-1)
    return (x * w).sum(1) / w.sum(1).clamp_min(1.0)


class GateMLP(nn.Module):
    """Linear(in, D/2, no bias) -> QuickGELU -> Linear(D/2, 1, no bias); one scalar per row.

    The first linear is stored per input: ``fc1`` acts on [mean x ; mean Â] (2D columns) and
    ``fc1_text`` on t (D columns, only when the gate sees the text), so W c = W_x mean x +
    W_a mean Â + W_t t, which lets the video and text terms be computed once and the text
    term start at zero (§4a).

    Args:
        width: D.
        sees_text: whether t is an input block.
    """

    def __init__(self, width: int, sees_text: bool):
        super().__init__()
        self.width = width
        self.fc1 = nn.Linear(2 * width, width // 2, bias=False)
        self.fc1_text = nn.Linear(width, width // 2, bias=False) if sees_text else None
        self.act = QuickGELU()
        self.fc2 = nn.Linear(width // 2, 1, bias=False)

    def forward(self, c: torch.Tensor, text: Optional[torch.Tensor] = None) -> torch.Tensor:
        """c [B, 2D] = [mean x ; mean Â], text [B, D] (gates that see it) -> pre-activation [B]."""
        hidden = self.fc1(c)
        if self.fc1_text is not None:
            hidden = hidden + self.fc1_text(text)
        return self.head(hidden)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """First-layer output [B, D/2] -> pre-activation [B]."""
        return self.fc2(self.act(hidden)).squeeze(-1)

    def input_weight(self, block: int) -> torch.Tensor:
        """The first linear's weight on input block 0 (mean x), 1 (mean Â) or 2 (t): [D/2, D]."""
        if block == 2:
            return self.fc1_text.weight
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
            self.gates[GATE_ATT] = GateMLP(d, sees_text=cfg.text_gate)
            self.gates[GATE_FF] = GateMLP(d, sees_text=cfg.text_gate)
        if cfg.query_gate:
            self.gates[GATE_Q] = GateMLP(d, sees_text=True)
        # Scale of an ungated injection (text_query without query_gate).
        self.text_scale = (nn.Parameter(torch.ones(())) if cfg.text_query and not cfg.query_gate
                           else None)

    def init_text_terms(self) -> None:
        """§4a residual start (text_init "zero"): the gates' text columns, the query gate's
        output layer and the injection scale start at 0. "normal" keeps the §7 normal init of
        the linear layers and an injection scale of 1 (the earlier behaviour)."""
        if self.cfg.text_init != "zero":
            return
        with torch.no_grad():
            for name, gate in self.gates.items():
                if gate.fc1_text is not None:
                    gate.fc1_text.weight.zero_()
                if name == GATE_Q:
                    gate.fc2.weight.zero_()
            if self.text_scale is not None:
                self.text_scale.zero_()

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        """Gate pre-activation [B] -> gate value [B] (soft: tanh; hard: 0/1 straight-through)."""
        g = torch.tanh(pre)
        if self.cfg.gate == "hard":
            hard = (g > self.cfg.hard_gate_threshold).to(g.dtype)
            return hard + (g - g.detach())
        return g

    def text_blocks(self, name: str) -> bool:
        """Whether gate ``name`` takes the text as a third input block."""
        return self.gates[name].fc1_text is not None

    def injection(self, unit: torch.Tensor, gates: dict[str, torch.Tensor]) -> torch.Tensor:
        """unit t/|t| [B, D] -> what this block's query adds [B, 1, D]: times the query gate
        g_q [B], or times this block's learned scale when the injection has no gate."""
        if GATE_Q in gates:
            return gates[GATE_Q][:, None, None] * unit[:, None, :]
        return self.text_scale.to(unit.dtype) * unit[:, None, :]

    # ----- plain path -----------------------------------------------------------------
    def forward(self, x: torch.Tensor, frame_mask: torch.Tensor, audio: torch.Tensor,
                text: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """x [B, F, D], frame_mask [B, F] bool (the fusion's mask), audio [B, Q, D], text [B, D]
        or None -> (x [B, F, D], gates name -> [B])."""
        c = torch.cat([masked_mean(x, frame_mask), audio.mean(1)], dim=-1)
        gates = {name: self.activate(mlp(c, text if self.text_blocks(name) else None))
                 for name, mlp in self.gates.items()}
        query = x
        if self.cfg.injects_text:
            query = x + self.injection(F.normalize(text, dim=-1), gates)
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
            key, value: this layer's projections of Â, per pair [P, H, Q, Dh] or per video
                [G, H, Q, Dh] with the P = G * n pairs ordered video-major (n pairs per video).
            gate_hidden: gate name -> first-linear terms already known [P, D/2].
            text_unit: t/|t| of each pair's text [P, D] (injection only, else None).
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
                query = x + self.injection(text_unit, gates)
            cross = self._cross_attention(self.ln_3(query), key, value)
        return self._finish(x, frame_mask, gates, cross), gates

    def _cross_attention(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """query [P, F, D] against key/value per pair [P, H, Q, Dh] or per video [G, H, Q, Dh]
        (pairs video-major): the n = P / G pairs of a video become n * F query rows of one
        attention call, which is the same computation (softmax runs per query row)."""
        attn = self.cross_attn
        q = attn.project_query(query)  # [P, H, F, Dh]
        groups = key.shape[0]
        if groups == q.shape[0]:
            return attn.attend(q, key, value)
        p, h, f, dh = q.shape
        per_video = p // groups
        q = q.view(groups, per_video, h, f, dh).transpose(1, 2).reshape(groups, h, per_video * f, dh)
        out = F.scaled_dot_product_attention(q, key, value)  # [G, H, n F, Dh]
        out = out.view(groups, h, per_video, f, dh).permute(0, 2, 3, 1, 4).reshape(p, f, h * dh)
        return attn.out_proj(out)


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
        for block in self.blocks:
            block.init_text_terms()

    @property
    def text_guided(self) -> bool:
        return self.cfg.text_guided

    def text_term_names(self, prefix: str = "") -> list[str]:
        """Names of the parameters that exist only because the fusion sees the text (the gates'
        text columns, the whole query gate, the injection scale), with ``prefix``."""
        return [prefix + name for name, _ in self.named_parameters() if is_text_term(name)]

    def embed_frames(self, frames: torch.Tensor) -> torch.Tensor:
        """frames [B, F, D] -> v0 = frames + P[0:F] [B, F, D]."""
        n = frames.shape[1]
        if n > self.cfg.max_frames or frames.shape[-1] != self.cfg.width:
            raise ValueError(f"fusion expects frames [B, F<={self.cfg.max_frames}, {self.cfg.width}] "
                             f"(--max_frames), got {tuple(frames.shape)}")
        return frames + self.frame_position[:n].to(frames.dtype)

    def fusion_mask(self, frame_mask: torch.Tensor) -> torch.Tensor:
        """frame_mask [B, F] -> the mask the blocks use [B, F] bool: the real frames
        (padding_rule "masked") or every frame ("released")."""
        mask = frame_mask.bool()
        return mask if self.cfg.padding_rule == "masked" else torch.ones_like(mask)

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
                fusion is text-guided (zeros = the agnostic view, see ``agnostic``), ignored
                otherwise.
        """
        v0 = self.embed_frames(frames)
        if not self.cfg.use_audio:
            return FusionOutput(v0)
        if self.text_guided and text is None:
            raise ValueError("this fusion is text-guided (--text_gate/--text_query/--query_gate): "
                             "pass the text embedding of every row (or use agnostic())")
        text = text if self.text_guided else None
        mask = self.fusion_mask(frame_mask)
        x, per_layer = v0, []
        for block in self.blocks:
            x, gates = block(x, mask, audio, text)
            per_layer.append(gates)
        return FusionOutput(self._blend(x, v0), self._stack_gates(per_layer), x)

    fuse_reference = forward

    def agnostic(self, frames: torch.Tensor, frame_mask: torch.Tensor, audio: torch.Tensor) -> FusionOutput:
        """The text-agnostic view (§4a): the fusion with t := 0, so the gates' text terms vanish
        and nothing is injected; a text-agnostic fusion is its own view. Gates: att/ff only.

        frames [B, F, D], frame_mask [B, F], audio [B, Q, D] -> FusionOutput.
        """
        if not self.text_guided:
            return self(frames, frame_mask, audio)
        out = self(frames, frame_mask, audio, frames.new_zeros(frames.shape[0], self.cfg.width))
        return FusionOutput(out.fused, {k: v for k, v in out.gates.items() if k != GATE_Q}, out.unblended)

    # ----- fast text-guided paths -----------------------------------------------------
    def prepare_videos(self, frames: torch.Tensor, frame_mask: torch.Tensor,
                       audio: torch.Tensor) -> VideoContext:
        """Text-independent fusion inputs, computed once per video.

        frames [Nv, F, D], frame_mask [Nv, F], audio Â [Nv, Q, D] -> VideoContext.
        """
        v0 = self.embed_frames(frames)
        mask = self.fusion_mask(frame_mask)
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

    def _check_text_guided(self) -> None:
        if not self.text_guided:
            raise ValueError("fuse_pairs / fuse_grid are for text-guided fusion; a text-agnostic "
                             "fusion fuses each video once with forward()")

    def fuse_pairs(self, videos: VideoContext, texts: TextContext, text_index: torch.Tensor,
                   video_index: torch.Tensor) -> FusionOutput:
        """Fuse pair p = (texts[text_index[p]], videos[video_index[p]]) for every p.

        text_index, video_index: LongTensor [P] -> FusionOutput(fused [P, F, D], gates [P, L]).
        """
        self._check_text_guided()
        vi, ti = video_index, text_index
        kv = [(k[vi], v[vi]) for k, v in zip(videos.keys, videos.values)]
        cross0 = videos.cross0[vi] if videos.cross0 is not None else None
        return self._fuse(videos, texts, ti, vi, kv, cross0)

    def fuse_grid(self, videos: VideoContext, texts: TextContext, text_index: torch.Tensor,
                  video_index: torch.Tensor) -> FusionOutput:
        """Fuse every pair of texts ``text_index`` [Tc] x videos ``video_index`` [Vc].

        Returns FusionOutput with fused [Vc * Tc, F, D] and gates [Vc * Tc, L], VIDEO-major
        (row v * Tc + t is text_index[t] fused with video_index[v]).
        """
        self._check_text_guided()
        tc = text_index.shape[0]
        ti = text_index.repeat(video_index.shape[0])
        vi = video_index.repeat_interleave(tc, output_size=tc * video_index.shape[0])
        kv = [(k[video_index], v[video_index]) for k, v in zip(videos.keys, videos.values)]
        cross0 = None
        if videos.cross0 is not None:
            c = videos.cross0[video_index]
            cross0 = c.unsqueeze(1).expand(-1, tc, -1, -1).reshape(-1, *c.shape[1:])
        return self._fuse(videos, texts, ti, vi, kv, cross0)

    def _fuse(self, videos: VideoContext, texts: TextContext, ti: torch.Tensor, vi: torch.Tensor,
              kv: list[tuple[torch.Tensor, torch.Tensor]], cross0: Optional[torch.Tensor]) -> FusionOutput:
        """The per-pair layers for pairs (ti [P], vi [P]) with per-layer keys/values ``kv``."""
        v0 = videos.v0[vi]
        mask = videos.frame_mask[vi]
        unit = texts.text_unit[ti] if texts.text_unit is not None else None
        x, per_layer = v0, []
        for layer, block in enumerate(self.blocks):
            hidden = {}
            for name, term in videos.gate_terms[layer].items():
                text_term = texts.gate_terms[layer].get(name)
                hidden[name] = term[vi] + text_term[ti] if text_term is not None else term[vi]
            key, value = kv[layer]
            x, gates = block.forward_pairs(x, mask, key, value, hidden, unit,
                                           cross0 if layer == 0 else None, add_frame_mean=layer > 0)
            per_layer.append(gates)
        return FusionOutput(self._blend(x, v0), self._stack_gates(per_layer))
