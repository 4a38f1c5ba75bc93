"""Small generated data in each dataset's on-disk format, for tests and benchmarks.

Every writer is deterministic. Videos are H.264 mp4 files written with PyAV; with
``pattern="index"`` every frame is one flat color that encodes its frame index, so a test
can tell which frames a reader returned (``frame_index_of``). ``pattern="texture"`` draws
moving detail, closer to real footage for decode benchmarks.

Dataset builders return a dict of paths whose keys match ``dataloaders.registry.DataConfig``
fields (``data_path``, ``features_path``, ``audio_path``) plus the annotation files and the
``video_ids`` written, e.g.::

    paths = make_msrvtt(tmp_path, n_videos=6, captions_per_video=3)
    cfg = DataConfig(datatype="msrvtt", data_path=paths["data_path"],
                     features_path=paths["features_path"], audio_path=paths["audio_path"])
"""
from __future__ import annotations

import csv
import json
import os
from typing import Dict, List, Sequence, Tuple

import av
import numpy as np
import soundfile as sf

DEFAULT_SIZE = (64, 48)  # (width, height); H.264 4:2:0 needs even sides
INDEX_LEVELS = 16  # per-channel levels of the frame-index color code
INDEX_STEP = 256 // INDEX_LEVELS
INDEX_BLUE = 128
AUDIO_SAMPLE_RATE = 16000
TONE_HZ = 440.0
TONE_AMPLITUDE = 0.3
BAD_VIDEO_BYTES = b"this is not a video container" * 8
MP4_BOX_HEADER = 8  # 4-byte size + 4-byte type
TRUNCATED_SAMPLE_BYTES = 16  # less than one frame


