"""Multi-grained text-video similarity (docs/design.md §5).

    s            = exp(logit_scale)     (the parameter is clamped at ln 100 after each step)
    global(t, V) = s * cos(t, normalize(masked_mean_f normalize(V_f)))
    local(t, V)  = (1/tau) * log sum_{f valid} exp(tau * s * cos(t, V_f))
    score        = (global + local) / 2      (alignment "both", the default)

``alignment`` selects the scheme (AVIGATEConfig.alignment, ``--alignment``; the paper's
Table 5): "global" scores with the global term alone, "local" with the local term alone,
"both" with their mean. Every scoring path (pair scores, score matrices, the cached video
index) takes it, so training logits and evaluation scores always use the same scheme.

The log-sum-exp subtracts its maximum and skips padded frames, so it never overflows. A
video without any valid frame has no visual evidence: both terms are 0 for it. Scores are
computed in full fp32 (``exact_fp32``: autocast off, no TF32): in bf16 scores of magnitude
20-60 would fall on a 0.125-0.25 grid and tie, and ties rank pessimistically.

Text-agnostic scoring caches each video as ``video_index`` rows [Nv, 1+F, D]: row 0 is the
unit global vector, rows 1..F the unit frames (padded frames zero), so scoring a batch of
texts is one matrix product over the whole cache plus a log-sum-exp over F. ``VideoIndex``
holds a large cache feature-major for fast single-text search.

Shapes: Nt texts, Nv videos, P pairs, F frames, D width.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import torch.nn.functional as F

from modules.architecture import ALIGNMENTS  # the global term, the local (log-sum-exp) term, or their mean

# CLIP keeps its learned temperature exp(logit_scale) at most 100: the parameter is clamped at
# ln 100 after each optimizer step (docs/design.md §5; a clamp in the forward would stop its gradient).
LOGIT_SCALE_MAX = 100.0
MAX_LOG_LOGIT_SCALE = math.log(LOGIT_SCALE_MAX)
# Rows of a video index before the frames: the global vector.
GLOBAL_ROWS = 1
# Default size of one [Nt, chunk, 1+F] fp32 block of cosines in VideoIndex.scores: small
# enough to stay in a CPU core's L2 / L3 share while the log-sum-exp passes over it (1-4 MiB
# measured best on an AVX-512 EPYC, bench/score_bench.py).
SCORE_TILE_BYTES = 4 << 20
# Floor of the max-subtracted exponents in the in-place log-sum-exp: exp(-80) ~ 2e-35 is
# nothing next to the maximum term exp(0) = 1, and inputs below about -87 (masked entries,
# underflow to denormals) take a scalar slow path in vectorized exp that costs ~10x.
EXP_FLOOR = -80.0


def logit_scale_value(logit_scale: torch.Tensor) -> torch.Tensor:
    """CLIP's log-temperature -> s = exp(logit_scale) (scalar tensor)."""
    return logit_scale.exp()


@contextlib.contextmanager
def exact_fp32(device: torch.device) -> Iterator[None]:
    """Run the enclosed forward computation in full fp32: autocast off and IEEE fp32 CUDA
    matmuls instead of TF32 (the flag is process-wide and restored afterwards; on the CPU it
    has no effect). Callers cast their inputs to fp32. The backward of what it encloses runs
    after it exits: ``exact_fp32_call`` covers both directions."""
    matmul = torch.backends.cuda.matmul
    # torch >= 2.9 has fp32_precision ("ieee" / "tf32"); older releases allow_tf32.
    name, ieee = ("fp32_precision", "ieee") if hasattr(matmul, "fp32_precision") else ("allow_tf32", False)
    previous = getattr(matmul, name)
    setattr(matmul, name, ieee)
    try:
        with torch.autocast(device_type=device.type, enabled=False):
            yield
    finally:
        setattr(matmul, name, previous)


class _ExactFP32Call(torch.autograd.Function):
    """fn(*inputs) whose forward and backward both run under ``exact_fp32``: the backward
    recomputes fn inside the context and differentiates that (as activation checkpointing
    does), so the global TF32 / autocast state at backward time cannot reach it."""

    @staticmethod
    def forward(ctx, fn, *inputs: torch.Tensor) -> torch.Tensor:
        ctx.fn = fn
        ctx.save_for_backward(*inputs)
        with exact_fp32(inputs[0].device):
            return fn(*inputs)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        inputs = [x.detach().requires_grad_(needed) for x, needed in zip(ctx.saved_tensors, ctx.needs_input_grad[1:])]
        wanted = [x for x in inputs if x.requires_grad]
        with torch.enable_grad(), exact_fp32(grad.device):
            grads = iter(torch.autograd.grad(ctx.fn(*inputs), wanted, grad, allow_unused=True))
        return (None, *(next(grads) if x.requires_grad else None for x in inputs))


