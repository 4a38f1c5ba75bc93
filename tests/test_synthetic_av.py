"""Synthetic audio-visual benchmark: file formats, media, reproducibility, content design."""
import filecmp
import json
import os
import re
from collections import defaultdict

import av
import numpy as np
import pandas as pd
import pytest
import soundfile as sf

from synthetic.make_synthetic_av import (AUDIO_DIR, PRETRAIN_DIR, PRETRAIN_LABELS, VIDEO_DIR,
                                         SyntheticAVConfig, generate, main, synthesize_audio,
                                         validate_config)
from synthetic.vocab import SOUND_BY_NAME, SOUND_EVENTS, SOUND_WORDS, SYNTHESIZERS

SMALL = dict(num_train_clips=24, num_test_clips=12, train_renders=2, audio_pretrain_clips=10,
             size=48, seconds=3.0, fps=5, seed=3)
CLI_ARGS = [f"--{k}={v}" for k, v in SMALL.items()]
# frames brighter than this belong to the shape (backgrounds stay below ~90 on every channel)
SHAPE_THRESHOLD = 120
TICK_OVER_FLOOR = 3.0  # a 10 ms frame with a click holds this many times the floor's energy
SWEEP_LOUD, MIN_SWEEP = 0.1, 20  # sweep frames: energy share of the loudest; frames per sweep


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """A small benchmark written through the CLI with two workers; returns its folder."""
    out = str(tmp_path_factory.mktemp("synthetic") / "a")
    main(["--out_dir", out, "--workers", "2"] + CLI_ARGS)
    return out


@pytest.fixture(scope="module")
def meta(bench):
    with open(os.path.join(bench, "metadata.json")) as handle:
        return json.load(handle)["videos"]


def _decode(path):
    with av.open(path) as container:
        stream = container.streams.video[0]
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
        return frames, stream.average_rate, container.duration / av.time_base


def _all_files(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


def test_caption_files_have_msrvtt_formats(bench, meta):
    train = pd.read_csv(os.path.join(bench, "MSRVTT_train.9k.csv"))
    test = pd.read_csv(os.path.join(bench, "MSRVTT_JSFUSION_test.csv"))
    with open(os.path.join(bench, "MSRVTT_data.json")) as handle:
        data = json.load(handle)
    assert list(train.columns) == ["video_id"]
    assert list(test.columns) == ["key", "vid_key", "video_id", "sentence"]
    assert len(train) == SMALL["num_train_clips"] * SMALL["train_renders"]
    assert len(test) == SMALL["num_test_clips"] and test["video_id"].is_unique
    captions = defaultdict(list)
    for entry in data["sentences"]:
        captions[entry["video_id"]].append(entry["caption"])
    expected = SyntheticAVConfig().captions_per_clip
    assert set(captions) == set(train["video_id"]) | set(test["video_id"]) == set(meta)
    assert all(len(c) == expected for c in captions.values())
    for row in test.itertuples():
        assert row.sentence in captions[row.video_id]
    for video_id in train["video_id"]:
        assert meta[video_id]["split"] == "train"
        assert os.path.isfile(os.path.join(bench, VIDEO_DIR, video_id + ".mp4"))
        assert os.path.isfile(os.path.join(bench, AUDIO_DIR, video_id + ".wav"))


def test_metadata_and_pretrain_labels(bench, meta):
    keys = {"clip_id", "split", "render", "shape", "colour", "motion", "sound", "informative_audio",
            "group_id"}
    assert all(set(entry) == keys for entry in meta.values())
    assert all(entry["informative_audio"] == SOUND_BY_NAME[entry["sound"]].informative
               for entry in meta.values())
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


def test_captions_mention_sound_exactly_when_informative(bench, meta):
    with open(os.path.join(bench, "MSRVTT_data.json")) as handle:
        sentences = json.load(handle)["sentences"]
    for entry in sentences:
        clip = meta[entry["video_id"]]
        caption = entry["caption"]
        words = set(re.findall(r"[a-z]+", caption))
        assert clip["shape"] in words and clip["colour"] in words
        if clip["informative_audio"]:
            assert any(phrase in caption for phrase in SOUND_BY_NAME[clip["sound"]].phrases)
            others = [p for e in SOUND_EVENTS if e.name != clip["sound"] for p in e.phrases]
            assert not any(phrase in caption for phrase in others)
        else:
            assert not words & set(SOUND_WORDS), caption


def test_groups_share_visuals_and_differ_in_sound(meta):
    for split in ("train", "test"):
        groups = defaultdict(set)
        visuals_of_group = defaultdict(set)
        for entry in meta.values():
            if entry["split"] == split:
                groups[entry["group_id"]].add((entry["clip_id"], entry["sound"]))
                visuals_of_group[entry["group_id"]].add((entry["shape"], entry["colour"], entry["motion"]))
        shared = [g for g, clips in groups.items() if len(clips) >= 2]
        assert shared, f"no shared-visual group in {split}"
        for group in shared:
            sounds = [sound for _, sound in groups[group]]
            assert len(visuals_of_group[group]) == 1 and len(set(sounds)) == len(sounds)
            assert all(SOUND_BY_NAME[s].informative for s in sounds)
        if split == "test":  # few enough groups for every test group to have its own visuals
            combos = [next(iter(v)) for v in visuals_of_group.values()]
            assert len(set(combos)) == len(combos)


def test_informative_fraction_is_about_half(meta):
    for split in ("train", "test"):
        flags = [e["informative_audio"] for e in meta.values() if e["split"] == split]
        assert abs(np.mean(flags) - 0.5) <= 0.1


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
    """Centroid x, y and area of the bright shape pixels per frame."""
    track = []
    for frame in frames:
        ys, xs = np.nonzero(frame.max(axis=-1) > SHAPE_THRESHOLD)
        track.append((xs.mean(), ys.mean(), len(xs)))
    return np.array(track)


def test_motion_follows_its_label(bench, meta):
    component = {"left": (0, -1), "right": (0, 1), "up": (1, -1), "down": (1, 1),
                 "grows": (2, 1), "shrinks": (2, -1)}
    for video_id, entry in meta.items():
        track = _shape_track(_decode(os.path.join(bench, VIDEO_DIR, video_id + ".mp4"))[0])
        axis, sign = component[entry["motion"]]
        assert sign * (track[-1, axis] - track[0, axis]) > 0, video_id


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
    with pytest.raises(ValueError, match="--group_size"):
        validate_config(SyntheticAVConfig(group_size=99))
    with pytest.raises(ValueError, match="--size"):
        validate_config(SyntheticAVConfig(size=63))
