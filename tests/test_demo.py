"""The synthetic-benchmark demo: its aggregation on hand-made score matrices and gates, the tiny
checkpoints and audio-trunk pre-training, and a reduced demo run end to end under torchrun."""
import json
import os

import numpy as np
import pytest
import torch

from modules.ast import AST, audioset_checkpoint_to_ast
from modules.clip import CLIP, load_clip_state_dict
from synthetic import demo, demo_results
from synthetic.make_synthetic_av import SyntheticAVConfig, generate
from synthetic.make_tiny_checkpoints import (AUDIOSET_CLASSES, TinyCheckpointConfig, ast_to_audioset_checkpoint,
                                             make_tiny_checkpoints)
from synthetic.pretrain_audio_trunk import PretrainConfig, pretrain, trunk_tokens

# A reduced demo: a few clips, one short epoch, four rows covering the visual-only model,
# the zero-token cache, the gated model and a residual text-guided model warm-started from it
# (with its paired_block, reordered and audio-perturbed evaluations).
REDUCED_ROWS = ("visual_only", "zero_audio", "avigate", "category_audio", "tg_residual_frozen")
REDUCED = dict(num_train_clips=12, num_test_clips=9, train_renders=1, audio_pretrain_clips=20,
               pretrain_steps=2, clip_pretrain_steps=2, clip_pretrain_images=128, num_val_clips=3, epochs=1,
               batch_size=8, rows=REDUCED_ROWS)
# A hang guard (pytest-timeout), not a speed test.
REDUCED_DEMO_TIMEOUT = 900


# ----------------------------------------------------------------------------- aggregation

def test_roc_auc_hand_worked():
    # Pairs (positive, negative): 0.9 beats both, 0.6 beats both, 0.4 loses to 0.5 and ties 0.4:
    # (4 wins + 0.5 tie) / 6 pairs.
    assert demo_results.roc_auc(np.array([0.9, 0.4, 0.6]), np.array([0.5, 0.4])) == pytest.approx(4.5 / 6)
    assert demo_results.roc_auc(np.array([1.0, 2.0]), np.array([0.0])) == 1.0
    assert demo_results.roc_auc(np.array([0.0]), np.array([1.0, 2.0])) == 0.0
    assert demo_results.roc_auc(np.array([]), np.array([1.0])) is None


def test_subset_recalls_rank_against_whole_gallery_ties_pessimistic():
    # 4 texts, 4 videos; videos 0 and 1 informative. Text i belongs to video i.
    sim = np.array([[5.0, 1.0, 0.0, 0.0],    # text 0: rank 1
                    [2.0, 2.0, 0.0, 0.0],    # text 1: tied with video 0 -> rank 2 (pessimistic)
                    [0.0, 0.0, 3.0, 1.0],    # text 2: rank 1
                    [0.0, 9.0, 0.0, 4.0]])   # text 3: video 1 (informative) scores higher -> rank 2
    out = demo_results.subset_recalls(sim, np.arange(4), np.array([True, True, False, False]))
    assert out["t2v_R@1"] == {"informative": 50.0, "noise": 50.0}
    # v2t: video 0's best text is 0 (5 beats 2) -> rank 1; video 1: text 3 scores 9 > text 1's 2 -> rank 2;
    # video 2: rank 1; video 3: text 3's 4 is the column's best -> rank 1.
    assert out["v2t_R@1"] == {"informative": 50.0, "noise": 100.0}


def test_subset_recalls_empty_subset_is_none():
    out = demo_results.subset_recalls(np.eye(2), np.arange(2), np.array([False, False]))
    assert out["t2v_R@1"]["informative"] is None and out["t2v_R@1"]["noise"] == 100.0


def _gates_json(values: dict, text_guided: bool) -> dict:
    key = "own_caption_mean" if text_guided else "gates"
    return {"text_guided": text_guided, "gate_names": ["att", "ff"],
            "videos": [{"video_id": vid, key: {"att": att, "ff": ff}} for vid, (att, ff) in values.items()]}


