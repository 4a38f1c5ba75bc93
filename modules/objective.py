"""The training objective: in-batch adaptive-margin contrastive loss over the global batch
(docs/design.md §4, §6). ``ContrastiveObjective`` wraps an ``AVIGATE`` model and owns everything that
is about training rather than about the model: the all-gathers, the margins, which (text,
video) pairs a text-guided model fuses, the chunking of that fusion and the loss. It is the
module DistributedDataParallel wraps; the model stays a plain encoder + scorer.

Rule (docs/design.md §4): the logit of text i and video j equals ``AVIGATE.score`` of that pair, so a
text-guided model fuses video j under text i for every in-batch (i, j) it scores.

Shapes: Bl local batch of a rank, Bg global (gathered) batch, F frames, D width, L layers,
P pairs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from modules.loss import LossConfig, all_gather_no_grad, all_gather_with_grad, margin_contrastive_loss, \
    pair_margins
from modules import memory_plan
from modules.modeling import AVIGATE
from modules.pair_fusion import PairContext, fuse_pair_chunks, grid_plan, list_plan
from modules.similarity import exact_fp32, video_index

TRAINING_PAIRS = ("all", "hardest_k", "own_caption")


@dataclass
class ObjectiveConfig:
    """Training objective settings.

    Args:
        loss: margins (``--beta``, ``--margin_BD``, ``--margin_fixed``).
        training_pairs: which (text, video) pairs a text-guided model fuses: "all" (every
            in-batch pair, the rule of docs/design.md §4), "hardest_k" (the positive and the
            ``hardest_k`` hardest negatives of each text by the unfused frames' score; the
            other entries are excluded) or "own_caption" (DIAGNOSTIC, leaks: every video is
            fused only with its own caption, as the public implementation trains).
        hardest_k: negatives per text for "hardest_k".
        pairs_per_chunk: text-guided pairs fused per chunk in training, each chunk recomputed
            in the backward pass (``--train_pairs_per_chunk``); 0 fuses all of a rank's pairs
            at once and keeps their activations (fastest, most memory; see docs/precision_memory.md).
    """

    loss: LossConfig = field(default_factory=LossConfig)
    training_pairs: str = "all"
    hardest_k: int = 8
    pairs_per_chunk: int = 0

    def __post_init__(self):
        if self.training_pairs not in TRAINING_PAIRS:
            raise ValueError(f"training_pairs (--training_pairs) must be one of {TRAINING_PAIRS}, "
                             f"got {self.training_pairs!r}")
        if self.hardest_k < 1:
            raise ValueError(f"hardest_k (--hardest_k) must be >= 1, got {self.hardest_k}")
        if self.pairs_per_chunk < 0:
            raise ValueError(f"pairs_per_chunk (--train_pairs_per_chunk) must be >= 0, got {self.pairs_per_chunk}")


@dataclass
class TrainOutput:
    """loss (scalar); logits [Bg, Bg] = scores before the margins (-inf = pair excluded), the
    same on every rank; gate_stats name -> [L] mean |g| over the fused videos / pairs (detached)."""

    loss: torch.Tensor
    logits: torch.Tensor
    gate_stats: dict[str, torch.Tensor]


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _gate_stats(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Gate values (lists of name -> [..., L]) -> name -> mean |g| per layer [L] (detached)."""
    if not parts or not parts[0]:
        return {}
    return {name: torch.cat([p[name].detach().flatten(0, -2) for p in parts]).abs().mean(0)
            for name in parts[0]}


