"""The category-shortcut control cache (synthetic/category_audio_cache.py): every clip gets exactly
the tokens of its audio category's training exemplar."""
import json
import os

import numpy as np
import pytest

from dataloaders.audio_cache import AudioCacheWriter, AudioFeatureCache, read_index
from synthetic import category_audio_cache

TOKENS, WIDTH = 5, 4
# (video id, split, informative audio, sound, category)
CLIPS = [("syn00000_r0", "train", True, "dog bark", "twin"), ("syn00001_r0", "train", False, "white noise", "noise"),
         ("syn00002_r0", "train", True, "siren", "solo"), ("syn00003_r0", "train", False, "brown noise", "noise"),
         ("syn00004_r0", "test", True, "beep", "twin"), ("syn00005_r0", "test", False, "hum", "noise"),
         ("syn00006_r0", "test", True, "whistle", "solo")]


def _source(tmp_path, clips=CLIPS) -> tuple:
    """A source cache of distinct random tokens per clip and its metadata.json."""
    rng = np.random.default_rng(0)
    ids = [c[0] for c in clips]
    source = str(tmp_path / "source")
    writer = AudioCacheWriter(source, ids, {"checkpoint": {"name": "ast.pth"}}, TOKENS, WIDTH)
    writer.write(range(len(ids)), rng.standard_normal((len(ids), TOKENS, WIDTH)), [True] * len(ids))
    metadata = str(tmp_path / "metadata.json")
    with open(metadata, "w") as f:
        json.dump({"videos": {vid: {"split": split, "informative_audio": info, "sound": sound, "category": cat}
                              for vid, split, info, sound, cat in clips}}, f)
    return source, metadata


def test_every_clip_gets_its_category_exemplar_exactly(tmp_path):
    source, metadata = _source(tmp_path)
    out = str(tmp_path / "category")
    summary = category_audio_cache.main(["--source_cache", source, "--metadata", metadata, "--out", out])
    exemplars = {k: v["video_id"] for k, v in summary["exemplars"].items()}
    split = {c[0]: c[1] for c in CLIPS}
    assert set(exemplars) == {"informative", "irrelevant"}
    assert all(split[v] == "train" for v in exemplars.values())  # never a test clip
    original, replaced = AudioFeatureCache(source), AudioFeatureCache(out)
    for vid, _, informative, _, _ in CLIPS:
        exemplar = exemplars["informative" if informative else "irrelevant"]
        assert np.array_equal(replaced.tokens(vid), original.tokens(exemplar))
        assert replaced.has_audio(vid)
    # Two clips of the same category now carry identical tokens; the categories differ.
    assert not np.array_equal(replaced.tokens("syn00004_r0"), replaced.tokens("syn00005_r0"))
    recorded = read_index(out)["fingerprint"]
    assert recorded["checkpoint"] == {"name": "ast.pth"}  # the trunk the tokens come from is kept
    assert recorded["category_exemplars"]["exemplars"]["informative"]["video_id"] == exemplars["informative"]
    assert summary["clips_per_category"] == {"informative": 4, "irrelevant": 3}


def test_exemplars_are_deterministic_per_seed(tmp_path):
    source, metadata = _source(tmp_path)
    first = category_audio_cache.build_category_cache(source, metadata, str(tmp_path / "a"), seed=3)
    again = category_audio_cache.build_category_cache(source, metadata, str(tmp_path / "b"), seed=3)
    assert first["exemplars"] == again["exemplars"]
    assert np.array_equal(np.load(os.path.join(tmp_path, "a", "tokens.npy")),
                          np.load(os.path.join(tmp_path, "b", "tokens.npy")))
    seeds = {category_audio_cache.build_category_cache(source, metadata, str(tmp_path / f"s{s}"), seed=s)
             ["exemplars"]["informative"]["video_id"] for s in range(8)}
    assert len(seeds) == 2  # both training candidates get drawn by some seed


def test_bad_inputs_are_named(tmp_path):
    source, metadata = _source(tmp_path)
    with open(metadata) as f:
        videos = json.load(f)["videos"]
    del videos["syn00006_r0"]
    partial = str(tmp_path / "partial.json")
    with open(partial, "w") as f:
        json.dump({"videos": videos}, f)
    with pytest.raises(ValueError, match="--metadata .* lacks 1 videos"):
        category_audio_cache.build_category_cache(source, partial, str(tmp_path / "x"))
    with pytest.raises(ValueError, match="--out must differ"):
        category_audio_cache.build_category_cache(source, metadata, source)
    test_only = [c for c in CLIPS if c[1] == "test"]
    source2, metadata2 = _source(tmp_path / "t", test_only)
    with pytest.raises(ValueError, match="no training clip with informative audio"):
        category_audio_cache.build_category_cache(source2, metadata2, str(tmp_path / "y"))