@pytest.mark.parametrize("text_guided", [False, True])
def test_gate_summary_uses_absolute_values_and_last_layer(text_guided):
    values = {"a": ([0.1, -0.9], [0.2, 0.2]), "b": ([0.0, 0.7], [0.1, 0.3]),
              "c": ([0.5, 0.1], [0.0, 0.2]), "d": ([0.5, -0.2], [0.4, 0.1])}
    informative = np.array([True, True, False, False])
    # Rows of the summary follow the given video order, not the file's.
    order = ["a", "b", "c", "d"]
    gates = _gates_json({v: values[v] for v in reversed(order)}, text_guided)
    summary = demo_results.gate_summary(gates, order, informative)
    att = summary["att"]
    assert att["informative_mean"] == pytest.approx([0.05, 0.8])
    assert att["noise_mean"] == pytest.approx([0.5, 0.15])
    assert att["last_layer_auc"] == 1.0  # |-0.9|, 0.7 above 0.1, |-0.2|
    assert att["last_layer_gap"] == pytest.approx(0.65)
    # ff last layer: informative 0.2, 0.3 vs noise 0.2, 0.1 -> (0.5 + 1 + 1 + 1) / 4.
    assert summary["ff"]["last_layer_auc"] == pytest.approx(3.5 / 4)


def _run(sim, rows, cols):
    return demo_results.EvalRun({"plain": {}}, np.asarray(sim, dtype=np.float32), rows, cols, None)


def test_max_pair_difference_ignores_order_and_finds_changes():
    rows = [{"video_id": "v0", "caption": "t0"}, {"video_id": "v1", "caption": "t1"}]
    sim = np.array([[1.0, 2.0], [3.0, 4.0]])
    first = _run(sim, rows, ["v0", "v1"])
    permuted = _run(sim[::-1, ::-1], rows[::-1], ["v1", "v0"])
    assert demo_results.max_pair_difference(first, permuted) == 0.0
    changed = _run(np.array([[4.0, 3.0], [2.0, 1.5]]), rows[::-1], ["v1", "v0"])
    assert demo_results.max_pair_difference(first, changed) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="same"):
        demo_results.max_pair_difference(first, _run(sim, rows, ["v0", "v2"]))


def test_informative_flags_reports_unknown_videos():
    metadata = {"videos": {"v0": {"informative_audio": True}, "v1": {"informative_audio": False}}}
    assert demo_results.informative_flags(metadata, ["v1", "v0"]).tolist() == [False, True]
    with pytest.raises(KeyError, match="metadata.json"):
        demo_results.informative_flags(metadata, ["v2"])


def test_acceptance_checks_directions():
    def entry(row, t2v, twin_sound, **extra):
        summary = {"metrics": {"t2v_R@1": t2v},
                   "subsets": {"t2v_R@1": {"sound_twin": twin_sound, "visual_noise": t2v}}}
        summary.update(extra.pop("summary", {}))
        return {"row": row, "seed": 0, "summary": summary, **extra}

    gates = {"gates": {"att": {"last_layer_auc": 0.9, "last_layer_gap": 0.1}}}
    # sound gains are measured over the zero-audio control, not over visual-only
    entries = [entry("visual_only", 1.0, 1.0), entry("zero_audio", 10.0, 5.0),
               entry("avigate", 25.0, 24.0, summary=gates), entry("ungated", 20.0, 26.0),
               entry("seed_style", 20.0, 20.0, paired_block={"metrics": {"t2v_R@1": 45.0}}),
               entry("text_guided", 30.0, 30.0, shuffle_max_abs_diff=2e-3)]
    checks = demo.acceptance(entries, seed=0)
    assert checks["avigate_gain_overall"]["value"] == 15.0 and checks["avigate_gain_overall"]["met"]
    assert checks["avigate_gain_informative"]["value"] == 19.0 and not checks["avigate_gain_informative"]["met"]
    assert checks["ungated_gain_informative"]["value"] == 21.0 and checks["ungated_gain_informative"]["met"]
    assert checks["gate_auc"]["met"] and not checks["gate_gap"]["met"]
    assert checks["seed_style_leak"]["value"] == 25.0 and checks["seed_style_leak"]["met"]
    assert not checks["honest_shuffle_invariance"]["met"]  # 2e-3 > tolerance


# ----------------------------------------------------------------------------- checkpoints

