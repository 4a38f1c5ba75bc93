"""The shell entry points run end to end: run_vatex.sh (through run.sh and a preset, under
torchrun) trains a tiny model on generated VATEX-format data, then run_eval.sh evaluates its
checkpoint without architecture flags and must reproduce the training run's test scores. Extra
arguments override the scripts' recipe."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.datagen import make_vatex
from tests.localhost import free_port
from tests.test_train_e2e import ROOT, write_tiny_checkpoints

pytestmark = pytest.mark.distributed

TINY_OVERRIDES = ["--epochs", "1", "--batch_size", "2", "--batch_size_val", "2", "--max_frames", "2",
                  "--max_words", "16", "--cross_num_hidden_layers", "1", "--audio_query_layers", "1",
                  "--device", "cpu", "--n_display", "1", "--save_every_steps", "0"]


def _run(script: str, env: dict, *extra: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **env, "OMP_NUM_THREADS": "1",
                "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    result = subprocess.run(["bash", os.path.join(ROOT, script), *extra], env=full_env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{script} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def test_run_vatex_preset_then_run_eval_without_flags_reproduce_scores(tmp_path):
    """A preset through run_vatex.sh -> run.sh -> torchrun, then run_eval.sh with no architecture
    flag at all: the checkpoint's record supplies them, and the scores are the training run's."""
    data = make_vatex(str(tmp_path / "vatex"), n_videos=4, n_test=3)
    ckpts = write_tiny_checkpoints(str(tmp_path))
    train_dir = tmp_path / "train"
    common = {"DATA_PATH": data["data_path"], "VIDEO_PATH": data["features_path"],
              "AUDIO_PATH": data["audio_path"], "NUM_GPUS": "1", "NUM_WORKERS": "0"}
    _run("run_vatex.sh", {**common, "CLIP_NAME": ckpts["clip"], "AST_CHECKPOINT": ckpts["ast"],
                          "TEXT_GUIDED": "--text_gate --query_gate", "PRESET": "table5-local",
                          "OUTPUT_DIR": str(train_dir), "MASTER_PORT": str(free_port())}, *TINY_OVERRIDES)
    with open(train_dir / "args.json") as f:
        args = json.load(f)
    assert args["datatype"] == "vatex" and args["margin_BD"] == 0.05   # the VATEX recipe
    assert args["alignment"] == "local" and args["padding_rule"] == "released"  # the preset
    assert args["precision"] == "fp32" and args["grad_clip_scope"] == "global"  # the released recipe
    assert args["expand_msrvtt_sentences"] and args["text_gate"] and args["query_gate"]
    assert args["epochs"] == 1 and args["batch_size"] == 2             # extra arguments win

    eval_dir = tmp_path / "eval"
    # The paper preset trained and tested in fp32 (the released recipe): evaluate the same way.
    _run("run_eval.sh", {**common, "DATATYPE": "vatex", "OUTPUT_DIR": str(eval_dir), "PRECISION": "fp32",
                         "CHECKPOINT": str(train_dir / "pytorch_model.bin.0")},
         "--max_words", "16", "--batch_size_val", "2", "--device", "cpu")
    for name in ("metrics.json", "sim_matrix.npy", "sim_rows.json", "sim_cols.json", "gates.json"):
        assert (eval_dir / name).is_file(), name
    with open(eval_dir / "args.json") as f:
        evaluated = json.load(f)
    assert evaluated["alignment"] == "local" and evaluated["text_gate"] and evaluated["max_frames"] == 2
    np.testing.assert_array_equal(np.load(eval_dir / "sim_matrix.npy"), np.load(train_dir / "sim_matrix.npy"))

    swap_dir = tmp_path / "eval_swap"  # AUDIO_PERTURB and extra flags reach the evaluation
    _run("run_eval.sh", {**common, "DATATYPE": "vatex", "OUTPUT_DIR": str(swap_dir), "AUDIO_PERTURB": "swap",
                         "CHECKPOINT": str(train_dir / "pytorch_model.bin.0")},
         "--max_frames", "2", "--max_words", "16", "--cross_num_hidden_layers", "1",
         "--audio_query_layers", "1", "--batch_size_val", "2", "--device", "cpu", "--dump_topk", "2")
    with open(swap_dir / "metrics.json") as f:
        assert json.load(f)["audio_perturbation"]["kind"] == "swap"
    assert (swap_dir / "topk.jsonl").is_file() and (swap_dir / "audio_perturbation.json").is_file()

    rerank_dir = tmp_path / "eval_rerank"  # RERANK_TOPK reaches the evaluation
    _run("run_eval.sh", {**common, "DATATYPE": "vatex", "OUTPUT_DIR": str(rerank_dir), "RERANK_TOPK": "2",
                         "CHECKPOINT": str(train_dir / "pytorch_model.bin.0")},
         "--max_words", "16", "--batch_size_val", "2", "--device", "cpu")
    with open(rerank_dir / "metrics.json") as f:
        rerank = json.load(f)["rerank"]
    assert rerank["topk"] == 2 and 0 < rerank["pairs_fused"] <= rerank["pairs_total"]


def test_run_sh_rejects_unknown_datatype():
    result = subprocess.run(["bash", os.path.join(ROOT, "run.sh")], env={**os.environ, "DATATYPE": "kinetics"},
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "DATATYPE must be msrvtt, vatex or charades" in result.stderr
