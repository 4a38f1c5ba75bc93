"""Linear probes (tools/probe_sound.py): the cross-validated classifier on constructed problems, and
probe_checkpoint end to end on a tiny synthetic benchmark and a checkpoint trained by main()."""
import json
import os

import numpy as np
import pytest
import torch

import evaluation
import main_task_retrieval
from dataloaders.base import collate_items
from modules.fusion import masked_mean
from preprocess import cache_audio_features
from synthetic.make_synthetic_av import SyntheticAVConfig, generate
from tests.test_train_e2e import tiny_flags, write_tiny_checkpoints
from tools import probe_sound
from training import video_inputs
from util import DistInfo

# 30 test clips: 20 with informative audio (7 events), 10 noise clips; 9 training clips.
TINY_BENCH = dict(num_train_clips=9, num_test_clips=30, train_renders=1, audio_pretrain_clips=0, size=32,
                  seconds=2.0, fps=4, workers=1)
TEXT_GUIDED = ("--text_gate", "--text_query", "--query_gate")
TRAIN_CSV, TEST_CSV = "MSRVTT_train.9k.csv", "MSRVTT_JSFUSION_test.csv"


def test_separable_features_are_decoded():
    rng = np.random.default_rng(0)
    labels = np.repeat(["bark", "siren", "beep"], 20)
    centres = {name: 3.0 * rng.standard_normal(8) for name in ("bark", "siren", "beep")}
    features = np.stack([centres[y] for y in labels]) + 0.3 * rng.standard_normal((60, 8))
    out = probe_sound.cross_validated_accuracy(features, labels, target="toy")
    assert out["accuracy"] >= 95.0 and out["folds"] == 5 and len(out["fold_accuracy"]) == 5
    assert out["chance_uniform"] == pytest.approx(100 / 3) and out["num_samples"] == 60 and out["dim"] == 8


def test_shuffled_labels_stay_near_chance():
    # 64-dimensional noise with 120 samples: a classifier scored on its own training data would
    # fit it almost perfectly; held-out folds must not.
    rng = np.random.default_rng(1)
    features = rng.standard_normal((120, 64))
    labels = rng.permutation(np.repeat(["a", "b", "c", "d"], 30))
    out = probe_sound.cross_validated_accuracy(features, labels)
    assert out["chance_uniform"] == 25.0
    assert out["accuracy"] < 25.0 + 15.0
    signal = features.copy()
    signal[:, 0] += 4.0 * (labels == "a")  # one informative direction lifts it
    assert probe_sound.cross_validated_accuracy(signal, labels)["accuracy"] > out["accuracy"] + 10.0


