"""End-to-end training + evaluation through ``main([...])`` on generated data, one run per
dataset format, with tiny CLIP / AST checkpoint files written in the released formats.

The helpers here (tiny checkpoints, the common flags) are reused by test_resume.py and
test_torchrun.py.
"""
import json
import math
import os

import numpy as np
import pytest
import torch

import main_task_retrieval
from modules.ast import AST, ASTConfig
from modules.clip import CLIP, CLIPConfig
from tests.datagen import make_charades, make_msrvtt, make_vatex

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUTPUT_FILES = ("args.json", "run_info.json", "log.txt", "train_metrics.jsonl", "metrics.json",
                "sim_matrix.npy", "sim_rows.json", "sim_cols.json", "training_state.pt")


def write_tiny_checkpoints(directory) -> dict:
    """A tiny OpenAI-named CLIP state dict and a tiny AST checkpoint in the AudioSet format
    (DataParallel ``module.v.*`` keys plus the classifier the loader drops)."""
    torch.manual_seed(0)
    clip_path = os.path.join(directory, "tiny_clip.pt")
    torch.save(CLIP(CLIPConfig.tiny()).state_dict(), clip_path)
    ast = {f"module.v.{k}": v for k, v in AST(ASTConfig.tiny()).state_dict().items()}
    ast["module.mlp_head.1.weight"] = torch.zeros(527, ASTConfig.tiny().embed_dim)
    ast_path = os.path.join(directory, "tiny_ast.pth")
    torch.save(ast, ast_path)
    return {"clip": clip_path, "ast": ast_path}


def tiny_flags(data: dict, ckpts: dict, output_dir, *extra) -> list:
    """Flags of a tiny CPU run: 2 frames, 1 fusion / resampler layer, batch 2, no workers."""
    return ["--output_dir", str(output_dir), "--data_path", data["data_path"],
            "--features_path", data["features_path"], "--audio_path", data["audio_path"],
            "--pretrained_clip_name", ckpts["clip"], "--ast_checkpoint", ckpts["ast"],
            "--batch_size", "2", "--batch_size_val", "2", "--max_frames", "2", "--max_words", "16",
            "--cross_num_hidden_layers", "1", "--audio_query_layers", "1", "--num_thread_reader", "0",
            "--device", "cpu", "--n_display", "1", "--lr", "1e-3", *extra]


def read_jsonl(path) -> list:
    with open(path) as f:
        return [json.loads(line) for line in f]


def train_losses(output_dir) -> list:
    return [r["loss"] for r in read_jsonl(os.path.join(output_dir, "train_metrics.jsonl"))
            if r["event"] == "train"]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    return write_tiny_checkpoints(str(tmp_path_factory.mktemp("ckpts")))


def _check_run_outputs(out, num_texts: int, num_videos: int, text_guided: bool, dsl: bool) -> None:
    for name in OUTPUT_FILES:
        assert os.path.isfile(os.path.join(out, name)), name
    assert os.path.isfile(os.path.join(out, "pytorch_model.bin.0"))
    assert not [f for f in os.listdir(out) if ".tmp" in f], "a temporary file was left behind"
    with open(os.path.join(out, "args.json")) as f:
        assert json.load(f)["do_train"] is True
    with open(os.path.join(out, "run_info.json")) as f:
        assert "commit" in json.load(f)["git"]
    losses = train_losses(out)
    assert losses and all(math.isfinite(x) for x in losses)
    with open(os.path.join(out, "metrics.json")) as f:
        metrics = json.load(f)
    assert metrics["protocol"] == "honest" and "LEAKING" not in metrics
    assert set(metrics) >= ({"plain", "dsl"} if dsl else {"plain"})
    for key in ("t2v_R@1", "t2v_R@5", "v2t_R@1", "v2t_R@10"):
        assert 0.0 <= metrics["plain"][key] <= 100.0
    assert 1.0 <= metrics["plain"]["t2v_MdR"] <= num_videos
    sim = np.load(os.path.join(out, "sim_matrix.npy"))
    assert sim.shape == (num_texts, num_videos) and np.isfinite(sim).all()
    with open(os.path.join(out, "sim_rows.json")) as f:
        rows = json.load(f)
    with open(os.path.join(out, "sim_cols.json")) as f:
        cols = json.load(f)
    assert len(rows) == num_texts and len(cols) == num_videos
    assert all(r["video_id"] in cols and r["caption"] for r in rows)
    with open(os.path.join(out, "gates.json")) as f:
        gates = json.load(f)
    assert gates["text_guided"] is text_guided and len(gates["videos"]) == num_videos
    first = gates["videos"][0]
    if text_guided:
        assert first["own_captions"] and set(first["all_texts_mean"]) == set(gates["gate_names"])
    else:
        assert all(len(v) == 1 for v in first["gates"].values())  # one fusion layer


