"""Two gloo processes under torchrun train and evaluate like one process with the same global batch."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import main_task_retrieval
from tests.datagen import make_msrvtt
from tests.test_train_e2e import ROOT, train_losses, tiny_flags, write_tiny_checkpoints

TORCHRUN_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("torchrun")
    # 8 training captions (2 steps of global batch 4); 3 test videos shard unevenly over 2 ranks.
    data = make_msrvtt(str(root / "data"), n_videos=7, captions_per_video=2, n_test=3, seconds=1.0)
    return data, write_tiny_checkpoints(str(root)), root


@pytest.mark.distributed
@pytest.mark.parametrize("guided", [False, True], ids=["agnostic", "text_guided"])
def test_two_processes_equal_one(setup, guided):
    data, ckpts, root = setup
    name = "guided" if guided else "agnostic"
    common = ["--do_train", "--epochs", "1", "--expand_msrvtt_sentences",
              *(["--text_gate", "--text_query", "--query_gate"] if guided else [])]
    single, double = root / f"{name}_1proc", root / f"{name}_2proc"
    main_task_retrieval.main([*common, *tiny_flags(data, ckpts, single), "--batch_size", "4"])
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "main_task_retrieval.py", *common, *tiny_flags(data, ckpts, double), "--batch_size", "4"]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TORCHRUN_TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-4000:]

    losses_1, losses_2 = train_losses(single), train_losses(double)
    assert len(losses_1) == len(losses_2) == 2
    assert np.max(np.abs(np.subtract(losses_1, losses_2))) <= 1e-6
    w1 = torch.load(single / "pytorch_model.bin.0", map_location="cpu", weights_only=True)
    w2 = torch.load(double / "pytorch_model.bin.0", map_location="cpu", weights_only=True)
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1 if w1[k].numel()) <= 1e-5
    sim_1, sim_2 = np.load(single / "sim_matrix.npy"), np.load(double / "sim_matrix.npy")
    assert sim_1.shape == (3, 3)
    np.testing.assert_allclose(sim_2, sim_1, rtol=0, atol=1e-4)
