"""Stopping mid-epoch and resuming from the training state equals the uninterrupted run."""
import os

import pytest
import torch

import main_task_retrieval
from tests.datagen import make_msrvtt
from tests.test_train_e2e import train_losses, tiny_flags, write_tiny_checkpoints

EPOCHS = 2
STOP_AT = 3  # of 2 epochs x 2 steps: one step into the second epoch


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    data = make_msrvtt(str(root / "data"), n_videos=6, captions_per_video=1, n_test=2, seconds=1.0)
    return data, write_tiny_checkpoints(str(root)), root


def _weights(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].numel())


def test_resume_mid_epoch_equals_uninterrupted(setup):
    # Text-guided: the most state (gates, text injection) on the same resume machinery.
    data, ckpts, root = setup
    common = ["--do_train", "--epochs", str(EPOCHS), "--save_every_steps", "2",
              "--text_gate", "--text_query", "--query_gate"]
    full, stopped, resumed = root / "full", root / "stopped", root / "resumed"
    main_task_retrieval.main([*common, *tiny_flags(data, ckpts, full)])
    main_task_retrieval.main([*common, "--max_steps", str(STOP_AT), *tiny_flags(data, ckpts, stopped)])
    assert not os.path.exists(stopped / "metrics.json")  # a stopped run is not tested
    state = torch.load(stopped / "training_state.pt", map_location="cpu", weights_only=False)
    assert state["progress"]["step"] == STOP_AT and state["progress"]["epoch_step"] == 1
    main_task_retrieval.main([*common, "--resume_model", str(stopped / "training_state.pt"),
                              *tiny_flags(data, ckpts, resumed)])

    final = _weights(full / f"pytorch_model.bin.{EPOCHS - 1}")
    assert _max_difference(final, _weights(resumed / f"pytorch_model.bin.{EPOCHS - 1}")) <= 1e-6
    # The comparison is not vacuous: the last step still changed the weights.
    assert _max_difference(final, state["model"]) > 1e-6
    assert train_losses(resumed) == pytest.approx(train_losses(full)[STOP_AT:], abs=1e-6)