# (datatype, generator, extra flags, text-guided, texts and videos of the generated test split)
CASES = {
    "msrvtt": (make_msrvtt, ["--expand_msrvtt_sentences", "--dsl"], False, 2, 2),
    "vatex": (make_vatex, ["--expand_msrvtt_sentences", "--text_gate", "--text_query", "--query_gate",
                           "--margin_BD", "0.05"], True, 4, 2),
    "charades": (make_charades, ["--text_gate", "--training_pairs", "hardest_k", "--hardest_k", "1"],
                 True, 2, 2),
}


@pytest.mark.parametrize("datatype", sorted(CASES))
def test_train_then_test_writes_outputs(datatype, ckpts, tmp_path):
    make, extra, text_guided, num_texts, num_videos = CASES[datatype]
    kwargs = {"captions_per_video": 2} if datatype == "vatex" else {}
    data = make(str(tmp_path / "data"), n_videos=4, n_test=2, seconds=1.0, **kwargs)
    out = tmp_path / "run"
    main_task_retrieval.main(["--do_train", "--datatype", datatype, "--epochs", "1",
                              *tiny_flags(data, ckpts, out, *extra)])
    _check_run_outputs(str(out), num_texts, num_videos, text_guided, dsl="--dsl" in extra)


def test_eval_only_reproduces_training_run_and_labels_leak(ckpts, tmp_path):
    data = make_msrvtt(str(tmp_path / "data"), n_videos=4, n_test=2, seconds=1.0)
    trained = tmp_path / "train"
    guided = ["--text_gate", "--text_query"]
    main_task_retrieval.main(["--do_train", "--epochs", "1", *tiny_flags(data, ckpts, trained, *guided)])
    checkpoint = str(trained / "pytorch_model.bin.0")
    evaluated = tmp_path / "eval"
    main_task_retrieval.main(["--do_eval", "--init_model", checkpoint,
                              *tiny_flags(data, ckpts, evaluated, *guided)])
    np.testing.assert_allclose(np.load(evaluated / "sim_matrix.npy"), np.load(trained / "sim_matrix.npy"),
                               rtol=0, atol=1e-5)
    leaking = tmp_path / "leak"
    main_task_retrieval.main(["--do_eval", "--init_model", checkpoint, "--eval_protocol", "paired_block",
                              *tiny_flags(data, ckpts, leaking, *guided)])
    with open(leaking / "metrics.json") as f:
        metrics = json.load(f)
    assert metrics["protocol"] == "paired_block" and metrics["LEAKING"].startswith("LEAKING")


def test_global_batch_must_divide_world_size(ckpts, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit):
        main_task_retrieval.main(["--do_train", "--output_dir", str(tmp_path), "--data_path", str(tmp_path),
                                  "--features_path", str(tmp_path), "--no_audio", "--batch_size", "3"])
    assert "GLOBAL batch" in capsys.readouterr().err


def _trained_weights(data: dict, ckpts: dict, out, seed: int) -> dict:
    main_task_retrieval.main(["--do_train", "--skip_test", "--datatype", "msrvtt", "--epochs", "1",
                              "--expand_msrvtt_sentences", "--seed", str(seed),
                              *tiny_flags(data, ckpts, out, "--text_gate", "--text_query", "--query_gate")])
    state = torch.load(os.path.join(str(out), "pytorch_model.bin.0"), map_location="cpu", weights_only=True)
    return {k: v for k, v in state.items() if torch.is_tensor(v)}


def test_training_is_deterministic_for_a_seed_and_the_seed_matters(ckpts, tmp_path):
    """The demo and the study promise rerun = same numbers: one seed trains bit-identical
    weights twice; another seed (data order, new modules' init) trains different ones."""
    data = make_msrvtt(str(tmp_path / "data"), n_videos=4, n_test=2, seconds=1.0)
    first = _trained_weights(data, ckpts, tmp_path / "a", seed=3)
    again = _trained_weights(data, ckpts, tmp_path / "b", seed=3)
    other = _trained_weights(data, ckpts, tmp_path / "c", seed=4)
    assert first.keys() == again.keys() == other.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)
