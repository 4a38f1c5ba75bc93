"""Two gloo ranks holding half the batch each reproduce the single-process loss and gradients.

Each test spawns WORLD_SIZE processes; every rank holds a replica wrapped in
DistributedDataParallel (which averages gradients over ranks) and half of the batch. The
parent computes the loss and gradients of one process on the concatenated batch and
compares: max |difference| <= TOLERANCE. Computations run in float64 so the comparison
measures the gathering, not rounding.
"""
import math
import os
import socket
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from modules.loss import (LossConfig, adaptive_margins, all_gather_no_grad, all_gather_with_grad,
                          margin_contrastive_loss)

pytestmark = pytest.mark.distributed

WORLD_SIZE = 2
TOLERANCE = 1e-6
PROCESS_GROUP_TIMEOUT = timedelta(seconds=60)
# Toy sizes: global batch, frames, input widths, joint width.
GLOBAL_BATCH, FRAMES, TEXT_IN, FRAME_IN, WIDTH = 8, 3, 6, 5, 4
# beta small enough that the cap only bites for some pairs, so margins vary.
TOY_LOSS = LossConfig(beta=0.1, margin_cap=0.15)


class ToyRetrievalModel(nn.Module):
    """Small two-tower model trained with the margin loss over the gathered batch.

    Text-agnostic: logits = s * cos(t_i, v_j) from gathered embeddings. Text-guided: each
    rank scores its local texts against all gathered videos, each video shifted by a
    text-dependent vector (a stand-in for text-guided fusion), then gathers the row blocks.

    Args:
        text_guided: score every (text, video) pair under that text.
    """

    def __init__(self, text_guided: bool):
        super().__init__()
        self.text = nn.Sequential(nn.Linear(TEXT_IN, WIDTH), nn.Tanh(), nn.Linear(WIDTH, WIDTH))
        self.frame = nn.Sequential(nn.Linear(FRAME_IN, WIDTH), nn.Tanh(), nn.Linear(WIDTH, WIDTH))
        self.text_shift = nn.Linear(WIDTH, WIDTH) if text_guided else None
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def guided_rows(self, text: torch.Tensor, frames: torch.Tensor, scale: torch.Tensor):
        """Scores [Bl, Bg] of local texts [Bl, D] against gathered frames [Bg, F, D]."""
        shift = torch.tanh(self.text_shift(text))  # [Bl, D]
        fused = frames[None] + shift[:, None, None, :]  # [Bl, Bg, F, D]
        videos = F.normalize(fused.mean(dim=2), dim=-1)  # [Bl, Bg, D]
        return scale * torch.einsum("id,ijd->ij", F.normalize(text, dim=-1), videos)

    def forward(self, text_in: torch.Tensor, frames_in: torch.Tensor) -> torch.Tensor:
        """Loss over the global batch from local texts [Bl, TEXT_IN], frames [Bl, F, FRAME_IN]."""
        text = self.text(text_in)  # [Bl, D]
        frames = F.normalize(self.frame(frames_in), dim=-1)  # [Bl, F, D]
        video_mean = F.normalize(frames.mean(dim=1), dim=-1)  # [Bl, D]
        scale = self.logit_scale.exp().clamp(max=100)
        margins = adaptive_margins(all_gather_no_grad(text), all_gather_no_grad(video_mean),
                                   TOY_LOSS.beta, TOY_LOSS.margin_cap)
        if self.text_shift is None:
            text_all = F.normalize(all_gather_with_grad(text), dim=-1)
            logits = scale * text_all @ all_gather_with_grad(video_mean).t()
        else:
            rows = self.guided_rows(text, all_gather_with_grad(frames), scale)
            logits = all_gather_with_grad(rows)
        return margin_contrastive_loss(logits, margins, self.logit_scale)


def _toy_setup(text_guided: bool):
    """(model, batch) in float64 with a fixed seed, the batch a tuple of [GLOBAL_BATCH, ...]."""
    torch.manual_seed(0)
    model = ToyRetrievalModel(text_guided).double()
    batch = (torch.randn(GLOBAL_BATCH, TEXT_IN, dtype=torch.float64),
             torch.randn(GLOBAL_BATCH, FRAMES, FRAME_IN, dtype=torch.float64))
    return model, batch


