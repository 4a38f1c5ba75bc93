"""Video frame reading: sampling plan, decoding, CLIP image transform (DESIGN §1 Frames).

A clip is read in three steps that can be tested on their own:

1. ``sample_frame_indices``: which frames to take. Frames are taken at ``framerate`` per
   second of the clip; when that gives more than ``max_frames``, ``slice_framepos``
   picks the head (0), the tail (1) or a uniform spread over the whole clip (2).
2. A decoder (``"opencv"`` or ``"pyav"``) returns those frames as RGB uint8 arrays.
3. ``clip_transform``: resize the shorter side to ``image_size`` (bicubic, antialiased
   as PIL does), center crop, scale to [0, 1], normalize with CLIP's mean and std.

``read_frames(path, cfg)`` runs the three steps and zero-pads to ``max_frames``.
Shapes: F = max_frames, S = image_size, H/W = decoded frame height/width, K = frames
actually read (K <= F).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, List, Tuple

import av
import cv2
import numpy as np
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PIXEL_MAX = 255.0

SLICE_HEAD, SLICE_TAIL, SLICE_UNIFORM = 0, 1, 2
DECODERS = ("opencv", "pyav")
# Fastest in bench/decode_bench.py (its docstring has the measured numbers).
DEFAULT_DECODER = "opencv"


class VideoReadError(RuntimeError):
    """A video file is missing, unreadable, or yields no frames. ``path`` names the file."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"cannot read video {path!r}: {reason}")
        self.path = path
        self.reason = reason


@dataclass
class FrameSamplingConfig:
    """How frames are taken from a clip and prepared for CLIP.

    Args:
        max_frames: F, frames per video (``--max_frames``); shorter clips are zero-padded.
        framerate: frames sampled per second of video (``--feature_framerate``).
        slice_framepos: when more than F frames are sampled, keep the head (0), the tail
            (1) or F spread uniformly over the whole clip (2) (``--slice_framepos``).
        image_size: S, side of the square CLIP input.
        decoder: ``"opencv"`` (sequential grab) or ``"pyav"``.
    """

    max_frames: int = 12
    framerate: float = 1.0
    slice_framepos: int = SLICE_UNIFORM
    image_size: int = 224
    decoder: str = DEFAULT_DECODER

    def __post_init__(self):
        if self.max_frames < 1:
            raise ValueError(f"max_frames must be >= 1, got {self.max_frames}")
        if self.framerate <= 0:
            raise ValueError(f"framerate must be > 0, got {self.framerate}")
        if self.slice_framepos not in (SLICE_HEAD, SLICE_TAIL, SLICE_UNIFORM):
            raise ValueError(f"slice_framepos must be 0 (head), 1 (tail) or 2 (uniform), "
                             f"got {self.slice_framepos}")
        if self.decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {DECODERS}, got {self.decoder!r}")


def sample_frame_indices(num_frames: int, native_fps: float, cfg: FrameSamplingConfig) -> np.ndarray:
    """Indices of the frames to read from a clip of ``num_frames`` frames at ``native_fps``.

    Candidates are the frames at times k / framerate (k = 0, 1, ...), i.e. every
    ``native_fps / framerate``-th frame (every frame when the video has fewer frames per
    second than asked). If more than ``max_frames`` candidates, ``slice_framepos`` picks
    among them; uniform picks ``linspace(0, n - 1, max_frames)`` truncated to integers.

    Returns:
        int64 [K], increasing, K = min(max_frames, number of candidates).
    """
    if num_frames <= 0:
        return np.zeros(0, dtype=np.int64)
    step = max(native_fps / cfg.framerate, 1.0)
    count = int(np.ceil(num_frames / step))
    candidates = np.minimum(np.floor(np.arange(count) * step), num_frames - 1).astype(np.int64)
    if count <= cfg.max_frames:
        return candidates
    if cfg.slice_framepos == SLICE_HEAD:
        return candidates[:cfg.max_frames]
    if cfg.slice_framepos == SLICE_TAIL:
        return candidates[-cfg.max_frames:]
    picks = np.linspace(0, count - 1, num=cfg.max_frames).astype(np.int64)
    return candidates[picks]


IndexPlan = Callable[[int, float], np.ndarray]


def _opencv_frame_count(path: str) -> int:
    """Frames counted by grabbing every one (for containers that do not store a count)."""
    cap = cv2.VideoCapture(path, cv2.CAP_FFMPEG)
    count = 0
    while cap.grab():
        count += 1
    cap.release()
    return count


def _opencv_seeking(cap: cv2.VideoCapture, wanted: np.ndarray) -> List[np.ndarray]:
    """BGR frames at ``wanted``, setting the position before each (stops at the first failure)."""
    frames = []
    for index in wanted:
        cap.set(cv2.CAP_PROP_POS_FRAMES, int(index))
        ok, frame = cap.read()
        if not ok:
            break
        frames.append(frame)
    return frames


def _opencv_sequential(cap: cv2.VideoCapture, wanted: np.ndarray) -> List[np.ndarray]:
    """BGR frames at ``wanted``, grabbing every frame and converting only the wanted ones."""
    wanted_set = set(int(i) for i in wanted)
    frames = []
    for index in range(int(wanted.max()) + 1 if len(wanted) else 0):
        if not cap.grab():
            break
        if index in wanted_set:
            ok, frame = cap.retrieve()
            if ok:
                frames.append(frame)
    return frames


