"""Multi-grained text-video similarity (DESIGN §5).

    s            = min(exp(logit_scale), 100)
    global(t, V) = s * cos(t, normalize(masked_mean_f normalize(V_f)))
    local(t, V)  = (1/tau) * log sum_{f valid} exp(tau * s * cos(t, V_f))
    score        = (global + local) / 2

The log-sum-exp subtracts its maximum and skips padded frames, so it never overflows. A
video without any valid frame has no visual evidence: both terms are 0 for it.

Text-agnostic scoring caches each video as a ``video index`` [Nv, F+1, D]: row 0 is the
unit global vector, rows 1..F the unit frames (padded frames zero), so scoring a batch of
texts is one matrix product over the whole cache plus a log-sum-exp over F.

Shapes: Nt texts, Nv videos, P pairs, F frames, D width.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

# CLIP clamps its learned temperature exp(logit_scale) at 100.
LOGIT_SCALE_MAX = 100.0
# Rows of a video index before the frames: the global vector.
GLOBAL_ROWS = 1


def logit_scale_value(logit_scale: torch.Tensor) -> torch.Tensor:
    """CLIP's log-temperature -> s = min(exp(logit_scale), 100) (scalar tensor)."""
    return logit_scale.exp().clamp(max=LOGIT_SCALE_MAX)


def _check_shapes(text: torch.Tensor, frames: torch.Tensor, frame_mask: torch.Tensor) -> None:
    if text.shape[-1] != frames.shape[-1]:
        raise ValueError(f"text features {tuple(text.shape)} and video frames {tuple(frames.shape)} "
                         f"have different widths")
    if tuple(frame_mask.shape) != tuple(frames.shape[-3:-1]) and \
            tuple(frame_mask.shape) != tuple(frames.shape[:-1]):
        raise ValueError(f"frame_mask {tuple(frame_mask.shape)} does not match video frames "
                         f"{tuple(frames.shape)}: expected [.., F]")


def masked_logsumexp(z: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """z [..., F], mask [..., F] bool -> log sum_{valid f} exp(z_f) [...]; 0 where none is valid.

    Max-subtracted; the clamp keeps log finite (and its gradient free of NaN) for empty rows.
    """
    z = z.masked_fill(~mask, float("-inf"))
    peak = z.amax(dim=-1, keepdim=True)
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak)).detach()
    total = (z - peak).exp().sum(dim=-1).clamp_min(torch.finfo(z.dtype).tiny)
    out = peak.squeeze(-1) + total.log()
    return torch.where(mask.any(dim=-1), out, torch.zeros_like(out))


