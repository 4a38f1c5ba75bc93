"""Audio front-end: waveform loading, Kaldi log-mel filterbank and the AST input (docs/design.md §1).

``kaldi_fbank`` is a vectorized torch port of the Kaldi ``compute-fbank-feats`` recipe
with the options AST was trained with; ``ast_input`` adds the AVIGATE recipe around it
(mean removal, a frame shift that spreads the whole clip over 1024 frames, pad/cut,
normalization). ``load_ast_input`` is what datasets call: it also turns a missing
soundtrack or an unreadable file into the zero input and counts how often that happened.

Shapes: T samples, frames x bins for a filterbank (AST: 1024 x 128).
"""
from __future__ import annotations

import functools
import logging
import math
import os
import struct
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
import soundfile as sf
import soxr
import torch
import torch.utils.data

logger = logging.getLogger(__name__)

# Kaldi floors mel energies at float32 machine epsilon before the log.
LOG_FLOOR = float(torch.finfo(torch.float32).eps)
# Frames transformed per FFT batch: bounds memory for arbitrarily long clips.
FRAMES_PER_CHUNK = 4096
# Tolerance when converting milliseconds to whole samples, so that a shift of exactly
# N samples given in milliseconds is not truncated to N - 1 by float rounding.
SAMPLE_ROUNDING_SLACK = 1e-6
RESAMPLER_QUALITY = "HQ"
# HTK mel scale: mel(f) = MEL_FACTOR * ln(1 + f / MEL_BREAK_HZ).
MEL_FACTOR = 1127.0
MEL_BREAK_HZ = 700.0
BAD_AUDIO_POLICIES = ("error", "zero")


@dataclass
class FbankConfig:
    """Settings of the AST input (docs/design.md §1); the defaults are the released recipe.

    Args:
        sample_rate: rate the waveform is resampled to before the filterbank (Hz).
        num_mel_bins: mel bins per frame.
        target_frames: frames per clip after pad/cut; the shift spreads the clip over them.
        frame_length_ms: analysis window length.
        preemphasis: pre-emphasis coefficient.
        low_freq: lowest mel band edge (Hz).
        high_freq: highest mel band edge (Hz); <= 0 means offset from Nyquist (Kaldi).
        norm_mean: dataset mean of the log-mel values.
        norm_std: dataset std of the log-mel values; the recipe divides by twice this.
    """

    sample_rate: int = 16000
    num_mel_bins: int = 128
    target_frames: int = 1024
    frame_length_ms: float = 25.0
    preemphasis: float = 0.97
    low_freq: float = 20.0
    high_freq: float = 0.0
    norm_mean: float = -5.118
    norm_std: float = 3.2527153


class AudioFileError(RuntimeError):
    """An audio file that exists but cannot be decoded completely."""


def _ms_to_samples(ms: float, sample_rate: float) -> int:
    """Whole samples in ``ms`` milliseconds, rounded down as Kaldi does."""
    return int(math.floor(sample_rate * ms / 1000.0 + SAMPLE_ROUNDING_SLACK))


def _mel(freq_hz):
    """HTK mel scale of a float or a tensor, in the form Kaldi evaluates it."""
    if isinstance(freq_hz, torch.Tensor):
        return MEL_FACTOR * torch.log(1.0 + freq_hz / MEL_BREAK_HZ)
    return MEL_FACTOR * math.log(1.0 + freq_hz / MEL_BREAK_HZ)


