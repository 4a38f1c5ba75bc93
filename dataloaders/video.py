"""Video frame reading: sampling plan, decoding, CLIP image transform (docs/design.md §1 Frames).

A clip is read in three steps that can be tested on their own:

1. ``sample_frame_indices``: which frames to take. Frames are taken at ``framerate`` per
   second of the clip; when that gives more than ``max_frames``, ``slice_framepos``
   picks the head (0), the tail (1) or a uniform spread over the whole clip (2).
2. A decoder (``"opencv"`` or ``"pyav"``) returns those frames as RGB uint8 arrays.
3. ``resize_center_crop``: resize the shorter side to ``image_size`` (bicubic,
   antialiased as PIL does, rounded back to uint8), center crop.

``read_frames(path, cfg)`` runs the three steps and zero-pads to ``max_frames``; its
frames stay uint8, so DataLoader workers ship a quarter of the bytes of float frames.
``normalize_frames`` (scale to [0, 1], CLIP mean/std) runs on the training device, on the
whole batch. The uint8 frames are exactly what the float path used to normalize: the
bicubic resize already rounded to uint8 (torchvision rounds an integer image after
interpolating in float), so moving the normalization changes no value.
Shapes: B batch, F = max_frames, S = image_size, H/W = decoded frame height/width,
K = frames actually read (K <= F).
"""
from __future__ import annotations

import functools
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


def resize_center_crop(frames: np.ndarray, image_size: int) -> torch.Tensor:
    """The geometric part of CLIP's preprocessing, kept in uint8.

    Args:
        frames: uint8 RGB [K, H, W, 3].
        image_size: S.

    Returns:
        uint8 RGB [K, 3, S, S]: shorter side resized to S (bicubic, antialiased; torchvision
        interpolates in float, clamps to [0, 255] and rounds to uint8), center crop S x S.
    """
    images = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)
    images = TF.resize(images, image_size, interpolation=InterpolationMode.BICUBIC, antialias=True)
    return TF.center_crop(images, [image_size, image_size]).contiguous()


@functools.lru_cache(maxsize=None)
def _clip_mean_std(device: torch.device, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """CLIP mean and std [3, 1, 1] on ``device``, made once: a tensor built from a Python list
    on CUDA is a blocking copy that would wait for the GPU at every batch."""
    return (torch.tensor(CLIP_MEAN, dtype=dtype, device=device).view(3, 1, 1),
            torch.tensor(CLIP_STD, dtype=dtype, device=device).view(3, 1, 1))


def normalize_frames(frames: torch.Tensor, frame_mask: torch.Tensor, device: torch.device,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 frames from the loader -> CLIP-normalized frames on ``device``.

    Moves the uint8 batch (``non_blocking``: asynchronous from pinned memory), then on the
    device scales to [0, 1] and normalizes with ``CLIP_MEAN`` / ``CLIP_STD``, the same
    operations in the same order as the former CPU path, so real frames get identical
    values. Padded frames are set to 0, the value they had before (CLIP never sees them).

    Args:
        frames: uint8 [B, F, 3, S, S] (or [F, 3, S, S]), RGB.
        frame_mask: bool [B, F] (or [F]), True at real frames.
        device: where the model runs.
        dtype: dtype of the result.

    Returns:
        ``dtype`` [B, F, 3, S, S] on ``device``.
    """
    if frames.dtype != torch.uint8:
        raise TypeError(f"frames must be the uint8 frames of dataloaders.video.read_frames, got "
                        f"{frames.dtype}; normalize_frames does the CLIP normalization itself")
    if tuple(frame_mask.shape) != tuple(frames.shape[:-3]):
        raise ValueError(f"frame_mask {tuple(frame_mask.shape)} does not match frames {tuple(frames.shape)}")
    images = frames.to(device, non_blocking=True).to(dtype) / PIXEL_MAX
    mean, std = _clip_mean_std(images.device, dtype)
    images.sub_(mean).div_(std)
    padded = ~frame_mask.to(images.device, non_blocking=True).bool()
    return images.masked_fill_(padded[..., None, None, None], 0.0)


def read_frames(path: str, cfg: FrameSamplingConfig) -> Tuple[torch.Tensor, torch.Tensor]:
    """Read, resize/crop and pad the frames of one video.

    Returns:
        frames uint8 RGB [F, 3, S, S] (zeros past the real frames; ``normalize_frames``
        turns a batch of them into CLIP input) and frame_mask bool [F].
    """
    decoded = decode_frames(path, lambda n, fps: sample_frame_indices(n, fps, cfg), cfg.decoder)
    images = resize_center_crop(decoded, cfg.image_size)
    count = images.shape[0]
    frames = torch.zeros(cfg.max_frames, 3, cfg.image_size, cfg.image_size, dtype=torch.uint8)
    frames[:count] = images
    frame_mask = torch.zeros(cfg.max_frames, dtype=torch.bool)
    frame_mask[:count] = True
    return frames, frame_mask
