"""Out-of-memory in pair fusion names the setting that bounds it and a value to try, computed
from the measured bytes per pair (tools/pair_memory.py): --train_pairs_per_chunk in training,
--eval_chunk in evaluation."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch

import evaluation
import training
import util
from dataloaders.base import video_inputs
from modules.memory_plan import CHUNK_MEMORY_SHARE, FALLBACK_CHUNK
from modules.modeling import AVIGATE
from modules.objective import ContrastiveObjective, ObjectiveConfig
from modules.optimization import OptimConfig, build_optimizer, build_scheduler
from tests.test_learning import GUIDED, fast_config, pair_batch

GIB = 1 << 30


def _out_of_memory(*args, **kwargs):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")


def _trainer(model: AVIGATE, chunk: int) -> training.Trainer:
    objective = ContrastiveObjective(model, ObjectiveConfig(pairs_per_chunk=chunk))
    optimizer = build_optimizer(model, OptimConfig())
    return training.Trainer(objective, optimizer, build_scheduler(optimizer, 10, 0.1),
                            torch.amp.GradScaler("cpu", enabled=False), util.DistInfo(), "bf16")


@pytest.mark.parametrize("chunk,expected", [(0, FALLBACK_CHUNK), (8, 4)])
def test_training_oom_names_the_chunk_setting_and_a_value(chunk, expected, monkeypatch):
    model = AVIGATE(fast_config(**GUIDED))
    trainer = _trainer(model, chunk)
    monkeypatch.setattr(model, "score_grid", _out_of_memory)
    with pytest.raises(torch.OutOfMemoryError) as error:
        training.train_step(trainer, [pair_batch(model, 4, seed=0)])
    message = str(error.value)
    assert f"try --train_pairs_per_chunk {expected} " in message
    assert "16 pairs on this rank" in message and "(simulated)" in message
    assert f"now {chunk or 'all at once'}" in message


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("device_gib", [24, 80])
def test_suggested_chunk_fits_its_share_of_the_device(precision, device_gib):
    objective = ContrastiveObjective(AVIGATE(fast_config(**GUIDED)), ObjectiveConfig())
    device_bytes = device_gib * GIB
    chunk = objective.suggested_chunk(precision, device_bytes)
    budget = CHUNK_MEMORY_SHARE * device_bytes
    assert chunk & (chunk - 1) == 0  # a power of two
    assert chunk * objective.pair_bytes(precision) <= budget < 2 * chunk * objective.pair_bytes(precision)
    assert objective.pair_bytes("bf16") < objective.pair_bytes("fp32")


def test_agnostic_training_oom_points_at_the_batch(monkeypatch):
    model = AVIGATE(fast_config())
    trainer = _trainer(model, 0)
    monkeypatch.setattr(model, "similarity", _out_of_memory)
    with pytest.raises(torch.OutOfMemoryError, match="lower --batch_size or add --grad_checkpointing"):
        training.train_step(trainer, [pair_batch(model, 4, seed=0)])


def test_evaluation_oom_names_eval_chunk_and_a_value(monkeypatch):
    model = AVIGATE(fast_config(**GUIDED)).eval()
    batch = pair_batch(model, 6, seed=1)
    with torch.no_grad():
        text = model.encode_text(batch["text_ids"], batch["text_mask"])
        video = model.encode_video(**video_inputs(batch, torch.device("cpu")))
    monkeypatch.setattr(model, "score_with_gates", _out_of_memory)
    with pytest.raises(torch.OutOfMemoryError) as error:
        evaluation.score_split(model, text, video, np.arange(6), util.DistInfo(), chunk=(3, 4))
    message = str(error.value)
    assert "3 texts x 4 videos = 12 pairs per chunk now" in message
    suggested = re.search(r"try --eval_chunk (\d+) (\d+) \((\d+) pairs", message)
    t, v, pairs = map(int, suggested.groups())
    assert t * v == pairs == 4  # half the chunk (6 pairs), rounded down to a power of two
