"""Tests that prove learning (issue 10, deliverable 7).

- Overfitting: a tiny model reaches t2v R@1 = 100 on 8 (text, video) pairs within a fixed
  number of optimizer steps, text-agnostic and text-guided, through the real objective and
  optimizer (ContrastiveObjective + build_optimizer).
- Gradient accumulation: each micro-batch is its own contrastive batch (as released), so
  ``--gradient_accumulation_steps 2`` at micro-batch 2 is the update of the mean of the two
  micro-batch losses, NOT the update of one contrastive batch of 4; and under DDP (2 gloo
  ranks, no_sync on the first micro-batch) it equals the one-process update.
- Model selection: ``--val_csv`` picks the best validation epoch and the test step evaluates
  exactly that file (through ``main_task_retrieval.main`` on generated data).
"""
from __future__ import annotations

import copy
import json
import os
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

import evaluation
import main_task_retrieval
import training
import util
from dataloaders.base import video_inputs
from metrics import retrieval_metrics
from modules.ast import ASTConfig
from modules.modeling import AVIGATE, AVIGATEConfig
from modules.objective import ContrastiveObjective, ObjectiveConfig
from modules.optimization import OptimConfig, build_optimizer, build_scheduler
from tests.datagen import make_msrvtt
from tests.localhost import free_port
from tests.test_modeling import texts, videos
from tests.test_train_e2e import read_jsonl, tiny_flags, write_tiny_checkpoints

# A shorter spectrogram (96 frames: 12 x 9 patches + 1 = 109 AST tokens instead of 1,213)
# keeps the many training steps here fast; nothing in the objective depends on A.
FAST_AST_FRAMES = 96
OVERFIT_PAIRS = 8
# Measured: R@1 = 100 at step 8 (agnostic) and 9 (text-guided), from 12.5 (lr 1e-3); 25 leaves
# room for changes in initialization, while a model that does not learn stays near chance (12.5).
OVERFIT_MAX_STEPS = 25
OVERFIT_LR = 1e-3
GUIDED = dict(text_gate=True, text_query=True, query_gate=True)


def fast_config(**fusion_flags) -> AVIGATEConfig:
    """AVIGATEConfig.tiny with a short spectrogram (fewer audio tokens)."""
    cfg = AVIGATEConfig.tiny(**fusion_flags)
    return replace(cfg, ast=replace(ASTConfig.tiny(), target_frames=FAST_AST_FRAMES))


