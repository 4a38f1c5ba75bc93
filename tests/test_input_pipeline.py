"""Loader -> device: uint8 batches normalized by ``dataloaders.base.video_inputs``, loader settings,
and per-epoch items that reach DataLoader workers."""
import argparse
import json
import os
import subprocess
import sys

import pytest
import torch

import evaluation
import main_task_retrieval
import training
import util
from dataloaders.base import collate_items
from dataloaders.registry import DataConfig, build_train_dataset
from dataloaders.video import FrameSamplingConfig, normalize_frames
from modules.tokenization_clip import ClipTokenizer
from tests.datagen import make_msrvtt

F, S, L = 3, 32, 16
CPU = torch.device("cpu")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_msrvtt(str(tmp_path_factory.mktemp("pipeline")), n_videos=6, captions_per_video=3)


def _train_set(data, **kwargs):
    cfg = DataConfig(datatype="msrvtt", data_path=data["data_path"], features_path=data["features_path"],
                     audio_path=data["audio_path"], max_words=L,
                     frames=FrameSamplingConfig(max_frames=F, image_size=S), **kwargs)
    return build_train_dataset(cfg, ClipTokenizer())


def test_model_inputs_normalize_uint8_frames_on_the_device(data):
    train = _train_set(data)
    batch = collate_items([train[i] for i in range(4)])
    assert batch["frames"].dtype == torch.uint8 and not batch["frame_mask"].all()  # some padding
    inputs = training.model_inputs(batch, CPU)
    assert set(inputs) == {"text_ids", "text_mask", "frames", "frame_mask", "audio"}
    assert inputs["frames"].dtype == torch.float32 and inputs["frames"].shape == batch["frames"].shape
    assert torch.equal(inputs["frames"], normalize_frames(batch["frames"], batch["frame_mask"], CPU))
    assert (inputs["frames"][~batch["frame_mask"]] == 0).all()
    assert torch.equal(inputs["frame_mask"], batch["frame_mask"])
    assert torch.equal(inputs["audio"], batch["fbank"]) and torch.equal(inputs["text_ids"], batch["text_ids"])
    assert batch["frames"].dtype == torch.uint8  # the batch itself is left as it was


@pytest.mark.parametrize("device, pinned", [("cpu", False), ("cuda", True)])
def test_loaders_pin_memory_only_for_cuda(data, device, pinned):
    # Building a loader touches no CUDA, so the flag is checked on any machine.
    train = _train_set(data)
    info = util.DistInfo(device=torch.device(device))
    args = argparse.Namespace(seed=0, num_thread_reader=2)
    sampler = util.ShardedBatchSampler(len(train), 2, 1, 0, 1, 0)
    loader = main_task_retrieval.train_loader(args, train, sampler, info, epoch=0)
    assert loader.pin_memory is pinned and not loader.persistent_workers
    loader = evaluation.eval_loader(train, 2, 2, collate_items, info.device)
    assert loader.pin_memory is pinned and not loader.persistent_workers


def test_each_epoch_loader_gives_that_epochs_items_in_workers(data):
    """Without --expand_msrvtt_sentences the caption of a video is redrawn per epoch; the
    fresh loader of each epoch carries the redraw into its worker processes (a persistent
    worker would keep the epoch-0 draw)."""
    train = _train_set(data, expand_sentences=False, seed=5)
    args = argparse.Namespace(seed=5, num_thread_reader=2)
    info = util.DistInfo()
    sampler = util.ShardedBatchSampler(len(train), 2, 1, 0, 1, args.seed)
    draws = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        train.set_epoch(epoch)
        order = [i for batch in sampler for i in batch]
        expected = [int(train[i]["text_index"]) for i in order]
        loader = main_task_retrieval.train_loader(args, train, sampler, info, epoch)
        got = [int(t) for batch in loader for t in batch["text_index"]]
        assert got == expected
        draws.append(expected)
    assert draws[0] != draws[1] or draws[0] != draws[2]  # the draw does change between epochs


def test_decode_bench_loader_section_runs_both_paths(tmp_path):
    """The benchmark's loader section on a tiny set, run as users run it (``python -m``): both
    paths deliver every batch, and the former float32 frames take exactly 4x the bytes of the
    uint8 ones."""
    out = tmp_path / "decode.json"
    result = subprocess.run([sys.executable, "-m", "bench.decode_bench", "--sections", "loader", "--batches", "2",
                             "--batch_size", "2", "--loader_videos", "1", "--loader_seconds", "2", "--loader_fps",
                             "3", "--max_frames", "2", "--decoder", "opencv", "--loader_workers", "1",
                             "--json", str(out)], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    passes = {r["path"]: r for r in json.loads(out.read_text())["loader"]["passes"] if not r["pin_memory"]}
    uint8, former = passes["uint8"], passes["float32 (former)"]
    assert uint8["batches"] == former["batches"] == 2
    assert uint8["frame_bytes"] == 2 * 2 * 3 * 224 * 224 and former["frame_bytes"] == 4 * uint8["frame_bytes"]
    assert uint8["frames_per_s"] > 0 and former["batch_bytes"] > uint8["batch_bytes"]