def decode_opencv(path: str, plan: IndexPlan, seek: bool = False) -> np.ndarray:
    """Decode the frames ``plan(num_frames, fps)`` asks for with OpenCV's FFmpeg backend.

    Args:
        path: video file.
        plan: maps (number of frames, frames per second) to increasing frame indices.
        seek: set the position before each wanted frame instead of grabbing every frame
            up to the last wanted one (slower on H.264 clips, see bench/decode_bench.py).

    Returns:
        uint8 RGB [K, H, W, 3]; indices past the real end of a clip are dropped.
    """
    cap = cv2.VideoCapture(path, cv2.CAP_FFMPEG)
    if not cap.isOpened():
        raise VideoReadError(path, "OpenCV cannot open it (corrupt or unsupported container)")
    try:
        fps = cap.get(cv2.CAP_PROP_FPS)
        num_frames = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
        if num_frames <= 0:
            num_frames = _opencv_frame_count(path)
        if fps <= 0 or num_frames <= 0:
            raise VideoReadError(path, f"no frames (fps={fps}, frame count={num_frames})")
        wanted = np.asarray(plan(num_frames, fps))
        frames = _opencv_seeking(cap, wanted) if seek else _opencv_sequential(cap, wanted)
    finally:
        cap.release()
    if not frames:
        raise VideoReadError(path, "no frame could be decoded")
    return np.stack([cv2.cvtColor(f, cv2.COLOR_BGR2RGB) for f in frames])


def _pyav_frame_count(path: str) -> int:
    """Frames counted from the demuxed packets (for containers that do not store a count)."""
    with av.open(path) as container:
        return sum(1 for packet in container.demux(video=0) if packet.size)


def decode_pyav(path: str, plan: IndexPlan) -> np.ndarray:
    """Decode the frames ``plan(num_frames, fps)`` asks for with PyAV (sequential decode).

    Args:
        path: video file.
        plan: maps (number of frames, frames per second) to increasing frame indices.

    Returns:
        uint8 RGB [K, H, W, 3]; indices past the real end of a clip, or past the point
        where a damaged file stops decoding, are dropped (as OpenCV does).
    """
    try:
        container = av.open(path)
    except (av.FFmpegError, OSError) as err:
        raise VideoReadError(path, f"PyAV cannot open it ({err})") from err
    frames = []
    try:
        if not container.streams.video:
            raise VideoReadError(path, "it has no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        rate = stream.average_rate or stream.guessed_rate
        fps = float(rate) if rate else 0.0
        num_frames = stream.frames or _pyav_frame_count(path)
        if fps <= 0 or num_frames <= 0:
            raise VideoReadError(path, f"no frames (fps={fps}, frame count={num_frames})")
        wanted = plan(num_frames, fps)
        wanted_set = set(int(i) for i in wanted)
        last = int(wanted[-1]) if len(wanted) else -1
        for index, frame in enumerate(container.decode(stream)):
            if index in wanted_set:
                frames.append(frame.to_ndarray(format="rgb24"))
            if index >= last:
                break
    except av.FFmpegError:
        pass  # damaged data: keep the frames decoded before it; none at all is an error below
    finally:
        container.close()
    if not frames:
        raise VideoReadError(path, "no frame could be decoded")
    return np.stack(frames)


def decode_frames(path: str, plan: IndexPlan, decoder: str) -> np.ndarray:
    """Dispatch to the named decoder; uint8 RGB [K, H, W, 3]."""
    if not os.path.isfile(path):
        raise VideoReadError(path, "file not found")
    if decoder == "opencv":
        return decode_opencv(path, plan)
    if decoder == "pyav":
        return decode_pyav(path, plan)
    raise ValueError(f"unknown decoder {decoder!r}; choose one of {DECODERS}")


def clip_transform(frames: np.ndarray, image_size: int) -> torch.Tensor:
    """CLIP preprocessing of decoded frames.

    Args:
        frames: uint8 RGB [K, H, W, 3].
        image_size: S.

    Returns:
        float32 [K, 3, S, S], normalized with ``CLIP_MEAN`` / ``CLIP_STD``.
    """
    images = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)
    images = TF.resize(images, image_size, interpolation=InterpolationMode.BICUBIC, antialias=True)
    images = TF.center_crop(images, [image_size, image_size])
    images = images.float() / PIXEL_MAX
    return TF.normalize(images, CLIP_MEAN, CLIP_STD)


def read_frames(path: str, cfg: FrameSamplingConfig) -> Tuple[torch.Tensor, torch.Tensor]:
    """Read, transform and pad the frames of one video.

    Returns:
        frames float32 [F, 3, S, S] (zeros past the real frames) and frame_mask bool [F].
    """
    decoded = decode_frames(path, lambda n, fps: sample_frame_indices(n, fps, cfg), cfg.decoder)
    images = clip_transform(decoded, cfg.image_size)
    count = images.shape[0]
    frames = torch.zeros(cfg.max_frames, 3, cfg.image_size, cfg.image_size)
    frames[:count] = images
    frame_mask = torch.zeros(cfg.max_frames, dtype=torch.bool)
    frame_mask[:count] = True
    return frames, frame_mask