def exact_fp32_call(fn, *inputs: torch.Tensor) -> torch.Tensor:
    """fn(*inputs) in exact fp32 in both directions (``exact_fp32`` in the forward and in the
    backward). ``fn`` must be a function of ``inputs`` alone (fp32 tensors; anything it
    closes over gets no gradient) returning one tensor."""
    if not (torch.is_grad_enabled() and any(x.requires_grad for x in inputs)):
        with exact_fp32(inputs[0].device):
            return fn(*inputs)
    return _ExactFP32Call.apply(fn, *inputs)


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

    The maximum is subtracted first. Padded entries get the dtype's lowest finite value rather
    than -inf, so a row without valid entries stays finite (also in the backward pass) before
    it is set to 0; in a row with a valid entry they contribute exp(-huge) = 0. Without
    autograd the work happens in place on ``z`` (a scratch tensor the caller gives up: on the
    CPU extra passes and allocations would cost as much as the products), with exponents
    floored at EXP_FLOOR (masked entries then add exp(-80) ~ 2e-35 each: no visible change).
    """
    lowest = torch.finfo(z.dtype).min
    if z.requires_grad:
        lse = torch.logsumexp(z.masked_fill(~mask, lowest), dim=-1)
    else:
        z = z.masked_fill_(~mask, lowest)
        peak = z.amax(dim=-1, keepdim=True)
        lse = peak.squeeze(-1) + z.sub_(peak).clamp_min_(EXP_FLOOR).exp_().sum(dim=-1).log()
    return torch.where(mask.any(dim=-1), lse, torch.zeros_like(lse))


def unit_frames(frames: torch.Tensor, frame_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """frames [..., F, D], frame_mask [..., F] -> (unit frames [..., F, D] with padded frames
    zeroed, unit global vector [..., D] = normalize(masked mean of the unit frames))."""
    mask = frame_mask.bool().unsqueeze(-1)
    unit = F.normalize(frames, dim=-1) * mask
    mean = unit.sum(-2) / mask.sum(-2).clamp_min(1).to(unit.dtype)
    return unit, F.normalize(mean, dim=-1)


def check_alignment(alignment: str) -> None:
    """Raise ValueError naming --alignment unless ``alignment`` is one of ALIGNMENTS."""
    if alignment not in ALIGNMENTS:
        raise ValueError(f"alignment (--alignment) must be one of {ALIGNMENTS}, got {alignment!r}")


def _combine(scaled: torch.Tensor, frame_mask: torch.Tensor, temperature: float,
             alignment: str = "both") -> torch.Tensor:
    """scaled [..., 1+F] = tau * s * cos(t, row) for the global row and the F frames,
    frame_mask [..., F] -> score [...]: global = s cos_global, local = lse_f(tau s cos_f) / tau,
    and (global + local) / 2 ("both"), or one of them alone.

    The log-sum-exp runs over all 1+F columns with the global one masked out: the contiguous
    rows vectorize far better on the CPU than the strided frame columns would. "global" skips
    it.
    """
    check_alignment(alignment)
    global_term = scaled[..., 0] / temperature  # a new tensor: the log-sum-exp may work in place
    if alignment == "global":
        return global_term
    local = masked_logsumexp(scaled, F.pad(frame_mask.bool(), (GLOBAL_ROWS, 0), value=False)) / temperature
    return local if alignment == "local" else (global_term + local) / 2


def scaled_unit_text(text: torch.Tensor, logit_scale: torch.Tensor, temperature: float) -> torch.Tensor:
    """text [N, D] -> tau * s * t / |t| [N, D], so products with unit rows are tau * s * cos."""
    return F.normalize(text, dim=-1) * (temperature * logit_scale_value(logit_scale))


def pair_scores(text: torch.Tensor, frames: torch.Tensor, frame_mask: torch.Tensor,
                logit_scale: torch.Tensor, temperature: float, alignment: str = "both") -> torch.Tensor:
    """Score of each pair: text [P, D], frames [P, F, D], frame_mask [P, F] -> [P]."""
    _check_shapes(text, frames, frame_mask)
    if text.shape[0] != frames.shape[0]:
        raise ValueError(f"pair_scores needs one text per video: text {tuple(text.shape)} vs "
                         f"frames {tuple(frames.shape)}")
    rows = video_index(frames, frame_mask)
    scaled = torch.einsum("pd,prd->pr", scaled_unit_text(text, logit_scale, temperature), rows)
    return _combine(scaled, frame_mask.bool(), temperature, alignment)


def global_local_scores(text: torch.Tensor, frames: torch.Tensor, frame_mask: torch.Tensor,
                        logit_scale: torch.Tensor, temperature: float, alignment: str = "both") -> torch.Tensor:
    """Score matrix [Nt, Nv].

    Args:
        text: text embeddings [Nt, D].
        frames: fused frames [Nv, F, D] (text-agnostic) or per pair [Nt, Nv, F, D].
        frame_mask: [Nv, F] (True/1 = real frame).
        logit_scale: CLIP's log-temperature (scalar tensor).
        temperature: tau of the local term.
        alignment: "both", "global" or "local" (module docstring).
    """
    _check_shapes(text, frames, frame_mask)
    if frames.dim() == 4:
        nt, nv = frames.shape[:2]
        if nt != text.shape[0]:
            raise ValueError(f"pair-fused frames {tuple(frames.shape)} need [Nt, Nv, F, D] with "
                             f"Nt = {text.shape[0]} texts {tuple(text.shape)}")
        mask = frame_mask.bool().expand(nt, -1, -1).reshape(nt * nv, -1)
        flat = pair_scores(text.repeat_interleave(nv, dim=0), frames.reshape(nt * nv, *frames.shape[2:]),
                           mask, logit_scale, temperature, alignment)
        return flat.view(nt, nv)
    return index_scores(text, video_index(frames, frame_mask), frame_mask, logit_scale, temperature,
                        alignment=alignment)


def video_index(frames: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
    """Per-video scoring rows: frames [Nv, F, D], frame_mask [Nv, F] -> [Nv, 1+F, D]
    (row 0 the unit global vector, rows 1..F the unit frames, padded frames zero)."""
    unit, global_vec = unit_frames(frames, frame_mask)
    return torch.cat([global_vec.unsqueeze(1), unit], dim=1)


@dataclass
class VideoIndex:
    """Text-agnostic scoring cache in feature-major layout, so that scoring one text streams
    the whole cache once through a matrix-vector product (the row-major product runs at about
    half the memory bandwidth on CPUs; see bench/score_bench.py).

    vectors [D, Nv * (1+F)]: column v * (1+F) + r is row r of ``video_index`` for video v;
    frame_mask [Nv, F] bool.
    """

    vectors: torch.Tensor
    frame_mask: torch.Tensor

    @classmethod
    def build(cls, rows: torch.Tensor, frame_mask: torch.Tensor,
              dtype: Optional[torch.dtype] = None) -> "VideoIndex":
        """rows [Nv, 1+F, D] from ``video_index``, frame_mask [Nv, F]; dtype: storage (e.g. fp16)."""
        if rows.dim() != 3 or rows.shape[1] != frame_mask.shape[1] + GLOBAL_ROWS or \
                rows.shape[0] != frame_mask.shape[0]:
            raise ValueError(f"video index rows {tuple(rows.shape)} do not match frame_mask "
                             f"{tuple(frame_mask.shape)}: expected [Nv, 1+F, D] and [Nv, F]")
        nv, r, d = rows.shape
        vectors = rows.reshape(nv * r, d).T.to(dtype or rows.dtype).contiguous()
        return cls(vectors, frame_mask.bool())

    def __len__(self) -> int:
        return self.frame_mask.shape[0]

    def scores(self, text: torch.Tensor, logit_scale: torch.Tensor, temperature: float,
               video_chunk: Optional[int] = None, alignment: str = "both") -> torch.Tensor:
        """text [Nt, D] -> scores [Nt, Nv] fp32: one product per chunk of ``video_chunk`` videos
        (None: as many as keep the [Nt, chunk, 1+F] cosines within SCORE_TILE_BYTES), then the
        log-sum-exp over F. The product runs in the storage dtype, the log-sum-exp in fp32."""
        d, rows = self.vectors.shape[0], self.frame_mask.shape[1] + GLOBAL_ROWS
        if text.dim() != 2 or text.shape[-1] != d:
            raise ValueError(f"text features {tuple(text.shape)} do not match the video index "
                             f"[D={d}, {self.vectors.shape[1]}]")
        t = scaled_unit_text(text.float(), logit_scale.float(), temperature).to(self.vectors.dtype)
        nv = len(self)
        step = video_chunk or max(1, SCORE_TILE_BYTES // (max(t.shape[0], 1) * rows * 4))
        out = []
        for start in range(0, nv, step):
            stop = min(start + step, nv)
            scaled = (t @ self.vectors[:, start * rows:stop * rows]).float().view(t.shape[0], stop - start, rows)
            out.append(_combine(scaled, self.frame_mask[start:stop], temperature, alignment))
        return torch.cat(out, dim=1) if out else text.new_zeros(text.shape[0], 0, dtype=torch.float32)


def index_scores(text: torch.Tensor, index: torch.Tensor, frame_mask: torch.Tensor,
                 logit_scale: torch.Tensor, temperature: float,
                 video_chunk: Optional[int] = None, alignment: str = "both") -> torch.Tensor:
    """Scores [Nt, Nv] of texts [Nt, D] against per-video rows index [Nv, 1+F, D]
    (``video_index``; any float dtype) with frame_mask [Nv, F]; ``VideoIndex`` is built chunk
    by chunk (``video_chunk`` videos, None = all at once)."""
    if text.shape[-1] != index.shape[-1]:
        raise ValueError(f"text features {tuple(text.shape)} do not match the video index "
                         f"{tuple(index.shape)}")
    nv = index.shape[0]
    step = video_chunk or max(nv, 1)
    out = [VideoIndex.build(index[s:s + step], frame_mask[s:s + step]).scores(text, logit_scale, temperature,
                                                                           alignment=alignment)
           for s in range(0, nv, step)]
    return torch.cat(out, dim=1) if out else text.new_zeros(text.shape[0], 0, dtype=torch.float32)