def test_tiny_checkpoints_load_through_the_released_format_loaders(tmp_path):
    cfg = TinyCheckpointConfig()
    paths = make_tiny_checkpoints(str(tmp_path), cfg)
    clip = CLIP.from_state_dict(load_clip_state_dict(paths["clip"]))
    assert clip.cfg == cfg.clip_config() and clip.cfg.embed_dim == clip.cfg.transformer_width
    raw = torch.load(paths["ast"], weights_only=True)
    assert all(k.startswith(("module.v.", "module.mlp_head.")) for k in raw)
    assert raw["module.mlp_head.1.weight"].shape == (AUDIOSET_CLASSES, cfg.ast_width)
    ast = AST.from_checkpoint(paths["ast"])
    assert ast.cfg == cfg.ast_config()
    torch.testing.assert_close(ast.pos_embed, raw["module.v.pos_embed"])


def test_audioset_converter_round_trip():
    ast = AST(TinyCheckpointConfig().ast_config())
    converted = audioset_checkpoint_to_ast(ast_to_audioset_checkpoint(ast.state_dict(), {"0.weight": torch.ones(2)}))
    assert converted.keys() == ast.state_dict().keys()
    assert all(torch.equal(converted[k], v) for k, v in ast.state_dict().items())


@pytest.fixture(scope="module")
def pretrain_data(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("pretrain_data"))
    generate(out, SyntheticAVConfig(num_train_clips=1, num_test_clips=1, train_renders=1,
                                    audio_pretrain_clips=6, workers=1))
    return out


def test_pretraining_trains_the_trunk_and_writes_audioset_format(pretrain_data, tmp_path):
    paths = make_tiny_checkpoints(str(tmp_path), TinyCheckpointConfig(ast_depth=1))
    out = str(tmp_path / "pretrained.pth")
    report = pretrain(pretrain_data, paths["ast"], out, PretrainConfig(steps=2, batch_size=4, workers=0,
                                                                       val_fraction=0.34))
    assert report["train_clips"] == 4 and report["held_out_clips"] == 2
    assert json.load(open(str(tmp_path / "pretrained.json")))["checkpoint"] == out
    before, after = torch.load(paths["ast"], weights_only=True), torch.load(out, weights_only=True)
    assert set(after) - set(before) == set() and after["module.mlp_head.1.weight"].shape[0] == 10
    # The frozen-at-retrieval trunk did train here.
    assert not torch.equal(before["module.v.blocks.0.attn.qkv.weight"], after["module.v.blocks.0.attn.qkv.weight"])
    AST.from_checkpoint(out)


def test_trunk_tokens_carry_gradients():
    ast = AST(TinyCheckpointConfig(ast_depth=1).ast_config())
    for p in ast.parameters():
        p.requires_grad_(True)
    trunk_tokens(ast, torch.randn(1, ast.cfg.target_frames, ast.cfg.num_mel_bins)).sum().backward()
    assert ast.blocks[0].attn.qkv.weight.grad is not None


# ----------------------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def reduced_demo(tmp_path_factory):
    out_dir = str(tmp_path_factory.mktemp("demo"))
    cfg = demo.DemoConfig(out_dir=out_dir, **REDUCED)
    return out_dir, demo.run_demo(cfg, profile="test")


