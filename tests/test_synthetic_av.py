"""Synthetic audio-visual benchmark: file formats through the real MSR-VTT loaders, media,
reproducibility, and the content design (docs/synthetic_benchmark.md, "Design: audio relevance depends on the query")."""
import filecmp
import json
import os
import re
import subprocess
import sys
from collections import defaultdict
from dataclasses import replace

import av
import numpy as np
import pandas as pd
import pytest
import soundfile as sf

from dataloaders.registry import DataConfig, build_eval_datasets, build_train_dataset
from dataloaders.video import FrameSamplingConfig
from metrics import retrieval_metrics
from synthetic.design import (CAPTION_KINDS, KIND_SOUND, KIND_VISUAL_INFORMATIVE, KIND_VISUAL_NOISE,
                              design_counts, plan_benchmark)
from synthetic.make_synthetic_av import (AUDIO_DIR, PRETRAIN_DIR, PRETRAIN_LABELS, VIDEO_DIR,
                                         SyntheticAVConfig, generate, main, synthesize_audio,
                                         validate_config)
from synthetic.make_val_split import make_val_split
from synthetic.vocab import (BACKGROUNDS, COLOURS, MOTION_PHRASES, SHAPES, SOUND_BY_NAME, SOUND_EVENTS,
                             SOUND_WORDS, SYNTHESIZERS, VISUAL_ATTRIBUTES)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 18 test clips: 2 twin groups (6 clips), 6 solo and 6 noise clips; 24 training clips.
SMALL = dict(num_train_clips=24, num_test_clips=18, train_renders=2, audio_pretrain_clips=10,
             size=48, seconds=3.0, fps=5, seed=3)
CLI_ARGS = [f"--{k}={v}" for k, v in SMALL.items()]
CAPTIONS = SyntheticAVConfig().captions_per_clip
# A shape pixel differs from the frame's median (background) colour by more than this on some
# channel (shape colours differ from both backgrounds by ~40 or more even in the worst case).
SHAPE_CONTRAST = 40
# Median frame brightness separating black (below) from grey (above) backgrounds.
BACKGROUND_SPLIT = 70
TICK_OVER_FLOOR = 3.0  # a 10 ms frame with a click holds this many times the floor's energy
SWEEP_LOUD, MIN_SWEEP = 0.1, 20  # sweep frames: energy share of the loudest; frames per sweep
MIN_TEST_VIDEOS, MIN_TEST_CAPTIONS = 500, 1000  # issue 9's size of the default test split


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """A small benchmark written through the CLI with two workers; returns its folder."""
    out = str(tmp_path_factory.mktemp("synthetic") / "a")
    main(["--out_dir", out, "--workers", "2"] + CLI_ARGS)
    return out


@pytest.fixture(scope="module")
def metadata(bench):
    with open(os.path.join(bench, "metadata.json")) as handle:
        return json.load(handle)


@pytest.fixture(scope="module")
def meta(metadata):
    return metadata["videos"]


@pytest.fixture(scope="module")
def default_plan():
    """The default benchmark's content, planned without rendering anything."""
    return plan_benchmark(SyntheticAVConfig())


def _decode(path):
    with av.open(path) as container:
        stream = container.streams.video[0]
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
        return frames, stream.average_rate, container.duration / av.time_base