def index_color(index: int) -> Tuple[int, int, int]:
    """RGB color of frame ``index`` in the "index" pattern (unique for index < 256)."""
    red = (index % INDEX_LEVELS) * INDEX_STEP + INDEX_STEP // 2
    green = (index // INDEX_LEVELS % INDEX_LEVELS) * INDEX_STEP + INDEX_STEP // 2
    return red, green, INDEX_BLUE


def frame_index_of(frame_rgb: np.ndarray) -> int:
    """Recover the index written by the "index" pattern from a decoded uint8 [H, W, 3] frame."""
    red, green = frame_rgb[..., 0].mean(), frame_rgb[..., 1].mean()
    return int(round((red - INDEX_STEP // 2) / INDEX_STEP)) + INDEX_LEVELS * int(
        round((green - INDEX_STEP // 2) / INDEX_STEP))


def _texture_frame(index: int, width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    phase = index * 0.2
    base = 127 + 60 * np.sin(x / 7.0 + phase) * np.cos(y / 5.0 - phase)
    rgb = np.stack([base, np.roll(base, index, axis=1), 255 - base], axis=-1)
    rgb += rng.normal(0, 12, size=rgb.shape)
    return np.clip(rgb, 0, 255).astype(np.uint8)


def write_video(path: str, seconds: float, fps: float = 10, size: Tuple[int, int] = DEFAULT_SIZE,
                pattern: str = "index", codec: str = "libx264", seed: int = 0,
                faststart: bool = False) -> int:
    """Write an mp4 of ``round(seconds * fps)`` frames; returns the number of frames.

    Args:
        path: output file (container chosen from the extension).
        seconds: duration.
        fps: frames per second.
        size: (width, height), even numbers.
        pattern: "index" (flat color per frame, see ``index_color``) or "texture".
        codec: FFmpeg encoder name.
        seed: noise seed of the "texture" pattern.
        faststart: put the mp4 index before the sample data (as web-ready files do).
    """
    width, height = size
    num_frames = int(round(seconds * fps))
    rng = np.random.default_rng(seed)
    options = {"movflags": "faststart"} if faststart else {}
    with av.open(path, mode="w", options=options) as container:
        stream = container.add_stream(codec, rate=int(fps) if float(fps).is_integer() else fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for index in range(num_frames):
            if pattern == "index":
                rgb = np.empty((height, width, 3), dtype=np.uint8)
                rgb[:] = index_color(index)
            elif pattern == "texture":
                rgb = _texture_frame(index, width, height, rng)
            else:
                raise ValueError(f"unknown pattern {pattern!r}; use 'index' or 'texture'")
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return num_frames


def write_wav(path: str, seconds: float, sample_rate: int = AUDIO_SAMPLE_RATE) -> None:
    """Write a mono 16-bit tone of ``seconds``."""
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    sf.write(path, (TONE_AMPLITUDE * np.sin(2 * np.pi * TONE_HZ * t)).astype(np.float32),
             sample_rate, subtype="PCM_16")


def _mdat_offset(data: bytes) -> int:
    """Byte offset of the top-level ``mdat`` box of an mp4 (its sample data)."""
    offset = 0
    while offset + MP4_BOX_HEADER <= len(data):
        size = int.from_bytes(data[offset:offset + 4], "big")
        if data[offset + 4:offset + MP4_BOX_HEADER] == b"mdat":
            return offset
        if size < MP4_BOX_HEADER:
            break
        offset += size
    raise ValueError("no mdat box found")


def write_bad_video(path: str, kind: str = "garbage") -> None:
    """Write an unreadable video file.

    Args:
        path: output file.
        kind: "garbage" (bytes that are no container), "empty" (zero bytes), "no_frames"
            (a valid mp4 header with a video stream and zero frames) or "truncated" (an
            mp4 whose index promises frames but whose sample data is cut off).
    """
    if kind in ("garbage", "empty"):
        with open(path, "wb") as f:
            f.write(BAD_VIDEO_BYTES if kind == "garbage" else b"")
    elif kind == "no_frames":
        with av.open(path, mode="w") as container:
            stream = container.add_stream("libx264", rate=10)
            stream.width, stream.height, stream.pix_fmt = DEFAULT_SIZE[0], DEFAULT_SIZE[1], "yuv420p"
            container.start_encoding()
    elif kind == "truncated":
        write_video(path, seconds=2.0, fps=5, pattern="texture", faststart=True)
        with open(path, "rb") as f:
            data = f.read()
        with open(path, "wb") as f:
            f.write(data[:_mdat_offset(data) + MP4_BOX_HEADER + TRUNCATED_SAMPLE_BYTES])
    else:
        raise ValueError(f"unknown kind {kind!r}; use 'garbage', 'empty', 'no_frames' or 'truncated'")


def _write_media(root: str, video_ids: Sequence[str], with_audio: bool, seconds: float,
                 fps: float, size: Tuple[int, int]) -> Dict[str, str]:
    features_path = os.path.join(root, "videos")
    audio_path = os.path.join(root, "audio")
    os.makedirs(features_path, exist_ok=True)
    os.makedirs(audio_path, exist_ok=True)
    for number, video_id in enumerate(video_ids):
        # Lengths vary so some clips are shorter than others (masked frames in tests).
        duration = seconds * (1.0 + 0.5 * (number % 2))
        write_video(os.path.join(features_path, f"{video_id}.mp4"), duration, fps, size)
        if with_audio:
            write_wav(os.path.join(audio_path, f"{video_id}.wav"), duration)
    return {"features_path": features_path, "audio_path": audio_path}


def _captions(video_id: str, count: int) -> List[str]:
    return [f"a video {video_id} caption {k}" for k in range(count)]


def _write_csv(path: str, header: Sequence[str], rows: Sequence[Sequence]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def make_msrvtt(root: str, n_videos: int = 6, captions_per_video: int = 3, n_test: int = 2,
                with_audio: bool = True, seconds: float = 2.0, fps: float = 5,
                size: Tuple[int, int] = DEFAULT_SIZE) -> Dict:
    """MSR-VTT layout: MSRVTT_data.json, MSRVTT_train.9k.csv, MSRVTT_JSFUSION_test.csv.

    The last ``n_test`` videos form the test CSV (their first caption each); the others
    are the train CSV. Returns paths plus ``video_ids``, ``train_ids``, ``test_ids``.
    """
    root = str(root)
    video_ids = [f"video{k}" for k in range(n_videos)]
    train_ids, test_ids = video_ids[:n_videos - n_test], video_ids[n_videos - n_test:]
    data_path = os.path.join(root, "msrvtt")
    os.makedirs(data_path, exist_ok=True)
    sentences = [{"video_id": v, "caption": c, "sen_id": len(video_ids) * k + i}
                 for i, v in enumerate(video_ids) for k, c in enumerate(_captions(v, captions_per_video))]
    data_json = os.path.join(data_path, "MSRVTT_data.json")
    with open(data_json, "w") as f:
        json.dump({"videos": [{"video_id": v} for v in video_ids], "sentences": sentences}, f)
    train_csv = os.path.join(data_path, "MSRVTT_train.9k.csv")
    _write_csv(train_csv, ["video_id"], [[v] for v in train_ids])
    test_csv = os.path.join(data_path, "MSRVTT_JSFUSION_test.csv")
    _write_csv(test_csv, ["key", "vid_key", "video_id", "sentence"],
               [[f"ret{i}", f"msr{i}", v, _captions(v, 1)[0]] for i, v in enumerate(test_ids)])
    paths = _write_media(root, video_ids, with_audio, seconds, fps, size)
    return {"data_path": data_path, "data_json": data_json, "train_csv": train_csv,
            "test_csv": test_csv, "video_ids": video_ids, "train_ids": train_ids,
            "test_ids": test_ids, **paths}


def make_vatex(root: str, n_videos: int = 6, captions_per_video: int = 3, n_test: int = 2,
               with_audio: bool = True, seconds: float = 2.0, fps: float = 5,
               size: Tuple[int, int] = DEFAULT_SIZE) -> Dict:
    """VATEX layout: train_list.txt, test_list.txt, ref_captions.json (id -> captions)."""
    root = str(root)
    video_ids = [f"vatex_{k:03d}" for k in range(n_videos)]
    train_ids, test_ids = video_ids[:n_videos - n_test], video_ids[n_videos - n_test:]
    data_path = os.path.join(root, "vatex")
    os.makedirs(data_path, exist_ok=True)
    lists = {}
    for name, ids in (("train_list", train_ids), ("test_list", test_ids)):
        lists[name] = os.path.join(data_path, f"{name}.txt")
        with open(lists[name], "w") as f:
            f.write("".join(f"{v}\n" for v in ids))
    captions_json = os.path.join(data_path, "ref_captions.json")
    with open(captions_json, "w") as f:
        json.dump({v: _captions(v, captions_per_video) for v in video_ids}, f)
    paths = _write_media(root, video_ids, with_audio, seconds, fps, size)
    return {"data_path": data_path, "train_list": lists["train_list"],
            "test_list": lists["test_list"], "captions_json": captions_json,
            "video_ids": video_ids, "train_ids": train_ids, "test_ids": test_ids, **paths}


def make_charades(root: str, n_videos: int = 6, n_test: int = 2, with_audio: bool = True,
                  seconds: float = 2.0, fps: float = 5, size: Tuple[int, int] = DEFAULT_SIZE) -> Dict:
    """Charades layout: charades_train.csv, charades_test.csv (video_id, sentence), one caption each."""
    root = str(root)
    video_ids = [f"CH{k:03d}" for k in range(n_videos)]
    train_ids, test_ids = video_ids[:n_videos - n_test], video_ids[n_videos - n_test:]
    data_path = os.path.join(root, "charades")
    os.makedirs(data_path, exist_ok=True)
    files = {}
    for name, ids in (("train_csv", train_ids), ("test_csv", test_ids)):
        files[name] = os.path.join(data_path, f"charades_{name.split('_')[0]}.csv")
        _write_csv(files[name], ["video_id", "sentence"], [[v, _captions(v, 1)[0]] for v in ids])
    paths = _write_media(root, video_ids, with_audio, seconds, fps, size)
    return {"data_path": data_path, **files, "video_ids": video_ids, "train_ids": train_ids,
            "test_ids": test_ids, **paths}