def test_rare_classes_are_dropped_and_folds_shrink_deterministically():
    rng = np.random.default_rng(2)
    labels = ["x"] * 6 + ["y"] * 3 + ["z"]
    features = rng.standard_normal((10, 4))
    out = probe_sound.cross_validated_accuracy(features, labels)
    assert out["dropped"] == {"classes": ["z"], "samples": 1}
    assert out["folds"] == 3 and out["num_classes"] == 2 and out["num_samples"] == 9
    assert out == probe_sound.cross_validated_accuracy(features, labels)
    alone = probe_sound.cross_validated_accuracy(features[:7], labels[:7])  # "x" x6 and "y" once
    assert alone["accuracy"] is None and "two classes" in alone["reason"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny benchmark and a text-guided checkpoint trained on it for one epoch."""
    root = tmp_path_factory.mktemp("probe")
    bench = str(root / "bench")
    generate(bench, SyntheticAVConfig(**TINY_BENCH))
    data = {"data_path": bench, "features_path": os.path.join(bench, "videos"),
            "audio_path": os.path.join(bench, "audio")}
    ckpts = write_tiny_checkpoints(str(root))
    cache = str(root / "ast_cache")
    cache_audio_features.main(["--checkpoint", ckpts["ast"], "--audio_dir", data["audio_path"], "--cache_dir", cache,
                               "--video_list", *[os.path.join(bench, f) for f in (TRAIN_CSV, TEST_CSV)],
                               "--device", "cpu", "--num_workers", "0"])
    run = root / "run"
    flags = tiny_flags(data, ckpts, run, *TEXT_GUIDED, "--batch_size", "8")
    flags[flags.index("--audio_path"):flags.index("--audio_path") + 2] = ["--audio_feature_cache", cache]
    main_task_retrieval.main(["--do_train", "--skip_test", "--epochs", "1", "--expand_msrvtt_sentences", *flags])
    with open(os.path.join(bench, "metadata.json")) as f:
        metadata = json.load(f)
    return bench, cache, str(run / "pytorch_model.bin.0"), metadata


def test_probe_checkpoint_end_to_end(trained, tmp_path):
    bench, cache, checkpoint, metadata = trained
    path = str(tmp_path / "probe.json")
    out = probe_sound.main(["--checkpoint", checkpoint, "--data_path", bench, "--audio_feature_cache", cache,
                            "--batch_size_val", "4", "--out", path])
    with open(path) as f:
        assert json.load(f) == json.loads(json.dumps(out))
    assert set(out["representations"]) == {*probe_sound.VIDEO_REPRESENTATIONS, "caption_embedding"}
    assert out["skipped"] == {} and "agnostic view" in out["video_view"]
    assert set(out["audio_category"]) == set(probe_sound.VIDEO_REPRESENTATIONS)
    category = out["audio_category"]["ast_tokens"]
    assert category["num_samples"] == 30 and category["class_counts"] == {"informative": 20, "irrelevant": 10}
    test_videos = {v: e for v, e in metadata["videos"].items() if e["split"] == "test"}
    informative = sum(e["informative_audio"] for e in test_videos.values())
    sound_captions = sum(c["kind"] == "sound" for c in metadata["test_captions"])
    assert out["num_informative_videos"] == informative and out["num_sound_captions"] == sound_captions
    for name, r in out["representations"].items():
        assert r["accuracy"] is not None and 0.0 <= r["accuracy"] <= 100.0, name
        expected = sound_captions if name == "caption_embedding" else informative
        assert r["num_samples"] + r["dropped"]["samples"] == expected
    # Every visual attribute, from every test clip's embedding and every test caption's.
    assert set(out["visual_attributes"]) == {"shape", "colour", "motion", "background"}
    for attribute, sides in out["visual_attributes"].items():
        classes = {e[attribute] for e in test_videos.values()}
        video, caption = sides["video_embedding"], sides["caption_embedding"]
        assert video["num_samples"] + video["dropped"]["samples"] == len(test_videos), attribute
        assert caption["num_samples"] + caption["dropped"]["samples"] == len(metadata["test_captions"]), attribute
        assert set(video["class_counts"]) | set(video["dropped"]["classes"]) == classes, attribute
    # The frame settings came from the run's args.json (tiny_flags: --max_words 16).
    assert out["data"]["max_words"] == 16


def test_probed_features_are_the_models_own(trained):
    """The video embedding is the score's global vector (encode_video's index row 0, the agnostic
    view), and the fused frames are the blend of the unblended x_L and v0."""
    bench, cache, checkpoint, _ = trained
    model, _ = probe_sound.model_from_checkpoint(checkpoint, torch.device("cpu"))
    data = probe_sound.resolve_data(probe_sound.ProbeData(data_path=bench, audio_feature_cache=cache), checkpoint)
    videos = probe_sound.build_eval_datasets(probe_sound.data_config(data, model)).videos
    features = probe_sound.encode_videos(model, videos, 4, 0, torch.device("cpu"))
    reference = evaluation.encode_dataset(model, videos, "video", 5, 0, collate_items, DistInfo(), "fp32", "ref")
    torch.testing.assert_close(torch.from_numpy(features["video_embedding"]), reference.index[:, 0],
                               rtol=0, atol=1e-5)
    batch = collate_items([videos[i] for i in range(len(videos))])
    inputs = video_inputs(batch, torch.device("cpu"))
    with torch.no_grad():
        v0 = model.fusion.embed_frames(model.frame_embeddings(inputs["frames"], inputs["frame_mask"]))
    r = model.cfg.fusion.fusion_residual
    blended = r * features["fused_frames_unblended"] + (1 - r) * masked_mean(v0, inputs["frame_mask"].bool()).numpy()
    np.testing.assert_allclose(features["fused_frames"], blended, rtol=0, atol=1e-5)
    cached = videos.media.audio.cache
    tokens = np.stack([cached.tokens(v).astype(np.float32).mean(0) for v in videos.split.video_ids])
    np.testing.assert_allclose(features["ast_tokens"], tokens, rtol=0, atol=1e-3)


def test_checkpoint_without_record_is_refused(trained, tmp_path):
    _, _, checkpoint, _ = trained
    bare = str(tmp_path / "bare.bin")
    with open(checkpoint, "rb") as src, open(bare, "wb") as dst:
        dst.write(src.read())
    with pytest.raises(ValueError, match="has no record"):
        probe_sound.model_from_checkpoint(bare, torch.device("cpu"))


def test_visual_only_checkpoint_skips_the_audio_stages(trained, tmp_path):
    bench, cache, _, _ = trained
    data = {"data_path": bench, "features_path": os.path.join(bench, "videos"),
            "audio_path": os.path.join(bench, "audio")}
    run = tmp_path / "visual"
    main_task_retrieval.main(["--do_train", "--max_steps", "1", "--expand_msrvtt_sentences",
                              *tiny_flags(data, write_tiny_checkpoints(str(tmp_path)), run, "--no_audio")])
    out = probe_sound.probe_checkpoint(str(run / "pytorch_model.bin.step1"),
                                       probe_sound.ProbeData(data_path=bench, audio_feature_cache=cache))
    assert set(out["skipped"]) == {"resampled_audio", "fused_frames_unblended"}
    assert {"ast_tokens", "fused_frames", "video_embedding", "caption_embedding"} == set(out["representations"])
    assert "visual-only" in out["video_view"] and out["model"]["no_audio"] is True
    # The AST tokens are the data's, whichever model reads them.
    with_wavs = probe_sound.probe_checkpoint(str(run / "pytorch_model.bin.step1"),
                                             probe_sound.ProbeData(data_path=bench, audio_path=data["audio_path"]))
    assert "ast_tokens" in with_wavs["skipped"] and "--audio_feature_cache" in with_wavs["skipped"]["ast_tokens"]
