"""Runs that are killed survive: a tiny training run SIGKILLed at seeded random points (after a
step, and while a checkpoint file is being written) and SIGTERMed (through the preemption
handler: finish the step, write the state, exit 75), each time resumed from its training state,
ends with bit-identical final weights and test scores to the uninterrupted run.

Every run is a subprocess (tests/fault_driver.py) with the same environment, one thread.
"""
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

import training
from tests.datagen import make_msrvtt
from tests.test_train_e2e import ROOT, tiny_flags, write_tiny_checkpoints

EPOCHS = 2
STEPS_PER_EPOCH = 4  # 8 training videos, batch 2
SAVE_EVERY = 3  # a kill between saves loses steps that the resumed run must redo identically
RUN_TIMEOUT_S = 300
KILLED = -9  # subprocess return code of a SIGKILLed child
SEED = 2026  # of the fault points


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("preemption")
    data = make_msrvtt(str(root / "data"), n_videos=10, captions_per_video=1, n_test=2, seconds=1.0)
    return data, write_tiny_checkpoints(str(root)), root


def _run(mode: str, n: int, flags: list) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run([sys.executable, "-m", "tests.fault_driver", mode, str(n), *flags], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=RUN_TIMEOUT_S)


def _weights(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _assert_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"weights differ: {different[:5]}"


def _state_step(out) -> int:
    return torch.load(out / "training_state.pt", map_location="cpu", weights_only=False)["progress"]["step"]


def test_killed_and_preempted_run_resumes_bit_identical(setup):
    data, ckpts, root = setup
    common = ["--do_train", "--epochs", str(EPOCHS), "--save_every_steps", str(SAVE_EVERY),
              "--text_gate", "--text_query"]
    full, faulty = root / "full", root / "faulty"
    done = _run("none", 0, [*common, *tiny_flags(data, ckpts, full)])
    assert done.returncode == 0, done.stderr[-3000:]

    rng = random.Random(SEED)
    total = EPOCHS * STEPS_PER_EPOCH
    first_kill = rng.randint(SAVE_EVERY + 1, 2 * SAVE_EVERY - 1)  # after the first save, before the second
    # (mode, n): the n-th step or atomic write of that process (each resumed process counts anew).
    faults = [("kill_after_step", first_kill),
              ("kill_in_save", rng.randint(1, 3)),   # a model file or a training state half written
              ("sigterm_in_step", 1)]
    resume = ["--resume_model", str(faulty / "training_state.pt")]
    done = _run(faults[0][0], faults[0][1], [*common, *tiny_flags(data, ckpts, faulty)])
    assert done.returncode == KILLED, (faults[0], done.stderr[-3000:])
    steps_saved = [_state_step(faulty)]
    for mode, n in faults[1:]:
        done = _run(mode, n, [*common, *resume, *tiny_flags(data, ckpts, faulty)])
        expected = training.PREEMPTED_EXIT if mode == "sigterm_in_step" else KILLED
        assert done.returncode == expected, (mode, n, done.stderr[-3000:])
        steps_saved.append(_state_step(faulty))
    # The SIGTERM arrived during the first step after the resume: that step was finished and saved.
    assert steps_saved[-1] == steps_saved[-2] + 1 and "stopped by SIGTERM" in done.stderr
    assert steps_saved[-1] < total, f"no faults left to test after the end: {faults}, saved {steps_saved}"
    done = _run("none", 0, [*common, *resume, *tiny_flags(data, ckpts, faulty)])
    assert done.returncode == 0, done.stderr[-3000:]

    for epoch in range(EPOCHS):
        _assert_identical(_weights(full / f"pytorch_model.bin.{epoch}"), _weights(faulty / f"pytorch_model.bin.{epoch}"))
    np.testing.assert_array_equal(np.load(faulty / "sim_matrix.npy"), np.load(full / "sim_matrix.npy"))
    assert not [f for f in os.listdir(faulty) if ".tmp" in f], "a temporary file of a killed write was left"
    # Not vacuous: the final weights moved after the last fault.
    last_state = torch.load(faulty / "training_state.pt", map_location="cpu", weights_only=False)
    assert last_state["progress"]["step"] == total


def test_sigterm_handler_in_process_writes_state_and_exits_75(setup, tmp_path):
    """In this process: the handler is installed only while training and removed afterwards."""
    import signal

    import main_task_retrieval
    data, ckpts, _ = setup
    original = signal.getsignal(signal.SIGTERM)
    step = training.train_step

    def signalled_step(trainer, micro_batches):
        signal.raise_signal(signal.SIGUSR1)
        return step(trainer, micro_batches)

    training.train_step = signalled_step
    try:
        with pytest.raises(SystemExit) as exit_info:
            main_task_retrieval.main(["--do_train", "--epochs", "1", *tiny_flags(data, ckpts, tmp_path)])
    finally:
        training.train_step = step
    assert exit_info.value.code == training.PREEMPTED_EXIT
    assert _state_step(tmp_path) == 1 and not os.path.exists(tmp_path / "metrics.json")
    assert signal.getsignal(signal.SIGTERM) is original
