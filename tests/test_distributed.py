"""Two gloo ranks holding half the batch each reproduce the single-process loss and gradients.

One spawn of WORLD_SIZE processes (a module fixture, so the start-up is paid once) runs
every scenario: each rank holds a replica wrapped in DistributedDataParallel (which
averages gradients over ranks) and half of the batch. Each test computes the loss and
gradients of one process on the concatenated batch and compares: max |difference| <=
TOLERANCE. Computations run in float64 so the comparison measures the gathering, not
rounding (AVIGATE's LayerNorms compute in fp32, which puts its agreement near 1e-8).
"""
import math
import os
from datetime import timedelta
from functools import partial

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from modules.loss import (CHECK_GATHERS_ENV, LossConfig, adaptive_margins, all_gather_no_grad, all_gather_with_grad,
                          margin_contrastive_loss)
from modules.modeling import AVIGATE, AVIGATEConfig
from modules.objective import ContrastiveObjective, ObjectiveConfig
from modules.optimization import freeze_parameters
from tests.localhost import free_port

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


# The real tiny AVIGATE: global batch, padded text length, real tokens per text (start and
# end included), real frames per video (the rest padded).
AVIGATE_BATCH, TEXT_LEN = 4, 8
AVIGATE_TEXT_LENGTHS = (5, 8, 3, 6)
AVIGATE_REAL_FRAMES = (4, 2, 3, 1)
START_TOKEN, END_TOKEN = 49406, 49407
AVIGATE_VARIANTS = {
    "agnostic": ({}, {}),
    # text_init "normal": every text term non-zero, so every parameter has a gradient to compare
    # (with the zero start the query gate's text columns get theirs only after a step).
    "text_guided": ({"text_gate": True, "text_query": True, "query_gate": True, "text_init": "normal"}, {}),
    # Only the positive and the hardest negative of each text: the other logits are -inf.
    "text_guided_hardest_k": ({"text_gate": True, "text_query": True, "query_gate": True, "text_init": "normal"},
                              {"training_pairs": "hardest_k", "hardest_k": 1}),
}


class TrainingLoss(nn.Module):
    """The AVIGATE training objective reduced to its loss, so DDP and the reference share code.

    Args:
        model: AVIGATE.
        objective_fields: ObjectiveConfig fields.
    """

    def __init__(self, model: AVIGATE, **objective_fields):
        super().__init__()
        self.objective = ContrastiveObjective(model, ObjectiveConfig(**objective_fields))

    def forward(self, *batch: torch.Tensor) -> torch.Tensor:
        return self.objective(*batch).loss


def _avigate_setup(variant: str):
    """(TrainingLoss over a float64 tiny AVIGATE with training freezing, batch)."""
    fusion_flags, objective_fields = AVIGATE_VARIANTS[variant]
    torch.manual_seed(0)
    cfg = AVIGATEConfig.tiny(**fusion_flags)
    model = AVIGATE(cfg).double()
    freeze_parameters(model, freeze_layer_num=0)
    frames_per_video = cfg.fusion.max_frames
    resolution = cfg.clip.image_resolution
    lengths = torch.tensor(AVIGATE_TEXT_LENGTHS)
    positions = torch.arange(TEXT_LEN)
    text_mask = (positions < lengths[:, None]).long()
    text_ids = torch.randint(1, START_TOKEN, (AVIGATE_BATCH, TEXT_LEN)) * text_mask
    text_ids[:, 0] = START_TOKEN
    text_ids[torch.arange(AVIGATE_BATCH), lengths - 1] = END_TOKEN
    frame_mask = (torch.arange(frames_per_video) < torch.tensor(AVIGATE_REAL_FRAMES)[:, None]).long()
    frames = torch.randn(AVIGATE_BATCH, frames_per_video, 3, resolution, resolution,
                         dtype=torch.float64) * frame_mask[:, :, None, None, None]
    audio_tokens = torch.randn(AVIGATE_BATCH, cfg.ast.num_output_tokens, cfg.ast.embed_dim,
                               dtype=torch.float64)
    return TrainingLoss(model, **objective_fields), (text_ids, text_mask, frames, frame_mask, audio_tokens)


SCENARIOS = {
    "toy_agnostic": partial(_toy_setup, text_guided=False),
    "toy_text_guided": partial(_toy_setup, text_guided=True),
    **{f"avigate_{variant}": partial(_avigate_setup, variant) for variant in AVIGATE_VARIANTS},
}


