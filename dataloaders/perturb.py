"""Audio perturbations of an evaluation split (``--audio_perturb``), for robustness tests.

Every test video's audio input is replaced, and nothing else of its item changes (frames,
frame mask and every text stay bit-identical):

- ``silence``: the all-zero AST input (``dataloaders.audio.zero_ast_input``, the input a video
  without soundtrack gets; the paper's "zero vector").
- ``noise``: white noise, replacing the soundtrack: ``noise_seconds`` of i.i.d. Gaussian
  samples at 16 kHz (the fbank sample rate) with standard deviation ``noise_rms`` (the RMS
  level of the waveform, full scale = 1; 0.1 is -20 dBFS), turned into the AST input by the
  same recipe as a real soundtrack (``ast_input``). The samples of a video are drawn from
  ``numpy.random.default_rng([seed, digest(video_id)])``: reproducible, independent of
  evaluation order, batching and workers.
- ``swap``: the audio of another test video, after a fixed derangement: the split's video ids
  are sorted, shuffled by ``numpy.random.default_rng(seed)``, and each video in that order
  takes the audio of the next one (the last takes the first's). A single cycle over all
  videos: no video keeps its own audio, and the map depends only on the set of ids and the
  seed.

With an AST feature cache, ``swap`` reads the other video's cached tokens; ``silence`` and
``noise`` give the fbank instead (the cache holds no tokens for them), which the model's AST
turns into tokens (``AVIGATE.resampled_audio`` tells fbanks from tokens by shape). Items of a
source without audio (the visual-only model) are returned unchanged: nothing to perturb.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Dict, Optional, Sequence

import numpy as np
import torch

from dataloaders.audio import FbankConfig, ast_input, zero_ast_input

AUDIO_PERTURBATIONS = ("none", "silence", "noise", "swap")
DEFAULT_NOISE_RMS = 0.1
# AudioSet clip length; the AST input spreads any clip over 1024 frames, so the length only
# sets the frame shift (10 s: ~10 ms, the shift AST was trained with).
DEFAULT_NOISE_SECONDS = 10.0
DIGEST_BYTES = 8


@dataclass(frozen=True)
class AudioPerturbation:
    """What replaces each evaluation video's audio (module docstring).

    Args:
        kind: one of AUDIO_PERTURBATIONS ("none" = the real audio).
        noise_rms: standard deviation of the Gaussian noise waveform (full scale 1).
        noise_seconds: duration of the noise waveform.
        seed: seed of the noise and of the swap derangement (``--seed``).
    """

    kind: str = "none"
    noise_rms: float = DEFAULT_NOISE_RMS
    noise_seconds: float = DEFAULT_NOISE_SECONDS
    seed: int = 0

    def __post_init__(self):
        if self.kind not in AUDIO_PERTURBATIONS:
            raise ValueError(f"--audio_perturb {self.kind!r} is unknown; use one of {AUDIO_PERTURBATIONS}")
        if self.kind == "noise" and not (self.noise_rms > 0 and self.noise_seconds > 0):
            raise ValueError(f"--audio_noise_rms must be > 0 (got {self.noise_rms}) and the noise "
                             f"duration > 0 (got {self.noise_seconds})")

    def describe(self) -> dict:
        """The settings that define the perturbation (for metrics.json)."""
        out: dict = {"kind": self.kind}
        if self.kind == "noise":
            out.update(noise_rms=self.noise_rms, noise_seconds=self.noise_seconds, seed=self.seed,
                       definition="i.i.d. Gaussian waveform at 16 kHz, std noise_rms (full scale 1), "
                                  "replacing the soundtrack; rng seeded by [seed, sha256(video_id)]")
        elif self.kind == "swap":
            out.update(seed=self.seed, definition="sorted video ids shuffled by the seed; each video "
                                                  "takes the audio of the next (one cycle)")
        elif self.kind == "silence":
            out.update(definition="the all-zero AST input (zero_ast_input)")
        return out


def id_digest(video_id: str) -> int:
    """A stable 64-bit integer of a video id (Python's ``hash`` changes between processes)."""
    return int.from_bytes(hashlib.sha256(video_id.encode("utf-8")).digest()[:DIGEST_BYTES], "little")


def swap_sources(video_ids: Sequence[str], seed: int) -> Dict[str, str]:
    """video_id -> the video whose audio it gets under ``swap``: a single cycle over the
    sorted ids shuffled by ``seed`` (a derangement; needs at least 2 distinct videos)."""
    ids = sorted(set(video_ids))
    if len(ids) < 2:
        raise ValueError(f"--audio_perturb swap needs at least 2 test videos to exchange audio, got {len(ids)}")
    order = [ids[k] for k in np.random.default_rng(seed).permutation(len(ids))]
    return {video: order[(k + 1) % len(order)] for k, video in enumerate(order)}


def noise_waveform(video_id: str, perturbation: AudioPerturbation, sample_rate: int) -> np.ndarray:
    """The noise samples [T] (float32) that replace ``video_id``'s soundtrack."""
    rng = np.random.default_rng([perturbation.seed, id_digest(video_id)])
    num_samples = int(round(perturbation.noise_seconds * sample_rate))
    return (perturbation.noise_rms * rng.standard_normal(num_samples)).astype(np.float32)


class PerturbedAudio:
    """An ``AudioSource`` (dataloaders.base) whose clips are perturbed; same ``load`` / ``counter``.

    Args:
        source: the unperturbed audio of the split.
        perturbation: what replaces each clip.
        video_ids: the split's videos (the swap derangement is defined on them).
        fbank: settings of the AST input for silence and noise; default ``source.fbank``
            (with a feature cache: the settings the cache was built with).
    """

    def __init__(self, source, perturbation: AudioPerturbation, video_ids: Sequence[str],
                 fbank: Optional[FbankConfig] = None):
        self.source = source
        self.perturbation = perturbation
        self.fbank = fbank or source.fbank
        self.has_input = source.audio_path is not None or source.cache is not None
        self.sources = (swap_sources(video_ids, perturbation.seed)
                        if perturbation.kind == "swap" and self.has_input else {})

    @property
    def counter(self):
        return self.source.counter

    def load(self, video_id: str) -> Dict[str, torch.Tensor]:
        """The item's audio keys ({"fbank" | "audio_tokens", "has_audio"}), perturbed."""
        kind = self.perturbation.kind
        if kind == "none" or not self.has_input:
            return self.source.load(video_id)
        if kind == "swap":
            return self.source.load(self.sources[video_id])
        if kind == "silence":
            return {"fbank": zero_ast_input(self.fbank), "has_audio": torch.tensor(False)}
        wave = torch.from_numpy(noise_waveform(video_id, self.perturbation, self.fbank.sample_rate))
        return {"fbank": ast_input(wave, self.fbank.sample_rate, self.fbank), "has_audio": torch.tensor(True)}

    def record(self) -> dict:
        """What was done, for the run's outputs: the settings, whether the split had audio to
        perturb, and the swap map."""
        out = {**self.perturbation.describe(), "applied": self.has_input and self.perturbation.kind != "none"}
        if not self.has_input:
            out["note"] = "no audio input (visual-only model): the perturbation changes nothing"
        if self.sources:
            out["swap_sources"] = dict(sorted(self.sources.items()))
        return out
