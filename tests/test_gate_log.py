"""Per-epoch gate statistics written by training (--gate_log_split, gate_log.py)."""
import json
import os

import numpy as np
import pytest
import torch

import gate_log
import main_task_retrieval
from tests.datagen import make_msrvtt
from tests.test_train_e2e import read_jsonl, tiny_flags, train_losses, write_tiny_checkpoints

EPOCHS = 2
STOP_AT = 3  # an optimizer step inside epoch 1 (6 steps per epoch: 12 captions, batch 2)


def test_gate_epoch_stats_hand_worked():
    gates = {"att": np.array([[0.1, -0.9], [0.0, 0.7], [0.5, 0.1], [-0.5, -0.2]])}
    informative = np.array([True, True, False, False])
    out = gate_log.gate_epoch_stats(gates, informative)["att"]
    assert out["informative"] == {"mean_abs": pytest.approx([0.05, 0.8]), "count": 2}
    assert out["noise"] == {"mean_abs": pytest.approx([0.5, 0.15]), "count": 2}
    # Layer 1: both informative |g| (0.1, 0) below both noise 0.5 -> 0; layer 2: 0.9, 0.7 above 0.1, 0.2 -> 1.
    assert out["auc"] == [0.0, 1.0] and out["last_layer_auc"] == 1.0
    empty = gate_log.gate_epoch_stats(gates, np.ones(4, dtype=bool))["att"]
    assert empty["noise"] == {"mean_abs": None, "count": 0} and empty["last_layer_auc"] is None


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("gate_log")
    data = make_msrvtt(str(root / "data"), n_videos=8, n_test=4, seconds=1.0)
    labels = str(root / "labels.json")
    informative = {v: k < 2 for k, v in enumerate(data["test_ids"])}  # two informative, two noise test videos
    with open(labels, "w") as f:
        json.dump({"videos": {v: {"informative_audio": flag} for v, flag in informative.items()}}, f)
    return data, write_tiny_checkpoints(str(root)), labels, informative


def _train(setup, out, *extra):
    data, ckpts, _, _ = setup
    main_task_retrieval.main(["--do_train", "--skip_test", "--epochs", str(EPOCHS), "--expand_msrvtt_sentences",
                              *tiny_flags(data, ckpts, out, *extra)])


@pytest.fixture(scope="module")
def logged(setup, tmp_path_factory):
    out = tmp_path_factory.mktemp("logged") / "run"
    _train(setup, out, "--gate_log_split", "test", "--gate_labels", setup[2])
    return out


def test_gate_log_written_matches_direct_computation_and_changes_no_training_number(setup, logged, tmp_path):
    data, ckpts, labels, informative = setup
    plain = tmp_path / "plain"
    _train(setup, plain)
    # The gate pass draws nothing from the training streams: same losses, same weights.
    assert train_losses(logged) == train_losses(plain)
    last = f"pytorch_model.bin.{EPOCHS - 1}"
    a, b = torch.load(logged / last, weights_only=True), torch.load(plain / last, weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not os.path.exists(plain / gate_log.GATE_LOG_FILE)

    with open(logged / gate_log.GATE_LOG_FILE) as f:
        log = json.load(f)
    assert log["split"] == "test" and log["counts"] == {"informative": 2, "noise": 2}
    assert [e["epoch"] for e in log["epochs"]] == list(range(EPOCHS + 1))  # 0 = before training
    assert os.path.getsize(logged / gate_log.GATE_LOG_FIGURE) > 0
    for entry in log["epochs"]:
        assert set(entry["gates"]) == {"att", "ff"}
        for stats in entry["gates"].values():
            assert stats["informative"]["count"] == 2 and len(stats["noise"]["mean_abs"]) == 1  # one layer
    # The last entry equals the gates that an evaluation of the last checkpoint reports.
    evaluated = tmp_path / "eval"
    main_task_retrieval.main(["--do_eval", "--init_model", str(logged / last), *tiny_flags(data, ckpts, evaluated)])
    with open(evaluated / "gates.json") as f:
        per_video = {v["video_id"]: v["gates"] for v in json.load(f)["videos"]}
    final = log["epochs"][-1]["gates"]
    for name in ("att", "ff"):
        for group, flag in (("informative", True), ("noise", False)):
            values = [abs(per_video[v][name][0]) for v, info in informative.items() if info == flag]
            assert final[name][group]["mean_abs"][0] == pytest.approx(np.mean(values), abs=1e-6)
    logged_events = [r for r in read_jsonl(logged / "train_metrics.jsonl") if r["event"] == "gate_log"]
    assert [r["epoch"] for r in logged_events] == list(range(EPOCHS + 1))


def test_resumed_run_continues_the_log(setup, logged, tmp_path):
    stopped, resumed = tmp_path / "stopped", tmp_path / "resumed"
    flags = ("--gate_log_split", "test", "--gate_labels", setup[2])
    _train(setup, stopped, "--max_steps", str(STOP_AT), *flags)
    with open(stopped / gate_log.GATE_LOG_FILE) as f:
        assert [e["epoch"] for e in json.load(f)["epochs"]] == [0]  # stopped inside epoch 1
    _train(setup, resumed, "--resume_model", str(stopped / "training_state.pt"), *flags)
    with open(resumed / gate_log.GATE_LOG_FILE) as f:
        continued = json.load(f)["epochs"]
    with open(logged / gate_log.GATE_LOG_FILE) as f:
        uninterrupted = json.load(f)["epochs"]
    assert [e["epoch"] for e in continued] == [e["epoch"] for e in uninterrupted] == list(range(EPOCHS + 1))
    for a, b in zip(continued, uninterrupted):
        for name in ("att", "ff"):
            assert a["gates"][name]["informative"]["mean_abs"] == pytest.approx(
                b["gates"][name]["informative"]["mean_abs"], abs=1e-5)


def test_model_without_gates_writes_nothing_and_says_why(setup, tmp_path):
    out = tmp_path / "ungated"
    _train(setup, out, "--gate", "none", "--gate_log_split", "test", "--gate_labels", setup[2])
    assert not os.path.exists(out / gate_log.GATE_LOG_FILE)
    events = [r for r in read_jsonl(out / "train_metrics.jsonl") if r["event"] == "gate_log"]
    assert events == [{"event": "gate_log", "written": False, "reason": "--gate none fixes every gate at 1"}]


def test_bad_gate_log_flags_are_named(setup, tmp_path, capsys):
    data, ckpts, labels, _ = setup
    with pytest.raises(SystemExit):
        main_task_retrieval.main(["--do_train", "--gate_log_split", "val", *tiny_flags(data, ckpts, tmp_path / "a")])
    assert "--val_csv" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="--gate_labels"):
        main_task_retrieval.main(["--do_train", "--epochs", "1", "--gate_log_split", "test", "--gate_labels",
                                  str(tmp_path / "none.json"), *tiny_flags(data, ckpts, tmp_path / "b")])
    partial = str(tmp_path / "partial.json")
    with open(partial, "w") as f:
        json.dump({"videos": {data["test_ids"][0]: {"informative_audio": True}}}, f)
    with pytest.raises(KeyError, match="informative_audio"):
        gate_log.read_informative_labels(partial, data["test_ids"])
