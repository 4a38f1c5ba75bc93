"""Stopping mid-epoch and resuming from the training state equals the uninterrupted run; a
resume with flags that differ from the saved run's is refused (resume_contract.py) unless the
flag is a documented-safe override; a resume appends to the run's records."""
import json
import os
import shutil

import pytest
import torch

import main_task_retrieval
import resume_contract
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


# ----------------------------------------------------------------------------- resume contract
@pytest.fixture(scope="module")
def stopped_run(setup):
    """A run stopped after one step of two epochs: (its flags, its training state, data)."""
    data, ckpts, root = setup
    out = root / "contract"
    common = ["--do_train", "--epochs", str(EPOCHS), "--save_every_steps", "1"]
    main_task_retrieval.main([*common, "--max_steps", "1", *tiny_flags(data, ckpts, out)])
    return common, out / "training_state.pt", data, ckpts, out


def _other_train_csv(data, root) -> str:
    path = root / "other_train.csv"
    path.write_text(open(data["train_csv"]).read())
    return str(path)


# flag -> the changed value (the tiny run's own value differs).
CHANGED = {"batch_size": ["--batch_size", "4"], "gradient_accumulation_steps": ["--gradient_accumulation_steps", "2"],
           "seed": ["--seed", "7"], "expand_msrvtt_sentences": ["--expand_msrvtt_sentences"],
           "epochs": ["--epochs", "3"], "lr": ["--lr", "2e-3"], "warmup_proportion": ["--warmup_proportion", "0.2"],
           "n_display": ["--n_display", "5"], "num_thread_reader": ["--num_thread_reader", "1"],
           "batch_size_val": ["--batch_size_val", "1"]}


@pytest.mark.parametrize("flag", sorted(CHANGED) + ["train_csv"])
def test_resume_refuses_a_changed_flag(stopped_run, flag, tmp_path):
    common, state, data, ckpts, out = stopped_run
    changed = ["--train_csv", _other_train_csv(data, tmp_path)] if flag == "train_csv" else CHANGED[flag]
    args_before = (out / "args.json").read_text()
    # The changed value comes last: argparse keeps the last occurrence.
    with pytest.raises(resume_contract.ResumeMismatch, match=f"--{flag}: saved") as err:
        main_task_retrieval.main([*common, "--resume_model", str(state), *tiny_flags(data, ckpts, out), *changed])
    if flag in resume_contract.OVERRIDABLE:
        assert f"--resume_override {flag}" in str(err.value)
    assert (out / "args.json").read_text() == args_before  # the run's records are untouched
    elsewhere = tmp_path / "new_folder"
    with pytest.raises(resume_contract.ResumeMismatch):
        main_task_retrieval.main([*common, "--resume_model", str(state), *tiny_flags(data, ckpts, elsewhere), *changed])
    assert not elsewhere.exists()  # refused before anything was written


@pytest.mark.parametrize("flag", ["lr", "seed", "batch_size", "max_frames"])
def test_resume_override_of_a_flag_that_shapes_the_run_is_a_flag_error(stopped_run, flag, capsys):
    common, state, data, ckpts, out = stopped_run
    with pytest.raises(SystemExit):
        main_task_retrieval.main([*common, "--resume_model", str(state), "--resume_override", flag,
                                  *tiny_flags(data, ckpts, out)])
    assert f"--resume_override {flag}: --{flag} shapes" in capsys.readouterr().err


def test_resume_override_without_resume_is_a_flag_error(stopped_run, tmp_path, capsys):
    common, _, data, ckpts, _ = stopped_run
    with pytest.raises(SystemExit):
        main_task_retrieval.main([*common, "--resume_override", "n_display", *tiny_flags(data, ckpts, tmp_path)])
    assert "needs --resume_model" in capsys.readouterr().err


def test_allowed_overrides_resume_and_append_to_the_run_records(stopped_run, tmp_path):
    common, state, data, ckpts, out = stopped_run
    resumed = tmp_path / "resumed_run"
    shutil.copytree(out, resumed)  # resume in place, leaving the fixture's run for the other tests
    args_before = (resumed / "args.json").read_text()
    main_task_retrieval.main([*common, "--resume_model", str(resumed / "training_state.pt"),
                              *tiny_flags(data, ckpts, resumed), "--n_display", "5", "--batch_size_val", "1",
                              "--num_thread_reader", "1",
                              "--resume_override", "n_display", "batch_size_val", "num_thread_reader"])
    assert (resumed / "args.json").read_text() == args_before
    with open(resumed / "run_info.json") as f:
        run_info = json.load(f)
    (entry,) = run_info["resumes"]
    assert entry["step"] == 1 and entry["epoch"] == 0
    assert entry["overrides"] == {"n_display": [1, 5], "batch_size_val": [2, 1], "num_thread_reader": [0, 1]}
    final = torch.load(resumed / "training_state.pt", map_location="cpu", weights_only=False)
    assert final["progress"]["step"] == 2 * EPOCHS and final["args"]["n_display"] == 5
    assert os.path.isfile(resumed / "metrics.json")


def test_docs_list_every_overridable_flag():
    with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "training.md")) as f:
        text = f.read()
    missing = [name for name in [*resume_contract.OVERRIDABLE, *resume_contract.PER_INVOCATION]
               if f"`--{name}`" not in text]
    assert not missing, f"docs/training.md does not list {missing}"
