"""Frame reading: sampling plan, CLIP transform, padding, decoder agreement, bad files."""
import numpy as np
import pytest
import torch

from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from dataloaders.video import (CLIP_MEAN, CLIP_STD, DECODERS, FrameSamplingConfig, VideoReadError,
                               decode_frames, decode_opencv, normalize_frames, read_frames,
                               resize_center_crop, sample_frame_indices)
from modules.clip import CLIP, CLIPConfig
from tests.datagen import frame_index_of, index_color, write_bad_video, write_video

SIZE = 32
CPU = torch.device("cpu")
# One uint8 level after normalization, at the channel with the smallest std.
PIXEL_STEP = 1.0 / 255.0 / min(CLIP_STD)


def _cfg(**kwargs) -> FrameSamplingConfig:
    return FrameSamplingConfig(**{"image_size": SIZE, **kwargs})


# 95 frames at 10 fps sampled at 1 fps: candidates 0, 10, ..., 90 (10 of them).
@pytest.mark.parametrize("slice_framepos, expected", [
    (0, [0, 10, 20, 30]),
    (1, [60, 70, 80, 90]),
    (2, [0, 30, 60, 90]),  # linspace(0, 9, 4) = 0, 3, 6, 9
])
def test_slice_framepos_head_tail_uniform(slice_framepos, expected):
    cfg = _cfg(max_frames=4, slice_framepos=slice_framepos)
    assert sample_frame_indices(95, 10.0, cfg).tolist() == expected


def test_uniform_truncates_linspace():
    # 12 candidates (1 fps video at 1 fps), 5 picks: linspace(0, 11, 5) = 0, 2.75, 5.5, 8.25, 11.
    assert sample_frame_indices(12, 1.0, _cfg(max_frames=5)).tolist() == [0, 2, 5, 8, 11]


def test_sampling_rates_and_short_clips():
    assert sample_frame_indices(25, 10.0, _cfg(max_frames=12)).tolist() == [0, 10, 20]
    # Fewer frames per second than asked: every frame once, no duplicates.
    assert sample_frame_indices(5, 2.0, _cfg(framerate=4.0)).tolist() == [0, 1, 2, 3, 4]
    # Non-integer rate: floor(k * 29.97).
    assert sample_frame_indices(60, 29.97, _cfg()).tolist() == [0, 29, 59]
    assert sample_frame_indices(30, 10.0, _cfg(framerate=4.0)).tolist() == [
        0, 2, 5, 7, 10, 12, 15, 17, 20, 22, 25, 27]
    assert sample_frame_indices(0, 10.0, _cfg()).tolist() == []


