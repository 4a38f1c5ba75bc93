"""Adaptive-margin contrastive loss and the all-gathers that span it over ranks (docs/design.md §6).

Shapes: B batch (Bl local to a rank, Bg gathered over ranks), D width, Bt/Bv rows/columns
of a logit matrix.

Gathering. Under torch.distributed every rank gathers the features of all ranks with
``all_gather_with_grad`` and computes the same global loss. The gather's backward sums the
gradient every rank computed for a slice back onto the rank that owns it, so each rank's
parameter gradient is ``world_size`` times its own share of the global gradient. DDP then
averages over ranks (divides by ``world_size``), which yields exactly the gradient one
process would compute on the concatenated batch. Everything here also runs as a single
process without any process group: the gathers are then the identity. The collectives work
on contiguous buffers (one all-gather, one reduce-scatter in backward), which NCCL and gloo
both need and which sidesteps gloo's stride-ignoring scatter in the list-based all_gather's
backward (pytorch issues #24836, #192920).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F


@dataclass
class LossConfig:
    """Margin settings.

    Args:
        beta: margin slope ``--beta``; 0 gives the plain symmetric InfoNCE.
        margin_cap: upper bound on every margin, ``--margin_BD`` (0.1 MSR-VTT, 0.05 VATEX,
            0.1 Charades); 0 gives the plain symmetric InfoNCE.
        fixed: ``--margin_fixed``: every off-diagonal margin equals ``margin_cap`` (the
            paper's fixed-margin row of Table 4; ``beta`` is then unused).
    """
    beta: float = 0.2
    margin_cap: float = 0.1
    fixed: bool = False


def _distributed_world_size() -> int:
    """World size of the default process group, 1 when none is initialized."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


# Set to 1 to check before every gather that all ranks pass the same shape (one extra small
# collective and a host synchronization per gather). Off by default: the sharded sampler gives
# every rank the same shapes, and a mismatch otherwise aborts inside the backend without a
# message.
CHECK_GATHERS_ENV = "AVIGATE_CHECK_GATHERS"


def _check_equal_shapes(x: torch.Tensor) -> None:
    """Raise unless every rank holds a tensor of the same shape as ``x`` (debug check)."""
    shape = torch.tensor(x.shape, dtype=torch.long, device=x.device)
    shapes = [torch.empty_like(shape) for _ in range(dist.get_world_size())]
    dist.all_gather(shapes, shape)
    sizes = [tuple(s.tolist()) for s in shapes]
    if any(s != sizes[0] for s in sizes):
        raise ValueError(
            f"modules/loss.py: all-gather needs the same local batch on every rank, got shapes "
            f"{sizes} (rank order); use a sampler that gives every rank the same number of "
            f"samples (drop_last=True for training)")


# torch >= 2.14 names the single-tensor collectives *_single; older releases *_tensor.
_gather_into = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_into = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _gather_tensor(x: torch.Tensor) -> torch.Tensor:
    """[Bl, ...] from every rank -> [world_size * Bl, ...] in rank order (one collective on a
    contiguous buffer; every rank must pass the same shape, which the sharded sampler
    guarantees; AVIGATE_CHECK_GATHERS=1 checks it)."""
    if os.environ.get(CHECK_GATHERS_ENV) == "1":
        _check_equal_shapes(x)
    x = x.contiguous()
    out = x.new_empty((_distributed_world_size() * x.shape[0], *x.shape[1:]))
    _gather_into(out, x)
    return out


class _GatherWithGrad(torch.autograd.Function):
    """All-gather whose backward sums every rank's gradient of each slice onto its owner
    (a reduce-scatter of the contiguous gradient)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return _gather_tensor(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        out = grad.new_empty((grad.shape[0] // _distributed_world_size(), *grad.shape[1:]))
        _reduce_scatter_into(out, grad)
        return out


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every rank, keeping gradients flowing back to the owner.

    The identity without an initialized process group or with world size 1. Otherwise the
    backward sums every rank's gradient for each slice onto the rank owning that slice; see
    the module docstring for why DDP's averaging then equals the single-process gradient.

    Args:
        x: local features [Bl, ...]; the same shape on every rank.

    Returns:
        gathered features [Bg, ...] with Bg = world_size * Bl, in rank order.
    """
    if _distributed_world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


@torch.no_grad()
def all_gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every rank without autograd (e.g. inputs of the margins).

    Args:
        x: local tensor [Bl, ...]; the same shape on every rank.

    Returns:
        gathered tensor [Bg, ...], detached, in rank order (``x`` detached as one process).
    """
    x = x.detach()
    if _distributed_world_size() == 1:
        return x
    return _gather_tensor(x)


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """``x`` cast up to fp32 when stored in a lower precision (fp16/bf16); fp64 stays fp64."""
    if torch.finfo(x.dtype).bits < torch.finfo(torch.float32).bits:
        return x.float()
    return x


@torch.no_grad()
def adaptive_margins(text: torch.Tensor, video_mean: torch.Tensor, beta: float,
                     margin_cap: float) -> torch.Tensor:
    """Pairwise margins m_ij = min(beta * (1 - (cos(t_i, t_j) + cos(v_i, v_j)) / 2), cap).

    Pairs that look alike in both modalities (likely false negatives) get small margins;
    dissimilar pairs get up to ``margin_cap``. No gradient; the diagonal is exactly zero.

    Args:
        text: text embeddings [B, D] (normalized here).
        video_mean: per-video mean embeddings [B, D], the v-bar of docs/design.md §6 (normalized here).
        beta: margin slope ``--beta``.
        margin_cap: margin upper bound ``--margin_BD``.

    Returns:
        margins [B, B], at least fp32.
    """
    if text.shape != video_mean.shape or text.dim() != 2:
        raise ValueError(f"modules/loss.py: adaptive_margins needs text [B, D] and video_mean "
                         f"[B, D] of equal shape, got {tuple(text.shape)} and "
                         f"{tuple(video_mean.shape)}")
    t = F.normalize(_at_least_fp32(text), dim=-1)
    v = F.normalize(_at_least_fp32(video_mean), dim=-1)
    similarity = (t @ t.t() + v @ v.t()) / 2
    margins = torch.clamp(beta * (1 - similarity), max=margin_cap)
    return margins.fill_diagonal_(0.0)


def pair_margins(text: torch.Tensor, video_mean: torch.Tensor, cfg: LossConfig) -> torch.Tensor:
    """Margins [B, B] of ``cfg``: ``margin_cap`` off the diagonal (``cfg.fixed``) or the
    adaptive margins of text [B, D] and video_mean [B, D]; the diagonal is zero."""
    if not cfg.fixed:
        return adaptive_margins(text, video_mean, cfg.beta, cfg.margin_cap)
    margins = torch.full((text.shape[0], text.shape[0]), cfg.margin_cap, device=text.device,
                         dtype=_at_least_fp32(text).dtype)
    return margins.fill_diagonal_(0.0)


def margin_contrastive_loss(logits: torch.Tensor, margins: Optional[torch.Tensor],
                            logit_scale: Union[torch.Tensor, float]) -> torch.Tensor:
    """Symmetric cross-entropy over logits + s * margins, the diagonal being the positives.

    Off-diagonal entries equal to -inf are excluded from both softmaxes (a hardest-K
    selection marks dropped negatives that way); the diagonal must stay finite, so every
    row and column keeps its positive (checked on the device, without waiting for it). Computed in fp32 (fp64 inputs stay fp64) even
    under autocast.

    Args:
        logits: scores [Bt, Bv] with Bt = Bv, already scaled by s (docs/design.md §5).
        margins: adaptive margins [Bt, Bv] (only the off-diagonal entries are used), or None
            for plain InfoNCE.
        logit_scale: CLIP's log scale (tensor or float); s = exp(logit_scale), the same s as in
            the similarity, so gradients reach it through s * m too (the parameter itself is
            clamped at ln 100 after each optimizer step, docs/design.md §5).

    Returns:
        scalar loss: mean of the row-wise (text->video) and column-wise (video->text) CE.
    """
    if logits.dim() != 2 or logits.shape[0] != logits.shape[1]:
        raise ValueError(f"modules/loss.py: logits must be square [B, B] with positives on the "
                         f"diagonal, got {tuple(logits.shape)}")
    with torch.autocast(device_type=logits.device.type, enabled=False):
        logits = _at_least_fp32(logits)
        # A device-side check: no host synchronization (CUDA reports it asynchronously).
        torch._assert_async(~torch.isneginf(logits.diagonal()).any(),
                            "modules/loss.py: a diagonal (positive) logit is -inf; a hardest-K "
                            "selection must keep every positive pair")
        if margins is not None:
            if margins.shape != logits.shape:
                raise ValueError(f"modules/loss.py: margins {tuple(margins.shape)} must match "
                                 f"logits {tuple(logits.shape)}")
            scale = torch.as_tensor(logit_scale, device=logits.device).to(logits.dtype).exp()
            diagonal = torch.eye(logits.shape[0], dtype=torch.bool, device=logits.device)
            logits = logits + scale * margins.to(logits.dtype).masked_fill(diagonal, 0.0)
        targets = torch.arange(logits.shape[0], device=logits.device)
        text_to_video = F.cross_entropy(logits, targets)
        video_to_text = F.cross_entropy(logits.t(), targets)
        return (text_to_video + video_to_text) / 2
