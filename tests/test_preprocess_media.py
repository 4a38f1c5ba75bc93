"""preprocess/extract_audio.py and preprocess/compress_video.py on tiny PyAV-written videos."""
import json
import os

import av
import numpy as np
import pytest
import soundfile as sf

from atomic_io import atomic_path
from preprocess import compress_video, extract_audio

FPS = 10
SECONDS = 2.0
AUDIO_RATE = 44100
TONE_HZ = 440.0


def _audio_frames(codec: str, rate: int, block: int):
    """A stereo TONE_HZ tone as AudioFrames: planar float for AAC, packed int16 for PCM."""
    t = np.arange(int(SECONDS * rate)) / rate
    tone = (0.3 * np.sin(2 * np.pi * TONE_HZ * t)).astype(np.float32)
    for start in range(0, tone.size, block):
        chunk = tone[start:start + block]
        if codec == "aac":
            frame = av.AudioFrame.from_ndarray(np.stack([chunk, chunk]), format="fltp", layout="stereo")
        else:
            packed = np.repeat((chunk * 32767).astype(np.int16), 2)[None]
            frame = av.AudioFrame.from_ndarray(packed, format="s16", layout="stereo")
        frame.sample_rate, frame.pts = rate, start
        yield frame


def _write_video(path, audio_codec=None, audio_rate=AUDIO_RATE, block=1024, width=80, height=48):
    """A SECONDS-long clip with changing gray frames and, optionally, a stereo tone."""
    with av.open(str(path), "w") as container:
        video = container.add_stream(compress_video.pick_video_codec(), rate=FPS)
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        audio = container.add_stream(audio_codec, rate=audio_rate) if audio_codec else None
        if audio is not None:
            audio.layout = "stereo"
        for i in range(int(SECONDS * FPS)):
            image = np.full((height, width, 3), 10 * i, np.uint8)
            container.mux(video.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(video.encode(None))
        if audio is not None:
            for frame in _audio_frames(audio_codec, audio_rate, block):
                container.mux(audio.encode(frame))
            container.mux(audio.encode(None))


@pytest.fixture(scope="module")
def video_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("videos")
    _write_video(folder / "talking.mp4", audio_codec="aac")
    # PCM in Matroska: 22.05 kHz, odd 500-sample frames; reads back with an unnamed
    # "2 channels" layout, which the AAC encoder rejects unless remapped.
    _write_video(folder / "lecture.mkv", audio_codec="pcm_s16le", audio_rate=22050, block=500)
    _write_video(folder / "silent.mp4")
    (folder / "broken.mkv").write_bytes(b"\x00" * 256)
    return folder


def _leftover_temps(folder):
    return [name for name in os.listdir(folder) if name.startswith(".")]


def test_extract_audio(video_dir, tmp_path):
    audio_dir, report_path = tmp_path / "audio", tmp_path / "report.json"
    argv = ["--video_dir", str(video_dir), "--audio_dir", str(audio_dir), "--workers", "2",
            "--report", str(report_path)]
    assert extract_audio.main(argv) == 1  # one failed file
    report = json.loads(report_path.read_text())
    assert sorted(os.listdir(audio_dir)) == ["lecture.wav", "talking.wav"]
    assert report["no_audio"] == ["silent"]
    assert [entry["video_id"] for entry in report["failed"]] == ["broken"]
    assert "broken.mkv" in report["failed"][0]["path"]

    for name in ("talking.wav", "lecture.wav"):
        samples, rate = sf.read(audio_dir / name, dtype="float32")
        assert rate == 16000 and samples.ndim == 1
        assert abs(samples.size / rate - SECONDS) < 0.05  # AAC adds a few ms of priming
        spectrum = np.abs(np.fft.rfft(samples))
        assert abs(np.argmax(spectrum) * rate / samples.size - TONE_HZ) < 2.0

    before = os.path.getmtime(audio_dir / "talking.wav")
    extract_audio.main(argv[:-2] + ["--workers", "1", "--report", str(report_path)])
    report = json.loads(report_path.read_text())
    assert report["counts"]["skipped"] == 2 and report["counts"]["written"] == 0
    assert os.path.getmtime(audio_dir / "talking.wav") == before
    assert _leftover_temps(audio_dir) == []


def test_compress_video(video_dir, tmp_path):
    out_dir = tmp_path / "compressed"
    argv = ["--video_dir", str(video_dir), "--output_dir", str(out_dir), "--workers", "1"]
    assert compress_video.main(argv) == 1
    report = json.loads((out_dir / "compress_video_report.json").read_text())
    assert report["counts"]["written"] == 3 and report["no_audio"] == ["silent"]
    for name, has_audio in (("talking.mp4", True), ("lecture.mp4", True), ("silent.mp4", False)):
        with av.open(str(out_dir / name)) as container:
            stream = container.streams.video[0]
            frames = list(container.decode(stream))
            assert stream.average_rate == 3
            assert len(frames) == int(SECONDS * 3)
            assert (frames[0].width, frames[0].height) == compress_video.scaled_size(80, 48, 224)
            assert min(frames[0].width, frames[0].height) == 224
            assert bool(container.streams.audio) == has_audio
    for name in ("talking.mp4", "lecture.mp4"):
        with av.open(str(out_dir / name)) as container:
            rate = container.streams.audio[0].sample_rate
            audio_samples = sum(frame.samples for frame in container.decode(audio=0))
        assert abs(audio_samples / rate - SECONDS) < 0.1
    assert compress_video.main(argv) == 1
    report = json.loads((out_dir / "compress_video_report.json").read_text())
    assert report["counts"]["skipped"] == 3
    assert _leftover_temps(out_dir) == []


def test_scaled_size_keeps_aspect_and_even_sides():
    assert compress_video.scaled_size(320, 240, 224) == (298, 224)
    assert compress_video.scaled_size(240, 320, 224) == (224, 298)
    assert compress_video.scaled_size(100, 100, 224) == (224, 224)


def test_atomic_output_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "clip.wav"
    with pytest.raises(RuntimeError, match="encoder died"):
        with atomic_path(str(target)) as tmp:
            with open(tmp, "wb") as handle:
                handle.write(b"partial")
            raise RuntimeError("encoder died")
    assert os.listdir(tmp_path) == []
    with atomic_path(str(target)) as tmp:
        with open(tmp, "wb") as handle:
            handle.write(b"complete")
    assert os.listdir(tmp_path) == ["clip.wav"] and target.read_bytes() == b"complete"
