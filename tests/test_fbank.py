"""Kaldi fbank and AST input (docs/design.md §1): parity with torchaudio and transformers, edge cases."""
import importlib
import math
import sys

import numpy as np
import pytest
import torch

from dataloaders import audio
from dataloaders.audio import FbankConfig, ast_frame_shift_ms, ast_input, kaldi_fbank

SR = 16000
TORCHAUDIO_TOL = 1e-4
TRANSFORMERS_TOL = 1e-3
# transformers' numpy path runs in float64. Our float32 path (like torchaudio's) carries
# FFT roundoff of ~1e-7 of the frame energy, visible in the log of bands ~100 dB down
# (up to ~6e-3 there); within 15 nats (65 dB) of the frame peak it stays below 3e-4.
FLOAT32_COMPARE_RANGE_NATS = 15.0


def _signal(kind: str, seconds: float, seed: int = 0) -> torch.Tensor:
    """Test waveforms in [-1, 1]: white noise, a chirp, or tones plus noise."""
    gen = torch.Generator().manual_seed(seed)
    t = torch.arange(int(seconds * SR), dtype=torch.float64) / SR
    if kind == "noise":
        x = 0.1 * torch.randn(t.shape, generator=gen, dtype=torch.float64)
    elif kind == "chirp":
        x = 0.5 * torch.sin(2 * math.pi * (100 * t + 300 * t ** 2))
    else:
        x = (0.3 * torch.sin(2 * math.pi * 440 * t) + 0.2 * torch.sin(2 * math.pi * 2500 * t)
             + 0.01 * torch.randn(t.shape, generator=gen, dtype=torch.float64))
    return x.float()


def reference(module: str):
    """Import a reference implementation; a missing one FAILS the parity tests (never skips them),
    so no run, in CI or by hand, can pass without the references requirements-dev.txt installs."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        pytest.fail(f"{module} is required by the Kaldi parity tests: install requirements-dev.txt and "
                    f"the Makefile's TORCHAUDIO_REF ({err})")


def test_missing_reference_fails(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchaudio.compliance.kaldi", None)  # import now raises
    with pytest.raises(pytest.fail.Exception, match="required by the Kaldi parity tests"):
        reference("torchaudio.compliance.kaldi")


def _torchaudio_fbank(x: torch.Tensor, shift_ms: float) -> torch.Tensor:
    kaldi = reference("torchaudio.compliance.kaldi")
    return kaldi.fbank(x[None], htk_compat=True, sample_frequency=SR, use_energy=False,
                       window_type="hanning", num_mel_bins=128, dither=0.0,
                       frame_shift=shift_ms)


SIGNALS = [("noise", 1.0), ("chirp", 3.7), ("tones", 10.0), ("noise", 6.13)]


@pytest.mark.parametrize("kind,seconds", SIGNALS)
@pytest.mark.parametrize("shift", ["10ms", "duration/1024"])
def test_matches_torchaudio(kind, seconds, shift):
    x = _signal(kind, seconds, seed=int(seconds * 100))
    shift_ms = 10.0 if shift == "10ms" else ast_frame_shift_ms(x.numel(), SR)
    ours, ref = kaldi_fbank(x, SR, shift_ms), _torchaudio_fbank(x, shift_ms)
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max().item() <= TORCHAUDIO_TOL


@pytest.fixture
def numpy_ast_extractor(monkeypatch):
    """transformers' ASTFeatureExtractor forced onto its own numpy (float64) Kaldi path."""
    fe_module = reference(
        "transformers.models.audio_spectrogram_transformer.feature_extraction_audio_spectrogram_transformer")
    # The extractor silently uses torchaudio when it is installed (is_speech_available);
    # force its numpy implementation and make any torchaudio call fail.
    monkeypatch.setattr(fe_module, "is_speech_available", lambda: False)
    monkeypatch.setattr(fe_module, "ta_kaldi", None, raising=False)

    def extract(x: torch.Tensor, frames: int) -> np.ndarray:
        extractor = fe_module.ASTFeatureExtractor(do_normalize=False, max_length=frames)
        assert hasattr(extractor, "mel_filters")  # built only on the numpy path
        return extractor(x.numpy(), sampling_rate=SR, return_tensors="np")["input_values"][0]

    return extract


@pytest.mark.filterwarnings("ignore:At least one mel filter")  # transformers' own mel check
@pytest.mark.parametrize("kind,seconds", SIGNALS)
def test_matches_transformers_numpy_path(numpy_ast_extractor, kind, seconds):
    """Its 10 ms stage before padding/normalization; float64 input selects our float64 path."""
    x = _signal(kind, seconds, seed=int(seconds * 100))
    ours = kaldi_fbank(x.double(), SR, 10.0)
    ref = numpy_ast_extractor(x, ours.shape[0])
    assert ref.shape == tuple(ours.shape)
    assert np.abs(ref - ours.numpy()).max() <= TRANSFORMERS_TOL