def unit_frames(frames: torch.Tensor, frame_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """frames [..., F, D], frame_mask [..., F] -> (unit frames [..., F, D] with padded frames
    zeroed, unit global vector [..., D] = normalize(masked mean of the unit frames))."""
    mask = frame_mask.bool().unsqueeze(-1)
    unit = F.normalize(frames, dim=-1) * mask
    mean = unit.sum(-2) / mask.sum(-2).clamp_min(1).to(unit.dtype)
    return unit, F.normalize(mean, dim=-1)


def _combine(global_cos: torch.Tensor, frame_cos: torch.Tensor, frame_mask: torch.Tensor,
             scale: torch.Tensor, temperature: float) -> torch.Tensor:
    """global_cos [...], frame_cos [..., F], frame_mask [..., F] -> score [...]."""
    global_term = scale * global_cos
    local_term = masked_logsumexp(temperature * scale * frame_cos, frame_mask) / temperature
    return (global_term + local_term) / 2


def pair_scores(text: torch.Tensor, frames: torch.Tensor, frame_mask: torch.Tensor,
                logit_scale: torch.Tensor, temperature: float) -> torch.Tensor:
    """Score of each pair: text [P, D], frames [P, F, D], frame_mask [P, F] -> [P]."""
    _check_shapes(text, frames, frame_mask)
    if text.shape[0] != frames.shape[0]:
        raise ValueError(f"pair_scores needs one text per video: text {tuple(text.shape)} vs "
                         f"frames {tuple(frames.shape)}")
    mask = frame_mask.bool()
    unit, global_vec = unit_frames(frames, mask)
    t = F.normalize(text, dim=-1)
    frame_cos = torch.einsum("pd,pfd->pf", t, unit)
    global_cos = (t * global_vec).sum(-1)
    return _combine(global_cos, frame_cos, mask, logit_scale_value(logit_scale), temperature)


def global_local_scores(text: torch.Tensor, frames: torch.Tensor, frame_mask: torch.Tensor,
                        logit_scale: torch.Tensor, temperature: float) -> torch.Tensor:
    """Score matrix [Nt, Nv].

    Args:
        text: text embeddings [Nt, D].
        frames: fused frames [Nv, F, D] (text-agnostic) or per pair [Nt, Nv, F, D].
        frame_mask: [Nv, F] (True/1 = real frame).
        logit_scale: CLIP's log-temperature (scalar tensor).
        temperature: tau of the local term.
    """
    _check_shapes(text, frames, frame_mask)
    if frames.dim() == 4:
        nt, nv = frames.shape[:2]
        if nt != text.shape[0]:
            raise ValueError(f"pair-fused frames {tuple(frames.shape)} need [Nt, Nv, F, D] with "
                             f"Nt = {text.shape[0]} texts {tuple(text.shape)}")
        mask = frame_mask.bool().expand(nt, -1, -1).reshape(nt * nv, -1)
        flat = pair_scores(text.repeat_interleave(nv, dim=0), frames.reshape(nt * nv, *frames.shape[2:]),
                           mask, logit_scale, temperature)
        return flat.view(nt, nv)
    return index_scores(text, video_index(frames, frame_mask), frame_mask, logit_scale, temperature)


def video_index(frames: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
    """Text-agnostic scoring cache: frames [Nv, F, D], frame_mask [Nv, F] -> [Nv, 1+F, D]
    (row 0 the unit global vector, rows 1..F the unit frames, padded frames zero)."""
    unit, global_vec = unit_frames(frames, frame_mask)
    return torch.cat([global_vec.unsqueeze(1), unit], dim=1)


def index_scores(text: torch.Tensor, index: torch.Tensor, frame_mask: torch.Tensor,
                 logit_scale: torch.Tensor, temperature: float,
                 video_chunk: Optional[int] = None) -> torch.Tensor:
    """Scores of texts against a video index: one matrix product plus a log-sum-exp over F.

    Args:
        text: [Nt, D]; index: [Nv, 1+F, D] from ``video_index`` (any float dtype: the
            product runs in the index's dtype, the log-sum-exp in fp32).
        frame_mask: [Nv, F].
        logit_scale, temperature: as in ``global_local_scores``.
        video_chunk: videos per product (bounds the [Nt, chunk, 1+F] intermediate); None = all.
    Returns: [Nt, Nv] fp32.
    """
    if text.shape[-1] != index.shape[-1] or index.shape[1] != frame_mask.shape[1] + GLOBAL_ROWS:
        raise ValueError(f"text features {tuple(text.shape)} do not match the video index "
                         f"{tuple(index.shape)} / frame_mask {tuple(frame_mask.shape)}")
    scale = logit_scale_value(logit_scale).float()
    t = F.normalize(text.float(), dim=-1).to(index.dtype)
    mask = frame_mask.bool()
    nv, rows, d = index.shape
    step = video_chunk or max(nv, 1)
    out = []
    for start in range(0, nv, step):
        block = index[start:start + step]
        cos = (t @ block.reshape(-1, d).T).float().view(t.shape[0], block.shape[0], rows)
        out.append(_combine(cos[..., 0], cos[..., GLOBAL_ROWS:], mask[start:start + step],
                            scale, temperature))
    return torch.cat(out, dim=1) if out else text.new_zeros(text.shape[0], 0)