class ContrastiveObjective(nn.Module):
    """The loss of one (local) batch over the global batch; DDP wraps this module.

    Args:
        model: the AVIGATE model (its parameters are this module's).
        cfg: ObjectiveConfig.
    """

    def __init__(self, model: AVIGATE, cfg: ObjectiveConfig):
        super().__init__()
        self.model = model
        self.cfg = cfg
        self.last_pairs = 0  # pairs fused by the last forward (for out-of-memory messages)

    def pair_bytes(self, precision: str) -> float:
        """Training bytes per fused pair at this model's F, D, L (memory_plan.TRAIN_PAIR_BYTES, scaled)."""
        return memory_plan.pair_bytes(memory_plan.TRAIN_PAIR_BYTES, precision, self.model.cfg.fusion)

    def suggested_chunk(self, precision: str, device_bytes: Optional[int] = None) -> int:
        """A --train_pairs_per_chunk to try: a power of two whose chunk takes at most
        memory_plan.CHUNK_MEMORY_SHARE of the device, and at most half the current chunk."""
        return memory_plan.train_chunk(self.model.cfg.fusion, precision, self.cfg.pairs_per_chunk, device_bytes)

    def memory_hint(self, precision: str = "fp32") -> str:
        """What bounds the training memory of pair fusion and a value to try (a chunk within a
        quarter of the model's GPU), for out-of-memory messages."""
        if not self.model.text_guided or self.cfg.training_pairs == "own_caption":
            return "lower --batch_size or add --grad_checkpointing (CLIP towers)"
        device_bytes = memory_plan.device_memory_bytes(self.model.logit_scale.device)
        return memory_plan.train_memory_hint(self.model.cfg.fusion, precision, self.cfg.pairs_per_chunk,
                                             self.last_pairs, device_bytes)

    def forward(self, text_ids: torch.Tensor, text_mask: torch.Tensor, frames: torch.Tensor,
                frame_mask: torch.Tensor, audio: Optional[torch.Tensor] = None) -> TrainOutput:
        """In-batch adaptive-margin contrastive loss over the global (all-gathered) batch.

        Args:
            text_ids, text_mask: [Bl, L]; frames [Bl, F, 3, H, W]; frame_mask [Bl, F];
            audio: fbank [Bl, 1024, 128] or AST tokens [Bl, A, W_a] (None without audio).
        Returns: TrainOutput; ``logits[i, j]`` equals the model's score of text i and video j
        (a text-guided rank computes the rows of its own texts; they are all-gathered).
        """
        model = self.model
        text = model.encode_text(text_ids, text_mask).text
        mask = frame_mask.bool()
        feats = model.encode_video(frames, mask, audio, with_index=not model.text_guided)
        text_g = all_gather_with_grad(text)
        mask_g = all_gather_no_grad(mask)
        summary_g = all_gather_no_grad(model.video_summary(feats.frames.detach(), mask))
        margins = pair_margins(text_g, summary_g, self.cfg.loss)
        if not model.text_guided:
            logits = model.similarity(text_g, all_gather_with_grad(feats.index), mask_g)
            gate_stats = _gate_stats([feats.gates])
        elif self.cfg.training_pairs == "own_caption":
            # LEAKING diagnostic: each video fused only under its own caption, then scored
            # against every text as if the fused video were text-independent.
            ctx = model.pair_context(text, feats.frames, mask, feats.audio)
            own = torch.arange(text.shape[0], device=text.device)
            out = model.fusion.fuse_pairs(ctx.videos, ctx.texts, own, own)
            with exact_fp32(text.device):
                index_g = video_index(all_gather_with_grad(out.fused).float(), mask_g)
            logits = model.similarity(text_g, index_g, mask_g)
            gate_stats = _gate_stats([out.gates])
        else:
            rows, gate_stats = self._pair_rows(text, feats.frames, mask, feats.audio, mask_g)
            logits = all_gather_with_grad(rows)
        loss = margin_contrastive_loss(logits, margins, model.logit_scale)
        return TrainOutput(loss, logits, gate_stats)

    def _pair_rows(self, text: torch.Tensor, frames: torch.Tensor, mask: torch.Tensor,
                   audio: torch.Tensor, mask_g: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """This rank's logit rows [Bl, Bg]: local texts x all gathered videos, each pair fused
        under its own text ("all"), or only the positive and the hardest_k negatives (others
        -inf)."""
        model = self.model
        frames_g = all_gather_with_grad(frames)
        ctx = model.pair_context(text, frames_g, mask_g, all_gather_with_grad(audio))
        if self.cfg.training_pairs == "hardest_k":
            return self._hardest_k_rows(ctx, text, frames_g.detach(), mask_g)
        bl, bg = text.shape[0], mask_g.shape[0]
        self.last_pairs = bl * bg
        chunk = memory_plan.grid_chunk(bl, bg, self.cfg.pairs_per_chunk or bl * bg)
        # Text blocks outside: the backward pass accumulates the context's gradients chunk by
        # chunk in this order.
        plan = grid_plan(bl, bg, chunk, text.device, videos_outer=False)
        out = fuse_pair_chunks(model, text, plan, context=ctx, recompute=bool(self.cfg.pairs_per_chunk))
        return out.scores, _gate_stats([out.gates])

    def _hardest_k_rows(self, ctx: PairContext, text: torch.Tensor, frames_g: torch.Tensor,
                        mask_g: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Rows [Bl, Bg] with the positive and the hardest_k negatives of each local text."""
        ti, vi = self._hardest_pairs(text, frames_g, mask_g)
        self.last_pairs = ti.shape[0]
        plan = list_plan(ti, vi, self.cfg.pairs_per_chunk or ti.shape[0])
        out = fuse_pair_chunks(self.model, text, plan, context=ctx, recompute=bool(self.cfg.pairs_per_chunk))
        rows = out.scores.new_full((text.shape[0], mask_g.shape[0]), float("-inf")).index_put((ti, vi), out.scores)
        return rows, _gate_stats([out.gates])

    @torch.no_grad()
    def _hardest_pairs(self, text: torch.Tensor, frames_g: torch.Tensor,
                       mask_g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Positive + hardest_k negatives of each local text by the score of the unfused frames
        v0 -> (text_index [P], video_index [P])."""
        bl, bg = text.shape[0], frames_g.shape[0]
        cheap = self.model.unfused_scores(text, frames_g, mask_g)
        rows = torch.arange(bl, device=text.device)
        positive = _rank() * bl + rows
        cheap[rows, positive] = float("inf")
        k = min(self.cfg.hardest_k + 1, bg)
        vi = cheap.topk(k, dim=1).indices
        return rows.repeat_interleave(k, output_size=bl * k), vi.reshape(-1)