def test_config_rejects_bad_values():
    for bad in ({"slice_framepos": 3}, {"decoder": "ffmpeg"}, {"max_frames": 0}, {"framerate": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            _cfg(**bad)


def _normalized(frames: np.ndarray) -> torch.Tensor:
    """resize_center_crop + normalize_frames of frames uint8 [K, H, W, 3] (all real) -> [K, 3, S, S]."""
    images = resize_center_crop(frames, SIZE)
    return normalize_frames(images, torch.ones(images.shape[0], dtype=torch.bool), CPU)


def _former_float_path(frames: np.ndarray) -> torch.Tensor:
    """The CPU transform the workers ran before frames became uint8 (resize, crop, /255, normalize)."""
    images = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)
    images = TF.resize(images, SIZE, interpolation=InterpolationMode.BICUBIC, antialias=True)
    images = TF.center_crop(images, [SIZE, SIZE]).float() / 255.0
    return TF.normalize(images, CLIP_MEAN, CLIP_STD)


def _float_resize_path(frames: np.ndarray) -> torch.Tensor:
    """A pipeline that never rounds after the resize (bicubic in float, clamped to [0, 255])."""
    images = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()
    images = TF.resize(images, SIZE, interpolation=InterpolationMode.BICUBIC, antialias=True)
    images = TF.center_crop(images, [SIZE, SIZE]).clamp(0, 255) / 255.0
    return TF.normalize(images, CLIP_MEAN, CLIP_STD)


def test_transform_constant_frame_is_normalized_exactly():
    color = np.array([200, 100, 50], dtype=np.uint8)
    frames = np.broadcast_to(color, (2, 48, 64, 3))
    images = resize_center_crop(frames, SIZE)
    assert images.shape == (2, 3, SIZE, SIZE) and images.dtype == torch.uint8
    assert torch.equal(images, torch.from_numpy(color)[None, :, None, None].expand_as(images))
    out = _normalized(frames)
    assert out.shape == (2, 3, SIZE, SIZE) and out.dtype == torch.float32
    expected = (torch.tensor(color / 255.0) - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    torch.testing.assert_close(out, expected.float()[None, :, None, None].expand_as(out), atol=1e-5, rtol=0)


def test_transform_resizes_shorter_side_then_center_crops():
    # 40 x 80 frame, left half black, right half white -> 32 x 64 -> center crop columns 16..47:
    # left 16 columns black, right 16 white (a squash to 32 x 32 would keep the split but
    # a crop of the wrong region would not).
    frame = np.zeros((1, 40, 80, 3), dtype=np.uint8)
    frame[:, :, 40:] = 255
    out = resize_center_crop(frame, SIZE)[0, 0]
    assert (out[:, :14] == 0).all() and (out[:, 18:] == 255).all()
    # Portrait frames crop rows the same way.
    assert resize_center_crop(np.zeros((1, 80, 40, 3), dtype=np.uint8), SIZE).shape == (1, 3, SIZE, SIZE)


def test_normalized_uint8_frames_equal_the_former_float_path(tmp_path):
    """Shipping uint8 changes no value: the former path's bicubic resize already rounded to
    uint8 (torchvision rounds integer images), so real frames match it exactly, and their CLIP
    embeddings with them. Against a pipeline that never rounds, the difference is the
    rounding of the resized pixel: at most half a level."""
    path = str(tmp_path / "texture.mp4")
    write_video(path, seconds=4.0, fps=5, size=(80, 48), pattern="texture")
    cfg = _cfg(max_frames=4, decoder="opencv")
    decoded = decode_frames(path, lambda n, fps: sample_frame_indices(n, fps, cfg), cfg.decoder)
    frames, mask = read_frames(path, cfg)
    new = normalize_frames(frames, mask, CPU)
    assert mask.all() and torch.equal(new, _former_float_path(decoded))
    unrounded = (new - _float_resize_path(decoded)).abs().max().item()
    assert 0 < unrounded <= 0.5 * PIXEL_STEP + 1e-6
    torch.manual_seed(0)
    clip = CLIP(CLIPConfig.tiny()).eval()
    with torch.no_grad():
        assert torch.equal(clip.encode_image(new), clip.encode_image(_former_float_path(decoded)))


def test_normalize_frames_batch_padding_and_errors():
    frames = torch.randint(0, 256, (2, 3, 3, SIZE, SIZE), dtype=torch.uint8)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    frames[~mask] = 0  # as read_frames pads
    before = frames.clone()
    out = normalize_frames(frames, mask, CPU, dtype=torch.float64)
    assert out.shape == frames.shape and out.dtype == torch.float64
    assert (out[~mask] == 0).all()  # the value padded frames had before (CLIP never sees them)
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float64)[:, None, None]
    std = torch.tensor(CLIP_STD, dtype=torch.float64)[:, None, None]
    torch.testing.assert_close(out[mask], (frames[mask].double() / 255 - mean) / std, rtol=0, atol=1e-12)
    assert torch.equal(frames, before)  # the loader's batch is not modified in place
    with pytest.raises(TypeError, match="uint8"):
        normalize_frames(out, mask, CPU)
    with pytest.raises(ValueError, match="frame_mask"):
        normalize_frames(frames, mask[:, :2], CPU)


@pytest.fixture(scope="module")
def index_clip(tmp_path_factory):
    """3 s at 10 fps, frame k drawn in index_color(k)."""
    path = str(tmp_path_factory.mktemp("video") / "index.mp4")
    write_video(path, seconds=3.0, fps=10)
    return path


@pytest.mark.parametrize("decoder", DECODERS)
def test_decoders_return_the_planned_frames(index_clip, decoder):
    cfg = _cfg(framerate=4.0)
    frames = decode_frames(index_clip, lambda n, fps: sample_frame_indices(n, fps, cfg), decoder)
    assert frames.dtype == np.uint8 and frames.shape == (12, 48, 64, 3)
    assert [frame_index_of(f) for f in frames] == [0, 2, 5, 7, 10, 12, 15, 17, 20, 22, 25, 27]
    assert np.abs(frames[3].astype(int) - np.array(index_color(7))).max() <= 4  # RGB order, not BGR


def test_opencv_seek_matches_sequential_grab(index_clip):
    def plan(n, fps):
        return np.array([1, 8, 29])
    assert [frame_index_of(f) for f in decode_opencv(index_clip, plan, seek=True)] == [1, 8, 29]
    np.testing.assert_array_equal(decode_opencv(index_clip, plan, seek=True), decode_opencv(index_clip, plan))


def test_decoders_agree_on_textured_clip(tmp_path):
    path = str(tmp_path / "texture.mp4")
    write_video(path, seconds=2.0, fps=8, pattern="texture")
    a, b = (read_frames(path, _cfg(decoder=d, framerate=2.0)) for d in DECODERS)
    assert torch.equal(a[1], b[1]) and a[1].sum() == 4
    # Same decoded YUV; only the YUV->RGB conversion may differ by a level or two.
    levels = (a[0].int() - b[0].int()).abs()
    assert levels.max() <= 3 and levels.float().mean() <= 0.5


@pytest.mark.parametrize("decoder", DECODERS)
def test_webm_without_stored_frame_count(tmp_path, decoder):
    path = str(tmp_path / "clip.webm")
    write_video(path, seconds=3.0, fps=10, codec="libvpx-vp9")
    cfg = _cfg(max_frames=3, framerate=1.0)
    frames = decode_frames(path, lambda n, fps: sample_frame_indices(n, fps, cfg), decoder)
    assert [frame_index_of(f) for f in frames] == [0, 10, 20]


@pytest.mark.parametrize("decoder", DECODERS)
def test_short_video_is_zero_padded_and_masked(index_clip, decoder):
    frames, mask = read_frames(index_clip, _cfg(max_frames=5, decoder=decoder))  # 3 s at 1 fps
    assert frames.shape == (5, 3, SIZE, SIZE) and frames.dtype == torch.uint8 and mask.dtype == torch.bool
    assert mask.tolist() == [True, True, True, False, False]
    assert (frames[3:] == 0).all() and (frames[:3] > 0).any()


@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize("kind", ["missing", "garbage", "empty", "no_frames", "truncated"])
def test_bad_video_raises_naming_the_file(tmp_path, kind, decoder):
    path = str(tmp_path / f"bad_{kind}.mp4")
    if kind != "missing":
        write_bad_video(path, kind)
    with pytest.raises(VideoReadError, match=f"bad_{kind}.mp4") as info:
        read_frames(path, _cfg(decoder=decoder))
    assert info.value.path == path