def _loss_and_grads(model: nn.Module, batch) -> dict:
    """Backward of the model's loss on ``batch``; returns the loss and every parameter grad."""
    loss = model(*batch)
    loss.backward()
    module = model.module if isinstance(model, DistributedDataParallel) else model
    grads = {name: p.grad.detach().clone() for name, p in module.named_parameters()
             if p.requires_grad}
    return {"loss": loss.detach(), "grads": grads}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _init_rank(rank: int, port: int) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE,
                            timeout=PROCESS_GROUP_TIMEOUT)


def _local_half(batch, rank: int):
    local = GLOBAL_BATCH // WORLD_SIZE
    return tuple(x[rank * local:(rank + 1) * local] for x in batch)


def _toy_worker(rank: int, port: int, text_guided: bool, out_dir: str) -> None:
    _init_rank(rank, port)
    try:
        model, batch = _toy_setup(text_guided)
        ddp = DistributedDataParallel(model)
        torch.save(_loss_and_grads(ddp, _local_half(batch, rank)),
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _compare(reference: dict, out_dir: str, label: str) -> None:
    """Assert every rank's loss and averaged grads match the single-process reference."""
    worst = 0.0
    for rank in range(WORLD_SIZE):
        result = torch.load(os.path.join(out_dir, f"rank{rank}.pt"))
        assert result["grads"].keys() == reference["grads"].keys()
        errors = [(result["loss"] - reference["loss"]).abs().item()]
        errors += [(result["grads"][n] - g).abs().max().item()
                   for n, g in reference["grads"].items()]
        worst = max(worst, max(errors))
    print(f"{label}: max |distributed - single process| over loss and "
          f"{len(reference['grads'])} parameter grads = {worst:.3e}")
    assert worst <= TOLERANCE


@pytest.mark.parametrize("text_guided", [False, True], ids=["agnostic", "text_guided"])
def test_toy_model_matches_single_process(tmp_path, text_guided):
    model, batch = _toy_setup(text_guided)
    reference = _loss_and_grads(model, batch)
    assert all(g.abs().max() > 0 for g in reference["grads"].values())
    mp.spawn(_toy_worker, args=(_free_port(), text_guided, str(tmp_path)), nprocs=WORLD_SIZE)
    _compare(reference, str(tmp_path), f"toy {'text-guided' if text_guided else 'agnostic'}")


def _gather_checks_worker(rank: int, port: int, out_dir: str) -> None:
    """Gather contents, a transposed incoming gradient, and unequal local batches."""
    _init_rank(rank, port)
    try:
        local = torch.arange(6.0, dtype=torch.float64).view(2, 3) + 10 * rank
        local.requires_grad_()
        gathered = all_gather_with_grad(local)  # [4, 3]
        weight = torch.arange(12.0, dtype=torch.float64).view(3, 4)
        # d/d(gathered) of sum(gathered.t() * weight) is weight.t(): a non-contiguous gradient.
        (gathered.t() * weight).sum().backward()
        results = {"gathered": gathered.detach(), "no_grad": all_gather_no_grad(local),
                   "grad": local.grad}
        for gather in (all_gather_with_grad, all_gather_no_grad):
            with pytest.raises(ValueError) as error:
                gather(torch.zeros(3 + rank, WIDTH))
            results[gather.__name__] = str(error.value)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_gather_primitives(tmp_path):
    mp.spawn(_gather_checks_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD_SIZE)
    parts = [torch.arange(6.0, dtype=torch.float64).view(2, 3) + 10 * r for r in range(WORLD_SIZE)]
    weight = torch.arange(12.0, dtype=torch.float64).view(3, 4)
    for rank in range(WORLD_SIZE):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(result["gathered"], torch.cat(parts), rtol=0, atol=0)
        torch.testing.assert_close(result["no_grad"], torch.cat(parts), rtol=0, atol=0)
        # Both ranks computed the same loss, so each owner receives world_size x its slice.
        want = WORLD_SIZE * weight.t()[2 * rank:2 * (rank + 1)]
        torch.testing.assert_close(result["grad"], want, rtol=0, atol=0)
        for name in ("all_gather_with_grad", "all_gather_no_grad"):
            assert f"(3, {WIDTH})" in result[name] and f"(4, {WIDTH})" in result[name]