@pytest.mark.distributed
@pytest.mark.timeout(REDUCED_DEMO_TIMEOUT)
def test_reduced_demo_end_to_end(reduced_demo):
    out_dir, results = reduced_demo
    on_disk = json.load(open(os.path.join(out_dir, "results.json")))
    assert on_disk == json.loads(json.dumps(results))
    assert [e["row"] for e in results["rows"]] == list(REDUCED_ROWS)
    num_videos = REDUCED["num_test_clips"]
    num_texts = num_videos * SyntheticAVConfig().captions_per_clip  # every caption of a test clip is a query
    assert results["num_test_texts"] == num_texts
    for entry in results["rows"]:
        summary = entry["summary"]
        assert set(summary["metrics"]) >= {"t2v_R@1", "t2v_R@5", "t2v_R@10", "v2t_R@1", "v2t_R@5", "v2t_R@10"}
        assert summary["num_texts"] == num_texts and summary["num_videos"] == num_videos
        for subset in summary["subsets"]["t2v_R@1"].values():
            assert subset is None or 0.0 <= subset <= 100.0
        assert ("gates" in summary) == (entry["row"] != "visual_only")
    guided = results["rows"][-1]
    assert "LEAKING" in guided["paired_block"]["LEAKING"]
    # Honest text-guided scores depend only on the pair: reordering and re-batching the test
    # list changes nothing beyond float rounding.
    assert results["acceptance"]["honest_shuffle_invariance"]["met"]
    assert set(results["acceptance"]) >= {"avigate_gain_overall", "avigate_gain_informative", "gate_auc",
                                          "gate_gap", "honest_shuffle_invariance"}
    # Robustness rows: the visual-only model has no audio to perturb (no change by construction).
    robust = results["robustness"]["rows"]
    assert set(robust) == {e["label"] for e in results["rows"] if demo.ROW_BY_NAME[e["row"]].robustness}
    visual = robust[demo.ROW_BY_NAME["visual_only"].label]
    assert {visual[k]["t2v_R@1"] for k in ("none", "silence", "noise", "swap")} == {visual["none"]["t2v_R@1"]}
    assert "## Robustness" in open(os.path.join(out_dir, "results.md")).read()
    figures = results["figures"]
    assert len(figures) == 4 and all(os.path.getsize(f) > 0 for f in figures)
    # diagnostics: every row probed (the visual-only row has no resampler), gated rows log their
    # gates per epoch on the validation split (before training + each epoch), the shortcut split
    by_row = {e["row"]: e for e in results["rows"]}
    assert by_row["visual_only"]["probe"]["resampled_audio"] is None
    # (on 9 test clips a probe may lack two classes with two samples each: None, with its reason)
    assert set(by_row["avigate"]["probe"]) == set(demo.PROBE_COLUMNS)
    assert all(v is None or 0.0 <= v <= 100.0 for v in by_row["avigate"]["probe"].values())
    assert os.path.isfile(os.path.join(out_dir, "runs", "avigate_seed0", "probe", demo.PROBE_FILE))
    assert len(by_row["avigate"]["gates_per_epoch"]) == REDUCED["epochs"] + 1
    assert by_row["zero_audio"]["gates_per_epoch"] is not None and by_row["visual_only"]["gates_per_epoch"] is None
    split = results["shortcut"]["all"]
    assert split["gain"] == pytest.approx(split["category_bit"] + split["sound"])
    assert "| visual-only (--no_audio) |" in open(os.path.join(out_dir, "results.md")).read()


@pytest.mark.distributed
def test_reduced_demo_rerun_is_cached_and_compares(reduced_demo):
    out_dir, results = reduced_demo
    cfg = demo.DemoConfig(out_dir=out_dir, **REDUCED)

    def stamps():
        return {os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns
                for d, _, files in os.walk(out_dir) for f in files if f == demo.STAMP}

    before = stamps()
    again = demo.run_demo(cfg, compare_to=os.path.join(out_dir, "results.json"), profile="test")
    check = again["acceptance"]["reproduction"]
    assert check["value"] == 0.0 and check["met"]
    # Every stage came from its cache: no stage was rebuilt (its stamp would be rewritten).
    assert len(before) > 10 and stamps() == before


def test_kind_recalls_group_captions_by_their_tag():
    sim = np.array([[5.0, 1.0], [2.0, 3.0], [0.0, 1.0]])  # text 2 (video 0) ranks video 0 second
    metadata = {"test_captions": [{"video_id": "a", "caption": "x", "kind": "sound"},
                                  {"video_id": "b", "caption": "y", "kind": "visual_noise"},
                                  {"video_id": "a", "caption": "z", "kind": "sound"}]}
    rows = [{"video_id": "a", "caption": "x"}, {"video_id": "b", "caption": "y"}, {"video_id": "a", "caption": "z"}]
    kinds = demo_results.caption_kinds(metadata, rows)
    out = demo_results.kind_recalls(sim, np.array([0, 1, 0]), kinds)["t2v_R@1"]
    assert out == {"sound": 50.0, "visual_informative": None, "visual_noise": 100.0}
    # sound captions split by their clip's category
    metadata["videos"] = {"a": {"category": "twin"}, "b": {"category": "noise"}}
    splits = demo_results.sound_splits(kinds, np.array([0, 1, 0]), metadata, ["a", "b"])
    assert splits.tolist() == ["sound_twin", "visual_noise", "sound_twin"]
    out = demo_results.kind_recalls(sim, np.array([0, 1, 0]), splits, names=demo_results.SOUND_SPLITS)["t2v_R@1"]
    assert out == {"sound_twin": 50.0, "sound_solo": None}
    with pytest.raises(KeyError, match="test_captions"):
        demo_results.caption_kinds(metadata, [{"video_id": "c", "caption": "x"}])