def pair_batch(model: AVIGATE, n: int, seed: int, fbank: bool = False) -> dict:
    """n (text, video) pairs in the collated layout of the training loader (uint8 frames,
    normalized on the device by ``video_inputs``; video 1 has padded frames), audio as AST
    tokens or (``fbank``) as fbanks."""
    ids, mask = texts(n, seed=seed)
    cfg = model.cfg
    g = torch.Generator().manual_seed(seed)
    res, f = cfg.clip.image_resolution, cfg.fusion.max_frames
    frame_mask = torch.ones(n, f, dtype=torch.long)
    if n > 1:
        frame_mask[1, f // 2:] = 0
    pixels = torch.randint(0, 256, (n, f, 3, res, res), generator=g, dtype=torch.uint8)
    batch = {"text_ids": ids, "text_mask": mask, "frames": pixels, "frame_mask": frame_mask}
    if fbank:
        batch["fbank"] = torch.randn(n, cfg.ast.target_frames, cfg.ast.num_mel_bins, generator=g)
    else:
        batch["audio_tokens"] = torch.randn(n, cfg.ast.num_output_tokens, cfg.ast.embed_dim, generator=g)
    return batch


@torch.no_grad()
def t2v_r1(model: AVIGATE, batch: dict, precision: str = "fp32") -> float:
    """t2v R@1 of text i retrieving video i among the batch's videos (the model's score)."""
    model.eval()
    with util.autocast(torch.device("cpu"), precision):
        text = model.encode_text(batch["text_ids"], batch["text_mask"])
        video = model.encode_video(**video_inputs(batch, torch.device("cpu")))
    scores = model.score(text.to(dtype=torch.float32), video.to(dtype=torch.float32))
    return retrieval_metrics(scores.numpy(), np.arange(len(text)))["t2v_R@1"]


def overfit(model: AVIGATE, batch: dict, max_steps: int, lr: float = OVERFIT_LR) -> list[float]:
    """Train on one batch with the real objective and optimizer (BertAdam, CLIP at the full lr,
    no schedule) until t2v R@1 = 100 or ``max_steps``; returns R@1 after each step."""
    objective = ContrastiveObjective(model, ObjectiveConfig())
    optimizer = build_optimizer(model, OptimConfig(lr=lr, coef_lr=1.0, weight_decay=0.0))
    history = []
    for _ in range(max_steps):
        model.train()
        objective(**training.model_inputs(batch, torch.device("cpu"))).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.clamp_logit_scale_()
        history.append(t2v_r1(model, batch))
        if history[-1] == 100.0:
            break
    return history


@pytest.mark.parametrize("flags", [{}, GUIDED], ids=["agnostic", "text_guided"])
def test_tiny_model_overfits_eight_pairs(flags):
    torch.manual_seed(0)
    model = AVIGATE(fast_config(**flags))
    batch = pair_batch(model, OVERFIT_PAIRS, seed=3)
    start = t2v_r1(model, batch)
    history = overfit(model, batch, OVERFIT_MAX_STEPS)
    assert history[-1] == 100.0, f"t2v R@1 after each step: {history} (start {start})"
    assert start < 100.0  # learning, not an easy batch


# ----- gradient accumulation ------------------------------------------------------------
MICRO_BATCH = 2
ACCUMULATION = 2


def _accumulation_setup(**fusion_flags):
    """(float64 model, [micro-batch 1, micro-batch 2]) with a fixed seed; the micro-batches are
    the objective's keyword arguments in float64 (see ``_objective_inputs``)."""
    torch.manual_seed(0)
    model = AVIGATE(fast_config(**fusion_flags)).double()
    ids, mask = texts(MICRO_BATCH * ACCUMULATION, seed=5)
    frames, frame_mask, tokens = videos(model, MICRO_BATCH * ACCUMULATION, seed=5)
    batch = {"text_ids": ids, "text_mask": mask, "frames": frames.double(), "frame_mask": frame_mask,
             "audio": tokens.double()}
    micro = [{k: v[i * MICRO_BATCH:(i + 1) * MICRO_BATCH] for k, v in batch.items()} for i in range(ACCUMULATION)]
    return model, micro


def _objective_inputs(batch: dict, device: torch.device) -> dict:
    """Stands in for training.model_inputs: these tests feed float64 objective inputs directly
    (what is tested is the accumulation, not the input pipeline)."""
    return {k: v.to(device) for k, v in batch.items()}


def _trainer(model: torch.nn.Module, objective: torch.nn.Module, info: util.DistInfo) -> training.Trainer:
    optimizer = build_optimizer(model, OptimConfig(lr=1e-3, coef_lr=1.0))
    return training.Trainer(objective, optimizer, build_scheduler(optimizer, 10, 0.0),
                            torch.amp.GradScaler("cpu", enabled=False), info, "fp32", ACCUMULATION)


def _weights(model: torch.nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _max_difference(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _step_with(model: AVIGATE, micro_batches: list[dict]) -> dict:
    """Weights after one optimizer step of train_step over ``micro_batches`` (one process)."""
    objective = ContrastiveObjective(model, ObjectiveConfig())
    trainer = _trainer(model, objective, util.DistInfo())
    trainer.accumulation = len(micro_batches)
    real = training.model_inputs
    training.model_inputs = _objective_inputs
    try:
        training.train_step(trainer, micro_batches)
    finally:
        training.model_inputs = real
    return _weights(model)


@pytest.mark.parametrize("flags", [{}, GUIDED], ids=["agnostic", "text_guided"])
def test_accumulation_is_the_mean_of_micro_batch_losses(flags):
    model, micro = _accumulation_setup(**flags)
    before = _weights(model)
    reference = copy.deepcopy(model)
    accumulated = _step_with(model, micro)

    # Reference: the mean of the two micro-batch losses, one backward, the same optimizer step.
    objective = ContrastiveObjective(reference, ObjectiveConfig())
    trainer = _trainer(reference, objective, util.DistInfo())
    reference.train()
    losses = [objective(**b).loss for b in micro]
    (sum(losses) / len(losses)).backward()
    trainer.optimizer.step()
    reference.clamp_logit_scale_()
    assert _max_difference(accumulated, _weights(reference)) <= 1e-12
    assert _max_difference(accumulated, before) > 1e-4  # the step moved the weights

    # What "each micro-batch is its own contrastive batch" implies: not one batch of 4.
    merged = {k: torch.cat([b[k] for b in micro]) for k in micro[0]}
    one_batch = copy.deepcopy(model)
    one_batch.load_state_dict(before)
    assert _max_difference(accumulated, _step_with(one_batch, [merged])) > 1e-6


WORLD_SIZE = 2
# AVIGATE's LayerNorms compute in fp32 even in a float64 model, so DDP and one process agree
# on gradients to ~1e-8 (see test_distributed); Adam's first step divides each gradient by its
# own magnitude, which turns that into weight differences of up to ~3e-7 (measured) where
# gradients are small: 1e-6 is 1% of one full step at lr 1e-3 (0.1% for the x100 queries).
DDP_WEIGHT_TOLERANCE = 1e-6


def _ddp_worker(rank: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    try:
        model, micro = _accumulation_setup(**GUIDED)
        local = MICRO_BATCH // WORLD_SIZE  # each rank's contiguous share of every micro-batch
        shares = [{k: v[rank * local:(rank + 1) * local] for k, v in b.items()} for b in micro]
        info = util.DistInfo(rank=rank, world_size=WORLD_SIZE)
        trainer = _trainer(model, ContrastiveObjective(model, ObjectiveConfig()), info)
        # DDP after build_optimizer froze the frozen parameters, as main_task_retrieval does
        # (DDP's buckets are fixed at construction).
        trainer.objective = DistributedDataParallel(trainer.objective)
        training.model_inputs = _objective_inputs  # this spawned process only
        training.train_step(trainer, shares)
        torch.save(_weights(model), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_accumulation_under_ddp_equals_one_process(tmp_path):
    mp.spawn(_ddp_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD_SIZE)
    model, micro = _accumulation_setup(**GUIDED)
    single = _step_with(model, micro)
    for rank in range(WORLD_SIZE):
        assert _max_difference(torch.load(tmp_path / f"rank{rank}.pt"), single) <= DDP_WEIGHT_TOLERANCE


# ----- model selection ------------------------------------------------------------------
EPOCHS = 3
# Validation t2v R@1 per epoch, patched in: epoch 2 (0-based 1) is the best, not the last.
VALIDATION_R1 = [20.0, 80.0, 50.0]


def test_val_csv_selects_the_best_epoch_and_the_test_loads_it(tmp_path, monkeypatch):
    data = make_msrvtt(str(tmp_path / "data"), n_videos=6, captions_per_video=1, n_test=2, seconds=1.0)
    ckpts = write_tiny_checkpoints(str(tmp_path))
    real_evaluate = evaluation.evaluate
    validations = []

    def evaluate(model, data, options, info, desc="eval"):
        metrics, scored = real_evaluate(model, data, options, info, desc=desc)
        if desc == "validation":
            metrics["plain"][evaluation.SELECTION_METRIC] = VALIDATION_R1[len(validations)]
            validations.append(desc)
        return metrics, scored

    loaded = []
    real_load = util.load_model_weights

    def load_model_weights(model, path):
        loaded.append(str(path))
        return real_load(model, path)

    monkeypatch.setattr(evaluation, "evaluate", evaluate)
    monkeypatch.setattr(util, "load_model_weights", load_model_weights)
    out = tmp_path / "run"
    main_task_retrieval.main(["--do_train", "--epochs", str(EPOCHS), "--val_csv", data["test_csv"],
                              *tiny_flags(data, ckpts, out)])
    best = int(np.argmax(VALIDATION_R1))
    assert len(validations) == EPOCHS
    assert loaded == [util.model_file(str(out), best)]  # the test step loaded exactly that file
    with open(out / "metrics.json") as f:
        assert json.load(f)["checkpoint"] == util.model_file(str(out), best)
    records = [r for r in read_jsonl(out / "train_metrics.jsonl") if r["event"] == "validation"]
    assert [r["best_epoch"] for r in records] == [1, 2, 2]

    # The test scores are those of the selected file, and differ from the last epoch's.
    test_sim = np.load(out / "sim_matrix.npy")
    for epoch, same in ((best, True), (EPOCHS - 1, False)):
        again = tmp_path / f"eval{epoch}"
        main_task_retrieval.main(["--do_eval", "--init_model", util.model_file(str(out), epoch),
                                  *tiny_flags(data, ckpts, again)])
        difference = np.abs(np.load(again / "sim_matrix.npy") - test_sim).max()
        assert (difference <= 1e-6) == same, (epoch, difference)