def _all_files(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


def _split(meta, split):
    return {video_id: entry for video_id, entry in meta.items() if entry["split"] == split}


def _visuals(entry):
    return tuple(entry[name] for name in VISUAL_ATTRIBUTES)


def _phrase_owners(caption, phrases_by_owner):
    """Owners (motions, sounds) whose phrases occur in the caption."""
    return {owner for owner, phrases in phrases_by_owner.items() if any(p in caption for p in phrases)}


MOTION_TEXT = {motion: [p for pair in phrases for p in pair] for motion, phrases in MOTION_PHRASES.items()}
SOUND_TEXT = {event.name: event.phrases for event in SOUND_EVENTS if event.informative}


def _read_caption(caption):
    """What a caption's text says: {shape, colour, motion, background} values and the sound
    named (None when none is); raises AssertionError when an attribute is missing or doubled."""
    words = re.findall(r"[a-z]+", caption)
    said = {}
    for name, vocabulary in (("shape", SHAPES), ("colour", COLOURS), ("background", BACKGROUNDS)):
        found = {w for w in words if w in vocabulary}
        assert len(found) == 1, (caption, name, found)
        said[name] = found.pop()
    motions = _phrase_owners(caption, MOTION_TEXT)
    sounds = _phrase_owners(caption, SOUND_TEXT)
    assert len(motions) == 1 and len(sounds) <= 1, (caption, motions, sounds)
    said["motion"] = motions.pop()
    return said, (sounds.pop() if sounds else None)


# ----------------------------------------------------------------------------- formats

def test_formats_load_with_the_msrvtt_loaders(bench, meta):
    train = pd.read_csv(os.path.join(bench, "MSRVTT_train.9k.csv"))
    test = pd.read_csv(os.path.join(bench, "MSRVTT_JSFUSION_test.csv"))
    assert list(train.columns) == ["video_id"] and list(test.columns) == ["key", "vid_key", "video_id", "sentence"]
    assert len(train) == SMALL["num_train_clips"] * SMALL["train_renders"]
    assert len(test) == SMALL["num_test_clips"] * CAPTIONS and test["key"].is_unique
    cfg = DataConfig(datatype="msrvtt", data_path=bench, features_path=os.path.join(bench, VIDEO_DIR),
                     audio_path=os.path.join(bench, AUDIO_DIR), max_words=32,
                     frames=FrameSamplingConfig(max_frames=3, image_size=32))
    data = build_eval_datasets(cfg)
    split = data.split
    # several captions per test video: the loader keeps every row and groups them by video
    assert split.num_videos == SMALL["num_test_clips"] and split.num_texts == len(test)
    for v, video_id in enumerate(split.video_ids):
        own = {c["caption"] for c in meta[video_id]["captions"]}
        assert meta[video_id]["split"] == "test"
        assert {split.captions[t] for t in split.captions_of(v)} == own and len(own) == CAPTIONS
    video = data.videos[0]
    assert video["frames"].shape == (3, 3, 32, 32) and bool(video["has_audio"])
    training = build_train_dataset(replace(cfg, expand_sentences=True))
    assert len(training) == SMALL["num_train_clips"] * SMALL["train_renders"] * CAPTIONS
    # metrics average t2v over every caption and v2t over every video
    scores = (split.caption_video[:, None] == np.arange(split.num_videos)[None, :]).astype(np.float32)
    scores[0, split.caption_video[0]] = -1.0  # one caption's video drops out of first place
    metrics = retrieval_metrics(scores, split.caption_video)
    assert metrics["t2v_R@1"] == pytest.approx(100.0 * (split.num_texts - 1) / split.num_texts)
    assert metrics["v2t_R@1"] == pytest.approx(100.0)  # the video's other captions still rank first


def test_metadata_tags_and_pretrain_labels(bench, metadata, meta):
    keys = {"clip_id", "split", "render", "category", *VISUAL_ATTRIBUTES, "sound", "informative_audio",
            "group_id", "captions"}
    assert all(set(entry) == keys for entry in meta.values())
    for entry in meta.values():
        assert entry["informative_audio"] == SOUND_BY_NAME[entry["sound"]].informative
        assert entry["informative_audio"] == (entry["category"] != "noise")
        assert all(c["mentions_sound"] == (c["kind"] == KIND_SOUND) for c in entry["captions"])
        assert all(c["kind"] in CAPTION_KINDS for c in entry["captions"])
    # test_captions: the tags of the test CSV's rows, in its order
    test = pd.read_csv(os.path.join(bench, "MSRVTT_JSFUSION_test.csv"))
    rows = metadata["test_captions"]
    assert [(r["key"], r["video_id"], r["caption"]) for r in rows] == list(zip(test["key"], test["video_id"],
                                                                              test["sentence"]))
    for row in rows:
        assert {"caption": row["caption"], "mentions_sound": row["mentions_sound"],
                "kind": row["kind"]} in meta[row["video_id"]]["captions"]
    with open(os.path.join(bench, PRETRAIN_LABELS)) as handle:
        labels = json.load(handle)
    assert labels["classes"] == [event.name for event in SOUND_EVENTS]
    assert len(labels["clips"]) == SMALL["audio_pretrain_clips"]
    assert {clip["class"] for clip in labels["clips"]} >= {"white_noise", "random_tones", "high_beep"}
    for clip in labels["clips"]:
        assert labels["classes"][clip["label"]] == clip["class"]
        info = sf.info(os.path.join(bench, PRETRAIN_DIR, clip["file"]))
        assert (info.samplerate, info.channels) == (16000, 1)


def test_videos_decode_to_requested_size_rate_and_length(bench, meta):
    for video_id in meta:
        frames, rate, duration = _decode(os.path.join(bench, VIDEO_DIR, video_id + ".mp4"))
        assert frames.shape == (SMALL["seconds"] * SMALL["fps"], SMALL["size"], SMALL["size"], 3)
        assert rate == SMALL["fps"]
        assert duration == pytest.approx(SMALL["seconds"], abs=1.0 / SMALL["fps"])


def test_wavs_are_16k_mono_of_clip_length(bench, meta):
    for video_id in meta:
        info = sf.info(os.path.join(bench, AUDIO_DIR, video_id + ".wav"))
        assert (info.samplerate, info.channels) == (16000, 1)
        assert info.frames == SMALL["seconds"] * 16000


def test_same_seed_same_bytes_other_seed_differs(bench, tmp_path):
    # one worker here, two in the fixture: the worker count must not change a byte
    again = str(tmp_path / "again")
    generate(again, SyntheticAVConfig(workers=1, **SMALL))
    names = _all_files(bench)
    assert names == _all_files(again)
    match, mismatch, errors = filecmp.cmpfiles(bench, again, names, shallow=False)
    assert mismatch == [] and errors == [] and len(match) == len(names)

    other = str(tmp_path / "other")
    generate(other, SyntheticAVConfig(workers=1, **dict(SMALL, seed=SMALL["seed"] + 1)))
    for name in ("MSRVTT_data.json", "metadata.json", os.path.join(AUDIO_DIR, "syn00000_r0.wav")):
        assert not filecmp.cmp(os.path.join(bench, name), os.path.join(other, name), shallow=False)
    first, _, _ = _decode(os.path.join(bench, VIDEO_DIR, "syn00000_r0.mp4"))
    second, _, _ = _decode(os.path.join(other, VIDEO_DIR, "syn00000_r0.mp4"))
    assert not np.array_equal(first, second)


def test_cli_runs_as_module():
    result = subprocess.run([sys.executable, "-m", "synthetic.make_synthetic_av", "--help"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0 and "--solo_sound_captions" in result.stdout, result.stderr


# ----------------------------------------------------------------------------- content design

def test_captions_say_what_the_clip_shows_and_tags_agree(meta):
    """Every caption names all four visual attributes of its clip (and no other value); a caption
    names a sound exactly when it is tagged mentions_sound, and then its clip's own sound; a
    visual caption uses no sound word at all."""
    for entry in meta.values():
        for caption in entry["captions"]:
            said, sound = _read_caption(caption["caption"])
            assert said == {name: entry[name] for name in VISUAL_ATTRIBUTES}, caption
            assert caption["mentions_sound"] == (sound is not None), caption
            if caption["mentions_sound"]:
                assert sound == entry["sound"], caption
            else:
                assert not set(re.findall(r"[a-z]+", caption["caption"])) & set(SOUND_WORDS), caption


def test_every_caption_has_exactly_one_matching_test_video(meta):
    """Read from the text alone, a visual caption matches the visuals of exactly one test video
    (its own), and a sound caption the visuals and sound of exactly one."""
    test = _split(meta, "test")
    for video_id, entry in test.items():
        for caption in entry["captions"]:
            said, sound = _read_caption(caption["caption"])
            matches = [v for v, e in test.items() if _visuals(e) == tuple(said[n] for n in VISUAL_ATTRIBUTES)
                       and (sound is None or e["sound"] == sound)]
            assert matches == [video_id], caption


@pytest.mark.parametrize("split", ["train", "test"])
def test_categories_get_their_caption_kinds(meta, split):
    """Twins: sound captions only; solo clips: both kinds (solo_sound_captions with sound);
    noise clips: visual captions only, no sound words."""
    solo_sound = SyntheticAVConfig().solo_sound_captions
    seen = set()
    for entry in _split(meta, split).values():
        kinds = [c["kind"] for c in entry["captions"]]
        seen.add(entry["category"])
        assert len(kinds) == CAPTIONS and len({c["caption"] for c in entry["captions"]}) == CAPTIONS
        if entry["category"] == "twin":
            assert kinds == [KIND_SOUND] * CAPTIONS
        elif entry["category"] == "solo":
            assert sorted(kinds) == sorted([KIND_SOUND] * solo_sound
                                           + [KIND_VISUAL_INFORMATIVE] * (CAPTIONS - solo_sound))
        else:
            assert kinds == [KIND_VISUAL_NOISE] * CAPTIONS
            assert not SOUND_BY_NAME[entry["sound"]].informative
    assert seen == {"twin", "solo", "noise"}


@pytest.mark.parametrize("split", ["train", "test"])
def test_visuals_repeat_only_within_twin_groups(meta, split):
    clips = {e["clip_id"]: e for e in _split(meta, split).values()}  # renders share their clip's content
    groups_of_visuals, members = defaultdict(set), defaultdict(list)
    for entry in clips.values():
        groups_of_visuals[_visuals(entry)].add(entry["group_id"])
        members[entry["group_id"]].append(entry)
    assert all(len(groups) == 1 for groups in groups_of_visuals.values())
    for group in members.values():
        assert len({_visuals(e) for e in group}) == 1
        if len(group) > 1:
            assert {e["category"] for e in group} == {"twin"} and len(group) == SyntheticAVConfig().group_size
            assert len({e["sound"] for e in group}) == len(group)
        else:
            assert group[0]["category"] in ("solo", "noise")


def test_written_counts_match_the_plan(metadata):
    planned = design_counts(plan_benchmark(SyntheticAVConfig(**SMALL)))
    assert metadata["design"]["counts"] == planned
    # 18 test clips: 2 twin groups, 6 solo, 6 noise; 3 captions each, 1 of a solo's 3 with sound
    assert planned["test"]["clips_per_category"] == {"twin": 6, "solo": 6, "noise": 6}
    assert planned["test"]["captions_per_kind"] == {KIND_SOUND: 24, KIND_VISUAL_INFORMATIVE: 12,
                                                    KIND_VISUAL_NOISE: 18}


def test_default_design_is_large_enough_and_training_mirrors_it(default_plan):
    counts = design_counts(default_plan)
    test, train = counts["test"], counts["train"]
    assert test["clips"] >= MIN_TEST_VIDEOS and test["captions"] >= MIN_TEST_CAPTIONS
    assert all(n > 0 for n in test["captions_per_kind"].values())
    for key in ("clips_per_category", "captions_per_kind"):  # the same mix in both splits
        assert {k: v / train["clips"] for k, v in train[key].items()} == pytest.approx(
            {k: v / test["clips"] for k, v in test[key].items()}, abs=0.02)
    test_clips = [p for p in default_plan if p.split == "test"]
    visuals = defaultdict(set)
    for plan in test_clips:
        visuals[plan.visuals].add(plan.group_id)
    assert all(len(groups) == 1 for groups in visuals.values())
    assert test["distinct_visual_combinations"] == len(visuals)
    # at the defaults every test visual combination also occurs in training
    assert set(visuals) <= {p.visuals for p in default_plan if p.split == "train"}


def test_test_videos_never_rendered_for_training(bench, meta):
    train = set(pd.read_csv(os.path.join(bench, "MSRVTT_train.9k.csv"))["video_id"])
    test = set(pd.read_csv(os.path.join(bench, "MSRVTT_JSFUSION_test.csv"))["video_id"])
    assert not train & test
    assert not {meta[v]["clip_id"] for v in train} & {meta[v]["clip_id"] for v in test}
    assert {meta[v]["render"] for v in test} == {0}
    assert {meta[v]["render"] for v in train} == set(range(SMALL["train_renders"]))
    # renders of one clip share content but not pixels
    first, _, _ = _decode(os.path.join(bench, VIDEO_DIR, "syn00000_r0.mp4"))
    second, _, _ = _decode(os.path.join(bench, VIDEO_DIR, "syn00000_r1.mp4"))
    assert not np.array_equal(first, second)


def _shape_track(frames):
    """Centroid x, y and area of the shape pixels (far from the median colour) per frame."""
    track = []
    for frame in frames.astype(np.int32):
        background = np.median(frame.reshape(-1, 3), axis=0)
        ys, xs = np.nonzero(np.abs(frame - background).max(axis=-1) > SHAPE_CONTRAST)
        track.append((xs.mean(), ys.mean(), len(xs)))
    return np.array(track)


def test_motion_and_background_follow_their_labels(bench, meta):
    component = {"left": (0, -1), "right": (0, 1), "up": (1, -1), "down": (1, 1),
                 "grows": (2, 1), "shrinks": (2, -1)}
    for video_id, entry in meta.items():
        frames = _decode(os.path.join(bench, VIDEO_DIR, video_id + ".mp4"))[0]
        track = _shape_track(frames)
        axis, sign = component[entry["motion"]]
        assert sign * (track[-1, axis] - track[0, axis]) > 0, video_id
        brightness = np.median(frames.mean(axis=-1))
        assert (brightness > BACKGROUND_SPLIT) == (entry["background"] == "grey"), video_id


def _peak_hz(wave, sample_rate):
    return np.argmax(np.abs(np.fft.rfft(wave))) * sample_rate / len(wave)


def _labelled_waves(bench, meta):
    """(sound, waveform) of every video soundtrack and pre-training clip."""
    with open(os.path.join(bench, PRETRAIN_LABELS)) as handle:
        clips = json.load(handle)["clips"]
    items = [(e["sound"], os.path.join(bench, AUDIO_DIR, v + ".wav")) for v, e in meta.items()]
    items += [(c["class"], os.path.join(bench, PRETRAIN_DIR, c["file"])) for c in clips]
    return [(sound, sf.read(path, dtype="float32")[0]) for sound, path in items]


def test_beep_pitch_is_in_the_wav(bench, meta):
    peaks = defaultdict(list)
    for sound, wave in _labelled_waves(bench, meta):
        peaks[sound].append(_peak_hz(wave, 16000))
    assert peaks["low_beep"] and peaks["high_beep"]
    assert max(peaks["low_beep"]) < min(peaks["high_beep"])
    assert max(peaks["hum"]) < min(peaks["high_beep"])


def _frame_stats(wave, sample_rate, frame_seconds=0.01):
    """Per 10 ms frame: energy and dominant frequency."""
    hop = int(sample_rate * frame_seconds)
    frames = wave[: len(wave) // hop * hop].reshape(-1, hop)
    spectra = np.abs(np.fft.rfft(frames * np.hanning(hop), axis=1))
    return (frames ** 2).sum(axis=1), spectra.argmax(axis=1) * sample_rate / hop


def _loud_runs(loud):
    """(first, last) frame of every run of loud frames."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], loud.astype(int), [0]])))
    return list(zip(edges[::2], edges[1::2] - 1))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rhythm_and_sweep_direction_are_in_the_audio(seed):
    cfg = SyntheticAVConfig(seconds=3.0)

    def stats(sound):
        return _frame_stats(synthesize_audio(sound, cfg, np.random.default_rng(seed)), cfg.sample_rate)

    def ticks(sound):  # clicks are rare, so the median frame is the noise floor
        energy, _ = stats(sound)
        return len(_loud_runs(energy > TICK_OVER_FLOOR * np.median(energy)))

    assert ticks("fast_ticks") > 2 * ticks("slow_ticks") > 0
    for sound, sign in (("rising_chirp", 1), ("falling_chirp", -1)):
        energy, dominant = stats(sound)
        sweeps = [(a, b) for a, b in _loud_runs(energy > SWEEP_LOUD * energy.max()) if b - a >= MIN_SWEEP]
        assert sweeps and all(sign * (dominant[b] - dominant[a]) > 0 for a, b in sweeps), sound


def test_every_sound_event_has_a_synthesizer():
    assert set(SYNTHESIZERS) == set(SOUND_BY_NAME)


def test_bad_flags_are_named():
    bad = {"--group_size": dict(group_size=99), "--size": dict(size=63),
           "--solo_sound_captions": dict(solo_sound_captions=3), "--twin_fraction": dict(twin_fraction=0.8),
           "--num_test_clips": dict(num_test_clips=5000)}
    for flag, fields in bad.items():
        with pytest.raises(ValueError, match=flag):
            validate_config(SyntheticAVConfig(**fields))


def test_validation_split_holds_out_whole_clips_in_the_test_mix(bench, meta, tmp_path):
    out = make_val_split(bench, num_val_clips=6, seed=0, out_dir=str(tmp_path))
    train_ids = set(pd.read_csv(out["train_csv"])["video_id"])
    val = pd.read_csv(out["val_csv"])
    val_clips = {meta[v]["clip_id"] for v in val["video_id"]}
    # no render of a held-out clip stays in training; everything else does
    for video_id, entry in meta.items():
        if entry["split"] == "train":
            assert (video_id in train_ids) == (entry["clip_id"] not in val_clips), video_id
        else:
            assert video_id not in train_ids and video_id not in set(val["video_id"])
    # twin groups leave whole: every clip of a held-out twin's group is held out
    held_groups = {meta[v]["group_id"] for v in val["video_id"] if meta[v]["category"] == "twin"}
    for entry in meta.values():
        if entry["split"] == "train" and entry["group_id"] in held_groups:
            assert entry["clip_id"] in val_clips
    # every caption of a held-out clip is a row, on the clip's first render, tagged with its kind
    tags = json.load(open(out["val_captions"]))["captions"]
    assert len(val) == len(tags) == CAPTIONS * len(val_clips)
    for (_, row), tag in zip(val.iterrows(), tags):
        assert meta[row["video_id"]]["render"] == 0
        assert {"caption": row["sentence"], "kind": tag["kind"], "mentions_sound": tag["mentions_sound"]} in \
            meta[row["video_id"]]["captions"]
    assert set(out["val_clips_per_category"]) == {"twin", "solo", "noise"}
    assert min(out["val_clips_per_category"].values()) >= 1
    # deterministic; another seed holds out other clips
    again = make_val_split(bench, num_val_clips=6, seed=0, out_dir=str(tmp_path / "again"))
    assert open(again["val_csv"]).read() == open(out["val_csv"]).read()
    other = make_val_split(bench, num_val_clips=6, seed=1, out_dir=str(tmp_path / "other"))
    assert open(other["val_csv"]).read() != open(out["val_csv"]).read()


def test_validation_split_refuses_impossible_sizes(bench, tmp_path):
    with pytest.raises(ValueError, match="--num_val_clips"):
        make_val_split(bench, num_val_clips=0, out_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="metadata.json"):
        make_val_split(str(tmp_path), num_val_clips=2)
