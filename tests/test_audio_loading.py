"""Waveform loading, bad-audio policy and missing-soundtrack handling (dataloaders/audio.py)."""
import logging

import numpy as np
import pytest
import soundfile as sf
import torch
from torch.utils.data import DataLoader, Dataset

from dataloaders.audio import (AudioFileError, AudioIssueCounter, FbankConfig, ast_input,
                               load_ast_input, load_waveform)

SR = 16000
SECONDS = 2.0
# Resampled vs native 16 kHz AST input, in normalized fbank units (1 unit = 2 * 3.25 nats).
# The test signal is band-limited (tones <= 3.1 kHz, below the 4 kHz Nyquist of 8 kHz
# audio) and faded in and out, so the resampler sees neither aliasing nor edge
# transients; what remains is soxr "HQ" pass-band error, measured at <= 5e-4.
RESAMPLE_TOL = 2e-3
# PCM16 files carry a quantization noise floor (-96 dBFS) whose spectrum depends on the
# file's rate, so with PCM16 only bands within this power ratio of the peak are compared.
PCM_COMPARE_RANGE = 1e4


def _tones(sample_rate: int) -> np.ndarray:
    """The same continuous signal sampled at ``sample_rate``: three tones, Hann envelope."""
    t = np.arange(int(SECONDS * sample_rate)) / sample_rate
    envelope = np.sin(np.pi * t / SECONDS) ** 2
    x = (0.3 * np.sin(2 * np.pi * 440 * t) + 0.2 * np.sin(2 * np.pi * 1234.5 * t)
         + 0.1 * np.sin(2 * np.pi * 3100 * t))
    return (envelope * x).astype(np.float32)


def _as_stereo(x: np.ndarray) -> np.ndarray:
    """Two different channels whose mean is ``x``: [T, 2]."""
    side = 0.05 * np.sin(np.arange(x.size)).astype(np.float32)
    return np.stack([x + side, x - side], axis=1)


def _fbank_of(path) -> torch.Tensor:
    return ast_input(torch.from_numpy(load_waveform(str(path))), SR)


def test_roundtrip_mono_wav_and_flac(tmp_path):
    x = _tones(SR)
    sf.write(tmp_path / "a.wav", x, SR, subtype="PCM_16")
    sf.write(tmp_path / "a.flac", x, SR)
    for name in ("a.wav", "a.flac"):
        loaded = load_waveform(str(tmp_path / name))
        assert loaded.dtype == np.float32 and loaded.shape == x.shape
        assert np.abs(loaded - x).max() <= 1.0 / 2 ** 15  # one PCM16 step


@pytest.mark.parametrize("rate", [SR, 8000, 44100, 48000])
def test_stereo_and_other_rates_match_16k_mono(tmp_path, rate):
    sf.write(tmp_path / "ref.wav", _tones(SR), SR, subtype="FLOAT")
    sf.write(tmp_path / "x.wav", _as_stereo(_tones(rate)), rate, subtype="FLOAT")
    ref, out = _fbank_of(tmp_path / "ref.wav"), _fbank_of(tmp_path / "x.wav")
    assert load_waveform(str(tmp_path / "x.wav")).shape == (int(SECONDS * SR),)
    assert (out - ref).abs().max().item() <= RESAMPLE_TOL


@pytest.mark.parametrize("rate", [8000, 48000])
def test_pcm16_other_rates_match_in_strong_bands(tmp_path, rate):
    sf.write(tmp_path / "ref.wav", _tones(SR), SR, subtype="PCM_16")
    sf.write(tmp_path / "x.wav", _as_stereo(_tones(rate)), rate, subtype="PCM_16")
    ref, out = _fbank_of(tmp_path / "ref.wav"), _fbank_of(tmp_path / "x.wav")
    strong = ref > ref.max() - np.log(PCM_COMPARE_RANGE) / (2 * FbankConfig.norm_std)
    assert strong.float().mean() > 0.05  # the comparison covers a real part of the input
    assert (out - ref)[strong].abs().max().item() <= RESAMPLE_TOL


