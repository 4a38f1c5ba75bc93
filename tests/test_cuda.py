"""Checks that need a CUDA GPU (marker ``cuda``; skipped elsewhere, run by tools/gpu_check.py).

- A training step synchronizes the host only where documented (tests/test_host_syncs.py counts
  the same on the CPU with a stand-in; here ``torch.cuda.set_sync_debug_mode`` reports every
  real synchronizing CUDA call).
- Scores are exact IEEE fp32 under bf16 autocast with TF32 switched on for everything else.
- The model on the GPU computes what it computes on the CPU.
- Chunked pair fusion bounds the GPU memory of text-guided training.
- A bf16 training + evaluation run through ``main`` on generated data.
"""
from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch

import main_task_retrieval
import training
import util
from dataloaders.base import video_inputs
from modules.modeling import AVIGATE
from modules.objective import ContrastiveObjective, ObjectiveConfig
from modules.optimization import OptimConfig, build_optimizer, build_scheduler
from tests.datagen import make_msrvtt
from tests.test_host_syncs import STEP_SYNCS_MASKED, STEP_SYNCS_RELEASED
from tests.test_learning import GUIDED, fast_config, pair_batch
from tests.test_train_e2e import tiny_flags, write_tiny_checkpoints
from tools import pair_memory

pytestmark = pytest.mark.cuda
CUDA = torch.device("cuda", 0)
SYNC_WARNING = "called a synchronizing CUDA operation"


def _on(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


@pytest.mark.parametrize("padding_rule,expected", [("masked", STEP_SYNCS_MASKED), ("released", STEP_SYNCS_RELEASED)])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_training_step_syncs_only_where_documented(padding_rule, expected, precision):
    torch.manual_seed(0)
    model = AVIGATE(fast_config(padding_rule=padding_rule, **GUIDED)).to(CUDA)
    objective = ContrastiveObjective(model, ObjectiveConfig(pairs_per_chunk=8))
    optimizer = build_optimizer(model, OptimConfig())
    trainer = training.Trainer(objective, optimizer, build_scheduler(optimizer, 10, 0.1),
                               torch.amp.GradScaler("cuda", enabled=False), util.DistInfo(device=CUDA), precision)
    batch = _on(pair_batch(model, 4, seed=0), CUDA)  # inputs already on the device: no copies counted
    training.train_step(trainer, [batch])  # warm-up (lazy initializations may synchronize)
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            result = training.train_step(trainer, [batch])
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message) for w in caught if SYNC_WARNING in str(w.message)]
    assert len(syncs) == expected, syncs
    assert math.isfinite(result["loss"].item())


def test_scores_are_ieee_fp32_under_bf16_autocast_with_tf32_on():
    util.setup_precision(CUDA, "bf16", tf32=True)
    torch.manual_seed(0)
    model = AVIGATE(fast_config()).to(CUDA).eval()
    with torch.no_grad():
        model.logit_scale.fill_(math.log(100.0))
    batch = _on(pair_batch(model, 64, seed=1), CUDA)
    with torch.no_grad():
        video = model.encode_video(**video_inputs(batch, CUDA))
        text = model.encode_text(batch["text_ids"], batch["text_mask"])
        with util.autocast(CUDA, "bf16"):
            fast = model.similarity(text.text, video.index, video.frame_mask)
        reference = model.cpu().double().similarity(text.text.cpu().double(), video.index.cpu().double(),
                                                    video.frame_mask.cpu())
    assert fast.dtype == torch.float32
    # IEEE fp32 on the GPU agrees with the CPU to ~1e-5 at scores near 100 (the reference runs
    # in fp32 too); TF32 or bf16 products would be off by ~1e-1.
    assert (fast.cpu().double() - reference).abs().max().item() < 1e-3


@pytest.mark.parametrize("flags", [{}, GUIDED], ids=["agnostic", "text_guided"])
def test_gpu_matches_cpu(flags):
    util.setup_precision(CUDA, "fp32", tf32=False)
    torch.manual_seed(0)
    model = AVIGATE(fast_config(**flags)).eval()
    batch = pair_batch(model, 6, seed=2)
    scores = {}
    for device in (torch.device("cpu"), CUDA):
        model = model.to(device)
        on = _on(batch, device)
        with torch.no_grad():
            text = model.encode_text(on["text_ids"], on["text_mask"])
            video = model.encode_video(**video_inputs(on, device))
            scores[device.type] = model.score(text, video).cpu()
    util.setup_precision(CUDA, "fp32", tf32=True)
    assert (scores["cpu"] - scores["cuda"]).abs().max().item() < 1e-3


def test_chunks_bound_pair_memory_on_the_gpu():
    sizes = pair_memory.TINY
    model = pair_memory.pair_model(sizes).to(CUDA)
    largest = sizes.texts[-1]
    full = pair_memory.measure(model, sizes, largest, 0, "bf16", CUDA)
    chunked = pair_memory.measure(model, sizes, largest, sizes.chunk, "bf16", CUDA)
    assert 0 < chunked["peak_bytes"] < full["peak_bytes"]


def test_bf16_training_and_evaluation_through_main(tmp_path):
    data = make_msrvtt(str(tmp_path / "data"), n_videos=6, captions_per_video=1, n_test=2, seconds=1.0)
    ckpts = write_tiny_checkpoints(str(tmp_path))
    out = tmp_path / "run"
    flags = tiny_flags(data, ckpts, out, "--text_gate", "--text_query", "--query_gate")
    flags[flags.index("--device") + 1] = "cuda"
    main_task_retrieval.main(["--do_train", "--epochs", "1", "--precision", "bf16", "--train_pairs_per_chunk", "2",
                              *flags])
    with open(out / "metrics.json") as f:
        assert 0.0 <= json.load(f)["plain"]["t2v_R@1"] <= 100.0
    assert np.isfinite(np.load(out / "sim_matrix.npy")).all()