def _loss_and_grads(model: nn.Module, batch) -> dict:
    """Backward of the model's loss on ``batch``; returns the loss and every trainable grad."""
    loss = model(*batch)
    loss.backward()
    module = model.module if isinstance(model, DistributedDataParallel) else model
    grads = {name: p.grad.detach().clone() for name, p in module.named_parameters()
             if p.requires_grad}
    return {"loss": loss.detach(), "grads": grads}


def _local_half(batch, rank: int):
    """This rank's contiguous share of every tensor in ``batch`` (rank order = batch order)."""
    local = batch[0].shape[0] // WORLD_SIZE
    return tuple(x[rank * local:(rank + 1) * local] for x in batch)


def _gather_checks(rank: int, out_dir: str) -> None:
    """Gather contents, a transposed incoming gradient, and unequal local batches."""
    local = torch.arange(6.0, dtype=torch.float64).view(2, 3) + 10 * rank
    local.requires_grad_()
    gathered = all_gather_with_grad(local)  # [4, 3]
    weight = torch.arange(12.0, dtype=torch.float64).view(3, 4)
    # d/d(gathered) of sum(gathered.t() * weight) is weight.t(): a non-contiguous gradient.
    (gathered.t() * weight).sum().backward()
    results = {"gathered": gathered.detach(), "no_grad": all_gather_no_grad(local),
               "grad": local.grad}
    os.environ[CHECK_GATHERS_ENV] = "1"  # the debug check (off by default: it costs a sync)
    for gather in (all_gather_with_grad, all_gather_no_grad):
        with pytest.raises(ValueError) as error:
            gather(torch.zeros(3 + rank, WIDTH))
        results[gather.__name__] = str(error.value)
    del os.environ[CHECK_GATHERS_ENV]
    torch.save(results, os.path.join(out_dir, f"gather_rank{rank}.pt"))


def _worker(rank: int, port: int, out_dir: str) -> None:
    """Run the gather checks and every scenario on this rank, saving results to ``out_dir``."""
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE,
                            timeout=PROCESS_GROUP_TIMEOUT)
    try:
        _gather_checks(rank, out_dir)
        for name, setup in SCENARIOS.items():
            model, batch = setup()
            result = _loss_and_grads(DistributedDataParallel(model), _local_half(batch, rank))
            torch.save(result, os.path.join(out_dir, f"{name}_rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def distributed_dir(tmp_path_factory):
    """Folder of every rank's results, written by one spawn of WORLD_SIZE gloo ranks."""
    out_dir = tmp_path_factory.mktemp("distributed")
    mp.spawn(_worker, args=(free_port(), str(out_dir)), nprocs=WORLD_SIZE)
    return out_dir


def test_gather_primitives(distributed_dir):
    parts = [torch.arange(6.0, dtype=torch.float64).view(2, 3) + 10 * r for r in range(WORLD_SIZE)]
    weight = torch.arange(12.0, dtype=torch.float64).view(3, 4)
    for rank in range(WORLD_SIZE):
        result = torch.load(distributed_dir / f"gather_rank{rank}.pt")
        torch.testing.assert_close(result["gathered"], torch.cat(parts), rtol=0, atol=0)
        torch.testing.assert_close(result["no_grad"], torch.cat(parts), rtol=0, atol=0)
        # Both ranks computed the same loss, so each owner receives world_size x its slice.
        want = WORLD_SIZE * weight.t()[2 * rank:2 * (rank + 1)]
        torch.testing.assert_close(result["grad"], want, rtol=0, atol=0)
        for name in ("all_gather_with_grad", "all_gather_no_grad"):
            assert f"(3, {WIDTH})" in result[name] and f"(4, {WIDTH})" in result[name]


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_matches_single_process(distributed_dir, scenario):
    model, batch = SCENARIOS[scenario]()
    reference = _loss_and_grads(model, batch)
    assert all(g.abs().max() > 0 for g in reference["grads"].values())
    worst = 0.0
    for rank in range(WORLD_SIZE):
        result = torch.load(distributed_dir / f"{scenario}_rank{rank}.pt")
        assert result["grads"].keys() == reference["grads"].keys()
        errors = [(result["loss"] - reference["loss"]).abs().item()]
        errors += [(result["grads"][n] - g).abs().max().item()
                   for n, g in reference["grads"].items()]
        worst = max(worst, max(errors))
    print(f"{scenario}: max |distributed - single process| over the loss and "
          f"{len(reference['grads'])} parameter grads = {worst:.3e}")
    assert worst <= TOLERANCE