def test_ast_input_resamples_other_rates():
    ref = ast_input(torch.from_numpy(_tones(SR)), SR)
    out = ast_input(torch.from_numpy(_tones(48000)), 48000)
    assert (out - ref).abs().max().item() <= RESAMPLE_TOL


def _write_good(path):
    sf.write(path, _tones(SR), SR, subtype="PCM_16")
    return path


def _bad_files(tmp_path):
    good = (tmp_path / "good.wav")
    _write_good(good)
    data = good.read_bytes()
    (tmp_path / "garbage.wav").write_bytes(b"not audio at all " * 40)
    (tmp_path / "truncated.wav").write_bytes(data[: len(data) // 2])
    (tmp_path / "header_only.wav").write_bytes(data[:30])
    sf.write(tmp_path / "good.flac", _tones(SR), SR)
    flac = (tmp_path / "good.flac").read_bytes()
    (tmp_path / "truncated.flac").write_bytes(flac[: len(flac) // 2])
    sf.write(tmp_path / "empty.wav", np.zeros(0, np.float32), SR)
    return ["garbage.wav", "truncated.wav", "header_only.wav", "truncated.flac", "empty.wav"]


def test_corrupt_and_truncated_files_raise_naming_the_file(tmp_path):
    for name in _bad_files(tmp_path):
        with pytest.raises(AudioFileError, match=name):
            load_waveform(str(tmp_path / name))


def test_bad_audio_policies(tmp_path, caplog):
    bad = str(tmp_path / "truncated.wav")
    _bad_files(tmp_path)
    with pytest.raises(AudioFileError, match="truncated.wav"):
        load_ast_input(bad, FbankConfig(), "error", AudioIssueCounter())
    counter = AudioIssueCounter()
    with caplog.at_level(logging.WARNING):
        fbank, has_audio = load_ast_input(bad, FbankConfig(), "zero", counter)
    assert not has_audio and fbank.shape == (1024, 128) and not fbank.any()
    assert counter.count("bad") == 1 and counter.count("missing") == 0
    assert "truncated.wav" in caplog.text
    with pytest.raises(ValueError, match="on_bad_audio"):
        load_ast_input(bad, FbankConfig(), "skip", counter)


def test_missing_soundtrack_gives_counted_zeros(tmp_path):
    counter = AudioIssueCounter()
    for path in (None, str(tmp_path / "no_such_video.wav")):
        fbank, has_audio = load_ast_input(path, FbankConfig(), "error", counter)
        assert not has_audio and fbank.shape == (1024, 128) and not fbank.any()
    good = str(_write_good(tmp_path / "good.wav"))
    fbank, has_audio = load_ast_input(good, FbankConfig(), "error", counter)
    assert has_audio and torch.equal(fbank, _fbank_of(good))
    assert (counter.count("missing"), counter.count("bad"), counter.count("loaded")) == (2, 0, 1)
    assert counter.zero_filled == 2
    assert counter.summary() == ("audio: 2 of 3 clips used the zero fbank "
                                 "(2 without a soundtrack, 0 unreadable files)")


class _ClipDataset(Dataset):
    def __init__(self, paths, counter):
        self.paths, self.counter = paths, counter

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        _, has_audio = load_ast_input(self.paths[index], FbankConfig(), "zero", self.counter)
        return has_audio


def test_counter_sees_dataloader_workers(tmp_path):
    _bad_files(tmp_path)
    paths = [None, str(tmp_path / "truncated.wav"), str(tmp_path / "good.wav"), None, None,
             str(tmp_path / "garbage.wav")]
    counter = AudioIssueCounter()
    loader = DataLoader(_ClipDataset(paths, counter), batch_size=2, num_workers=2)
    has_audio = torch.cat(list(loader))
    assert has_audio.tolist() == [False, False, True, False, False, False]
    assert (counter.count("missing"), counter.count("bad"), counter.count("loaded")) == (3, 2, 1)