@functools.lru_cache(maxsize=16)
def _mel_banks(num_bins: int, fft_size: int, sample_rate: float, low_freq: float,
               high_freq: float, dtype: torch.dtype) -> torch.Tensor:
    """Kaldi's triangular filters, triangles in mel space: [bins, fft_size // 2 + 1].

    Evaluated in ``dtype``. In float32 this reproduces Kaldi and torchaudio (whose
    features AST was trained on) closely: float64 weights of the narrow low bands differ
    enough to move their log-mel by ~1e-4. The Nyquist FFT bin gets weight 0, as in Kaldi.
    """
    nyquist = 0.5 * sample_rate
    if high_freq <= 0.0:
        high_freq += nyquist
    if not 0.0 <= low_freq < high_freq <= nyquist:
        raise ValueError(f"mel range low_freq={low_freq} high_freq={high_freq} must satisfy "
                         f"0 <= low < high <= Nyquist ({nyquist} Hz)")
    mel_low = _mel(low_freq)
    delta = (_mel(high_freq) - mel_low) / (num_bins + 1)
    band = torch.arange(num_bins, dtype=dtype)[:, None]
    left = mel_low + band * delta
    center = mel_low + (band + 1.0) * delta
    right = mel_low + (band + 2.0) * delta
    bin_mel = _mel(sample_rate / fft_size * torch.arange(fft_size // 2, dtype=dtype))
    rising = (bin_mel - left) / (center - left)
    falling = (right - bin_mel) / (right - center)
    banks = torch.clamp(torch.minimum(rising, falling), min=0.0)
    return torch.nn.functional.pad(banks, (0, 1))


def kaldi_fbank(waveform: torch.Tensor, sample_rate: int, frame_shift_ms: float,
                num_mel_bins: int = FbankConfig.num_mel_bins,
                frame_length_ms: float = FbankConfig.frame_length_ms,
                preemphasis: float = FbankConfig.preemphasis,
                low_freq: float = FbankConfig.low_freq,
                high_freq: float = FbankConfig.high_freq) -> torch.Tensor:
    """Kaldi log-mel filterbank (raw, before padding and normalization).

    Kaldi defaults as AST uses them: Hann ("hanning", symmetric) window, snipped edges,
    DC removed per frame, pre-emphasis, power spectrum, FFT size rounded up to a power of
    two, HTK mel scale, no energy term, no dither, log floored at float32 epsilon.
    A clip shorter than one window is zero-padded to one window, so there is >= 1 frame.
    Computed in float32 (as torchaudio does for AST), or in float64 for a float64 input.

    Args:
        waveform: samples [T] (any float scale; AST uses [-1, 1]); float64 keeps float64.
        sample_rate: sampling rate of ``waveform`` in Hz.
        frame_shift_ms: hop between frames; truncated to whole samples (at least 1).
        num_mel_bins: mel bins.
        frame_length_ms: window length; truncated to whole samples.
        preemphasis: pre-emphasis coefficient.
        low_freq: lowest mel edge in Hz.
        high_freq: highest mel edge in Hz; <= 0 is an offset from Nyquist.

    Returns:
        log-mel energies [frames, bins], float32 (float64 for float64 input), on the
        waveform's device.
    """
    if waveform.dim() != 1:
        raise ValueError(f"kaldi_fbank expects a mono waveform [T], got shape {tuple(waveform.shape)}")
    window_size = _ms_to_samples(frame_length_ms, sample_rate)
    shift = max(1, _ms_to_samples(frame_shift_ms, sample_rate))
    fft_size = 1 << (window_size - 1).bit_length()
    dtype = torch.float64 if waveform.dtype == torch.float64 else torch.float32
    waveform = waveform.to(dtype)
    if waveform.numel() < window_size:
        waveform = torch.nn.functional.pad(waveform, (0, window_size - waveform.numel()))
    frames = waveform.unfold(0, window_size, shift)  # [frames, window] view, snip edges
    window = torch.hann_window(window_size, periodic=False, dtype=dtype, device=waveform.device)
    banks = _mel_banks(num_mel_bins, fft_size, float(sample_rate), float(low_freq),
                       float(high_freq), dtype).to(waveform.device)
    chunks = [_log_mel_frames(frames[start:start + FRAMES_PER_CHUNK], window, banks,
                              fft_size, preemphasis)
              for start in range(0, frames.shape[0], FRAMES_PER_CHUNK)]
    return torch.cat(chunks, dim=0)


def _log_mel_frames(frames: torch.Tensor, window: torch.Tensor, banks: torch.Tensor,
                    fft_size: int, preemphasis: float) -> torch.Tensor:
    """Per-frame Kaldi processing: frames [n, window] -> log-mel [n, bins]."""
    frames = frames - frames.mean(dim=1, keepdim=True)
    # Kaldi's pre-emphasis treats the sample before the first one as the first one.
    previous = torch.cat([frames[:, :1], frames[:, :-1]], dim=1)
    frames = (frames - preemphasis * previous) * window
    spectrum = torch.fft.rfft(frames, n=fft_size)
    power = spectrum.real.square() + spectrum.imag.square()
    return torch.clamp(power @ banks.T, min=LOG_FLOOR).log()


def ast_frame_shift_ms(num_samples: int, sample_rate: int,
                       target_frames: int = FbankConfig.target_frames) -> float:
    """Frame shift that spreads the clip over ``target_frames`` frames (docs/design.md §1).

    shift = duration / target_frames, rounded down to whole samples and never 0 samples.
    """
    return max(1, num_samples // target_frames) * 1000.0 / sample_rate


def resample(waveform: np.ndarray, orig_sr: int, target_sr: int) -> np.ndarray:
    """High-quality (soxr "HQ") resampling of samples [T] or [T, C]; float32 out."""
    waveform = np.asarray(waveform, dtype=np.float32)
    if orig_sr == target_sr or waveform.shape[0] == 0:
        return waveform
    return soxr.resample(waveform, orig_sr, target_sr, quality=RESAMPLER_QUALITY).astype(np.float32)


def ast_input(waveform: torch.Tensor, sample_rate: int,
              cfg: Optional[FbankConfig] = None) -> torch.Tensor:
    """The full AST input recipe of docs/design.md §1: waveform -> normalized fbank [1024, 128].

    Args:
        waveform: mono samples [T] in [-1, 1]; resampled to ``cfg.sample_rate`` if needed.
        sample_rate: rate of ``waveform`` in Hz.
        cfg: fbank settings (defaults: the released recipe).

    Returns:
        normalized log-mel [target_frames, num_mel_bins] (frames x bins), float32.
    """
    cfg = cfg or FbankConfig()
    waveform = torch.as_tensor(waveform, dtype=torch.float32)
    if waveform.dim() != 1:
        raise ValueError(f"ast_input expects a mono waveform [T], got shape {tuple(waveform.shape)}")
    if sample_rate != cfg.sample_rate:
        waveform = torch.from_numpy(resample(waveform.cpu().numpy(), sample_rate, cfg.sample_rate)
                                    ).to(waveform.device)
    waveform = waveform - waveform.mean() if waveform.numel() else waveform
    shift_ms = ast_frame_shift_ms(waveform.numel(), cfg.sample_rate, cfg.target_frames)
    # Frames past target_frames are cut anyway; skip computing them.
    needed = (_ms_to_samples(cfg.frame_length_ms, cfg.sample_rate)
              + (cfg.target_frames - 1) * _ms_to_samples(shift_ms, cfg.sample_rate))
    fbank = kaldi_fbank(waveform[:needed], cfg.sample_rate, shift_ms, cfg.num_mel_bins,
                        cfg.frame_length_ms, cfg.preemphasis, cfg.low_freq, cfg.high_freq)
    missing = cfg.target_frames - fbank.shape[0]
    fbank = torch.nn.functional.pad(fbank, (0, 0, 0, missing)) if missing > 0 else fbank[:cfg.target_frames]
    return (fbank - cfg.norm_mean) / (2.0 * cfg.norm_std)


def zero_ast_input(cfg: Optional[FbankConfig] = None) -> torch.Tensor:
    """AST input of a video without (usable) audio: all zeros [target_frames, bins].

    docs/design.md §1 gives such a video "an all-zero fbank (paper: zero vector)"; the zeros are
    the tensor AST receives (the normalized input), i.e. the dataset-mean spectrogram.
    """
    cfg = cfg or FbankConfig()
    return torch.zeros(cfg.target_frames, cfg.num_mel_bins)


# RIFF/WAVE layout: "RIFF" <size> "WAVE", then chunks of <id:4 bytes> <size:uint32 LE> <data>.
_RIFF_HEADER = struct.Struct("<4sI4s")
_RIFF_CHUNK = struct.Struct("<4sI")
# Streaming writers leave the data size unknown as 0 or 0xFFFFFFFF; nothing to check then.
_UNKNOWN_DATA_SIZES = (0, 0xFFFFFFFF)


def _check_wav_complete(path: str) -> None:
    """Raise AudioFileError if a WAV file holds fewer data bytes than its header declares.

    libsndfile silently shortens a truncated WAV to the bytes present, which would turn
    a half-copied file into a shorter clip, so the header is checked here.
    """
    file_size = os.path.getsize(path)
    with open(path, "rb") as handle:
        header = handle.read(_RIFF_HEADER.size)
        if len(header) < _RIFF_HEADER.size:
            return  # too short to be RIFF; libsndfile reports it
        riff, _, wave = _RIFF_HEADER.unpack(header)
        if riff != b"RIFF" or wave != b"WAVE":
            return
        while True:
            chunk = handle.read(_RIFF_CHUNK.size)
            if len(chunk) < _RIFF_CHUNK.size:
                return
            chunk_id, size = _RIFF_CHUNK.unpack(chunk)
            if chunk_id == b"data":
                available = file_size - handle.tell()
                if size not in _UNKNOWN_DATA_SIZES and size > available:
                    raise AudioFileError(
                        f"{path}: truncated WAV (header declares {size} data bytes, file holds "
                        f"{available}); re-extract it with preprocess/extract_audio.py")
                return
            handle.seek(size + (size & 1), os.SEEK_CUR)  # chunks are padded to even size


def load_waveform(path: str, target_sr: int = FbankConfig.sample_rate) -> np.ndarray:
    """Read a wav/flac file as mono float32 samples [T] at ``target_sr``.

    Channels are averaged; other rates are resampled with soxr "HQ".

    Raises:
        AudioFileError: the file cannot be decoded, is truncated, is empty or holds
            non-finite samples. The message names the file.
    """
    _check_wav_complete(path)
    try:
        with sf.SoundFile(path) as audio:
            declared = audio.frames
            samples = audio.read(dtype="float32", always_2d=True)  # [T, C]
            sample_rate = audio.samplerate
    except (sf.SoundFileError, RuntimeError) as err:
        raise AudioFileError(f"{path}: cannot decode audio ({err}); re-extract it with "
                             f"preprocess/extract_audio.py") from err
    if samples.shape[0] != declared:
        raise AudioFileError(f"{path}: truncated audio (header declares {declared} frames, "
                             f"decoded {samples.shape[0]})")
    if samples.shape[0] == 0:
        raise AudioFileError(f"{path}: audio file holds no samples")
    if not np.isfinite(samples).all():
        raise AudioFileError(f"{path}: audio holds NaN or infinite samples")
    return resample(samples.mean(axis=1), sample_rate, target_sr)


def _counter_row() -> int:
    """Row of the shared count table this process writes: 0 = main, 1 + worker id."""
    info = torch.utils.data.get_worker_info()
    return 0 if info is None else 1 + info.id


class AudioIssueCounter:
    """Counts clips loaded, clips without a soundtrack and unreadable files.

    The counts live in a shared-memory table with one row per DataLoader worker (each
    process only writes its own row), so the main process sees every worker's counts
    when it reports once per run.

    Args:
        max_workers: DataLoader workers the table has rows for; more share rows mod this.
    """

    KINDS = ("loaded", "missing", "bad")

    def __init__(self, max_workers: int = 64):
        self._table = torch.zeros(max_workers + 1, len(self.KINDS), dtype=torch.int64).share_memory_()

    def record(self, kind: str) -> None:
        """Count one clip of ``kind`` ("loaded", "missing" or "bad")."""
        row = _counter_row() % self._table.shape[0]
        self._table[row, self.KINDS.index(kind)] += 1

    def count(self, kind: str) -> int:
        return int(self._table[:, self.KINDS.index(kind)].sum())

    @property
    def zero_filled(self) -> int:
        """Clips that received the zero input (missing soundtrack or bad file)."""
        return self.count("missing") + self.count("bad")

    def summary(self) -> str:
        """One line for the run log."""
        total = self.zero_filled + self.count("loaded")
        return (f"audio: {self.zero_filled} of {total} clips used the zero fbank "
                f"({self.count('missing')} without a soundtrack, {self.count('bad')} unreadable files)")


def load_ast_input(path: Optional[str], cfg: Optional[FbankConfig] = None,
                   on_bad_audio: str = "error",
                   counter: Optional[AudioIssueCounter] = None) -> Tuple[torch.Tensor, bool]:
    """AST input of one video's soundtrack file, or the zero input when there is none.

    Args:
        path: the video's wav/flac; None or a nonexistent path = video without soundtrack.
        cfg: fbank settings.
        on_bad_audio: "error" raises on an unreadable file; "zero" uses the zero input,
            logs a warning naming the file and counts it.
        counter: optional AudioIssueCounter updated for every call.

    Returns:
        (fbank [target_frames, num_mel_bins], has_audio).
    """
    if on_bad_audio not in BAD_AUDIO_POLICIES:
        raise ValueError(f"on_bad_audio must be one of {BAD_AUDIO_POLICIES}, got {on_bad_audio!r}")
    cfg = cfg or FbankConfig()
    if path is None or not os.path.exists(path):
        _record(counter, "missing")
        return zero_ast_input(cfg), False
    try:
        waveform = load_waveform(path, cfg.sample_rate)
    except AudioFileError as err:
        if on_bad_audio == "error":
            raise
        logger.warning("%s; using the zero fbank", err)
        _record(counter, "bad")
        return zero_ast_input(cfg), False
    _record(counter, "loaded")
    return ast_input(torch.from_numpy(waveform), cfg.sample_rate, cfg), True


def _record(counter: Optional[AudioIssueCounter], kind: str) -> None:
    if counter is not None:
        counter.record(kind)
