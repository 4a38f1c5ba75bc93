"""Frame reading: sampling plan, CLIP transform, padding, decoder agreement, bad files."""
import numpy as np
import pytest
import torch

from dataloaders.video import (CLIP_MEAN, CLIP_STD, DECODERS, FrameSamplingConfig, VideoReadError,
                               clip_transform, decode_frames, decode_opencv, read_frames,
                               sample_frame_indices)
from tests.datagen import frame_index_of, index_color, write_bad_video, write_video

SIZE = 32


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


def test_transform_constant_frame_is_normalized_exactly():
    color = np.array([200, 100, 50], dtype=np.uint8)
    frames = np.broadcast_to(color, (2, 48, 64, 3))
    out = clip_transform(frames, SIZE)
    assert out.shape == (2, 3, SIZE, SIZE) and out.dtype == torch.float32
    expected = (torch.tensor(color / 255.0) - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    torch.testing.assert_close(out, expected.float()[None, :, None, None].expand_as(out), atol=1e-5, rtol=0)


def test_transform_resizes_shorter_side_then_center_crops():
    # 40 x 80 frame, left half black, right half white -> 32 x 64 -> center crop columns 16..47:
    # left 16 columns black, right 16 white (a squash to 32 x 32 would keep the split but
    # a crop of the wrong region would not).
    frame = np.zeros((1, 40, 80, 3), dtype=np.uint8)
    frame[:, :, 40:] = 255
    out = clip_transform(frame, SIZE)[0, 0]
    black = (0.0 - CLIP_MEAN[0]) / CLIP_STD[0]
    white = (1.0 - CLIP_MEAN[0]) / CLIP_STD[0]
    assert torch.allclose(out[:, :14], torch.full_like(out[:, :14], black), atol=1e-3)
    assert torch.allclose(out[:, 18:], torch.full_like(out[:, 18:], white), atol=1e-3)
    # Portrait frames crop rows the same way.
    assert clip_transform(np.zeros((1, 80, 40, 3), dtype=np.uint8), SIZE).shape == (1, 3, SIZE, SIZE)


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
    pixel_step = 1.0 / 255.0 / min(CLIP_STD)
    assert (a[0] - b[0]).abs().max() <= 3 * pixel_step
    assert (a[0] - b[0]).abs().mean() <= 0.5 * pixel_step


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
    assert frames.shape == (5, 3, SIZE, SIZE) and mask.dtype == torch.bool
    assert mask.tolist() == [True, True, True, False, False]
    assert frames[3:].abs().sum() == 0 and frames[:3].abs().sum() > 0


@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize("kind", ["missing", "garbage", "empty", "no_frames", "truncated"])
def test_bad_video_raises_naming_the_file(tmp_path, kind, decoder):
    path = str(tmp_path / f"bad_{kind}.mp4")
    if kind != "missing":
        write_bad_video(path, kind)
    with pytest.raises(VideoReadError, match=f"bad_{kind}.mp4") as info:
        read_frames(path, _cfg(decoder=decoder))
    assert info.value.path == path