@pytest.mark.filterwarnings("ignore:At least one mel filter")
@pytest.mark.parametrize("kind,seconds", SIGNALS)
def test_float32_path_matches_transformers_in_audible_bands(numpy_ast_extractor, kind, seconds):
    """float32 roundoff (shared with torchaudio) only shows in bands far below the frame peak."""
    x = _signal(kind, seconds, seed=int(seconds * 100))
    ours = kaldi_fbank(x, SR, 10.0).numpy()
    ref = numpy_ast_extractor(x, ours.shape[0])
    audible = ref > ref.max(axis=1, keepdims=True) - FLOAT32_COMPARE_RANGE_NATS
    assert np.abs(ref - ours)[audible].max() <= TRANSFORMERS_TOL


def _htk_mel(f):
    return 1127.0 * np.log1p(np.asarray(f, dtype=np.float64) / 700.0)


def test_pure_tone_peaks_in_its_mel_bin():
    cfg = FbankConfig()
    t = torch.arange(2 * SR, dtype=torch.float64) / SR
    tone = (0.5 * torch.sin(2 * math.pi * 1000.0 * t)).float()
    mel_low, mel_high = _htk_mel(cfg.low_freq), _htk_mel(SR / 2)
    centers = mel_low + (mel_high - mel_low) / (cfg.num_mel_bins + 1) * np.arange(1, cfg.num_mel_bins + 1)
    expected = int(np.argmin(np.abs(centers - _htk_mel(1000.0))))
    assert int(kaldi_fbank(tone, SR, 10.0).mean(0).argmax()) == expected
    assert int(ast_input(tone, SR).mean(0).argmax()) == expected


def test_silence_is_finite():
    out = ast_input(torch.zeros(3 * SR), SR)
    assert out.shape == (1024, 128) and torch.isfinite(out).all()
    floor = (math.log(audio.LOG_FLOOR) - FbankConfig.norm_mean) / (2 * FbankConfig.norm_std)
    assert torch.allclose(out, torch.full_like(out, floor))


@pytest.mark.parametrize("num_samples", [0, 1, 100, 399])
def test_clip_shorter_than_a_window(num_samples):
    out = ast_input(0.1 * torch.randn(num_samples), SR)
    assert out.shape == (1024, 128) and torch.isfinite(out).all()


def test_shift_helper_whole_samples_never_zero():
    assert ast_frame_shift_ms(10 * SR, SR) == 156 * 1000.0 / SR  # 10 s: 156.25 -> 156 samples
    assert ast_frame_shift_ms(500, SR) == 1000.0 / SR  # < 1024 samples: 1 sample, not 0
    # A whole number of samples survives the ms round trip (no float truncation to N - 1).
    x = _signal("noise", 1024 * 160 / SR)
    frames = kaldi_fbank(x, SR, ast_frame_shift_ms(x.numel(), SR)).shape[0]
    assert frames == 1 + (x.numel() - 400) // 160


def test_ast_input_recipe_pad_and_cut():
    cfg = FbankConfig()

    def normalized(fbank):
        return (fbank - cfg.norm_mean) / (2 * cfg.norm_std)

    long_clip = _signal("tones", 10.0)  # 1 + (160000 - 400) // 156 = 1024 frames
    centered = long_clip - long_clip.mean()
    full = kaldi_fbank(centered, SR, ast_frame_shift_ms(centered.numel(), SR))
    assert torch.allclose(ast_input(long_clip, SR), normalized(full[:1024]), atol=1e-5)
    # 1000 samples: shift 1 sample, 601 frames, zero-padded (raw) to 1024 then normalized.
    short_clip = _signal("noise", 1000 / SR)
    out = ast_input(short_clip, SR)
    raw = kaldi_fbank(short_clip - short_clip.mean(), SR, 1000.0 / SR)
    assert raw.shape[0] == 601
    assert torch.allclose(out[:601], normalized(raw), atol=1e-5)
    assert torch.allclose(out[601:], torch.full_like(out[601:], normalized(torch.tensor(0.0)).item()))


def test_chunked_frames_match_one_pass(monkeypatch):
    x = _signal("chirp", 2.0)
    whole = kaldi_fbank(x, SR, 10.0)
    monkeypatch.setattr(audio, "FRAMES_PER_CHUNK", 7)
    assert torch.allclose(kaldi_fbank(x, SR, 10.0), whole)


def test_ten_minute_clip_is_finite():
    x = 0.1 * torch.randn(600 * SR)
    out = ast_input(x, SR)
    assert out.shape == (1024, 128) and torch.isfinite(out).all()


def test_rejects_multichannel():
    with pytest.raises(ValueError, match="mono"):
        ast_input(torch.zeros(2, SR), SR)
