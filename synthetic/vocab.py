"""Vocabulary of the synthetic audio-visual benchmark: visual attributes, sound events (with
the synthesizer that makes each one) and caption templates.

Every caption names all four visual attributes (shape, colour, motion, background), so the
text alone pins down a clip's visuals. A caption of the "sound" kind also names the clip's
informative sound event; a "visual" caption names no sound at all. Sound words never occur
in visual phrases, so a caption mentions sound exactly when it is of the sound kind.
"""
import itertools
from dataclasses import dataclass

import numpy as np
from scipy.signal import lfilter

SHAPES = ("circle", "square", "triangle", "diamond", "cross")
# Hues far apart (and each far from both backgrounds), so colour survives a 32x32 resize.
COLOURS = ("red", "orange", "yellow", "green", "cyan", "blue", "purple", "white")
BACKGROUNDS = ("black", "grey")
BACKGROUND_PHRASES = {
    "black": ("on a black background", "against a black backdrop"),
    "grey": ("on a grey background", "against a grey backdrop"),
}

# motion -> phrasings as (third person, gerund); left/right/up/down and grows/shrinks are
# pairwise time-reversals of each other, so only frame order tells them apart.
MOTION_PHRASES = {
    "left": (("moves left", "moving left"), ("slides to the left", "sliding to the left")),
    "right": (("moves right", "moving right"), ("slides to the right", "sliding to the right")),
    "up": (("moves up", "moving up"), ("travels upward", "travelling upward")),
    "down": (("moves down", "moving down"), ("travels downward", "travelling downward")),
    "grows": (("grows", "growing"), ("gets bigger", "getting bigger")),
    "shrinks": (("shrinks", "shrinking"), ("gets smaller", "getting smaller")),
}
MOTIONS = tuple(MOTION_PHRASES)
VISUAL_ATTRIBUTES = ("shape", "colour", "motion", "background")


def visual_combinations() -> list:
    """Every (shape, colour, motion, background), in a fixed order."""
    return list(itertools.product(SHAPES, COLOURS, MOTIONS, BACKGROUNDS))


@dataclass(frozen=True)
class SoundEvent:
    """One sound class. Args: name: class id string; informative: whether captions may describe
    it; phrases: noun phrases used in captions (empty for irrelevant sounds)."""

    name: str
    informative: bool
    phrases: tuple = ()


SOUND_EVENTS = (
    SoundEvent("low_beep", True, ("low beeps", "a low beeping")),
    SoundEvent("high_beep", True, ("high beeps", "a high beeping")),
    SoundEvent("fast_ticks", True, ("fast ticking", "quick ticks")),
    SoundEvent("slow_ticks", True, ("slow ticking", "slow ticks")),
    SoundEvent("rising_chirp", True, ("a rising whistle", "rising chirps")),
    SoundEvent("falling_chirp", True, ("a falling whistle", "falling chirps")),
    SoundEvent("hum", True, ("a steady hum", "a deep humming")),
    SoundEvent("white_noise", False),
    SoundEvent("brown_noise", False),
    SoundEvent("random_tones", False),
)
SOUND_BY_NAME = {event.name: event for event in SOUND_EVENTS}
INFORMATIVE_SOUNDS = tuple(e.name for e in SOUND_EVENTS if e.informative)
IRRELEVANT_SOUNDS = tuple(e.name for e in SOUND_EVENTS if not e.informative)

# Words that only sound phrases and sound templates use (tests check visual captions avoid them).
SOUND_WORDS = ("beeps", "beeping", "ticking", "ticks", "whistle", "chirps", "hum", "humming",
               "hear", "heard", "sound", "accompanied", "playing")

# {clause}: "a red circle moves left on a black background";
# {gerund}: "a red circle moving left on a black background"
VISUAL_TEMPLATES = (
    "{clause}",
    "{clause_the}",
    "there is {gerund}",
    "a video of {gerund}",
    "we see {gerund}",
)
SOUND_TEMPLATES = (
    "{clause} while you can hear {sound}",
    "{clause}, with {sound} playing",
    "{gerund} to the sound of {sound}",
    "you can hear {sound} as {clause_the}",
    "{gerund}, accompanied by {sound}",
    "{sound} can be heard while {clause}",
)


def _visual_slots(shape: str, colour: str, motion_phrase: tuple, background_phrase: str) -> dict:
    third_person, gerund = motion_phrase
    return {
        "clause": f"a {colour} {shape} {third_person} {background_phrase}",
        "clause_the": f"the {colour} {shape} {third_person} {background_phrase}",
        "gerund": f"a {colour} {shape} {gerund} {background_phrase}",
    }


def caption_variants(shape: str, colour: str, motion: str, background: str, sound=None) -> list:
    """Every caption realization of one clip's content, in a fixed order.

    Args:
        shape, colour, motion, background: visual attributes (entries of SHAPES, COLOURS,
            MOTIONS, BACKGROUNDS).
        sound: an informative sound name to describe, or None for a caption of the visuals only.
    """
    if sound is not None and not SOUND_BY_NAME[sound].informative:
        raise ValueError(f"sound {sound!r} is irrelevant audio; captions never describe it")
    sound_phrases = SOUND_BY_NAME[sound].phrases if sound is not None else ("",)
    templates = SOUND_TEMPLATES if sound is not None else VISUAL_TEMPLATES
    captions = []
    for template, motion_phrase, background_phrase, sound_phrase in itertools.product(
            templates, MOTION_PHRASES[motion], BACKGROUND_PHRASES[background], sound_phrases):
        slots = _visual_slots(shape, colour, motion_phrase, background_phrase)
        captions.append(template.format(sound=sound_phrase, **slots))
    return captions


# ----------------------------------------------------------------------------- sound synthesis
# Every synthesizer maps (times t [T] in seconds, rng) to a waveform [T] of arbitrary scale.
PITCH_JITTER = 0.08
LOW_BEEP_HZ, HIGH_BEEP_HZ = 440.0, 2000.0
BEEP_PERIOD_RANGE = (0.4, 0.6)
BEEP_LENGTH_RANGE = (0.12, 0.2)
RAMP_SECONDS = 0.005
FAST_TICK_HZ_RANGE, SLOW_TICK_HZ_RANGE = (7.0, 9.0), (1.8, 2.4)
TICK_DECAY_SECONDS, TICK_LENGTH_SECONDS = 0.006, 0.03
CHIRP_LOW_HZ, CHIRP_HIGH_HZ = 400.0, 3000.0
CHIRP_LENGTH_RANGE, CHIRP_GAP_RANGE = (0.7, 1.0), (0.1, 0.3)
HUM_HZ_RANGE = (100.0, 140.0)
HUM_HARMONICS = 5
TREMOLO_HZ, TREMOLO_DEPTH = 4.0, 0.1
BROWN_LEAK = 0.98
RANDOM_TONE_COUNT = 3
RANDOM_TONE_HZ_RANGE = (250.0, 3500.0)
RANDOM_TONE_AM_HZ_RANGE = (0.2, 1.0)


def _ramp_envelope(phase: np.ndarray, length: float) -> np.ndarray:
    """1 inside [0, length) with RAMP_SECONDS linear edges, 0 elsewhere; phase in seconds."""
    rising = np.minimum(phase, length - phase) / RAMP_SECONDS
    return np.clip(rising, 0.0, 1.0) * (phase < length)


def _beeps(t, rng, base_hz):
    freq = base_hz * rng.uniform(1 - PITCH_JITTER, 1 + PITCH_JITTER)
    period = rng.uniform(*BEEP_PERIOD_RANGE)
    phase = (t - rng.uniform(0, period)) % period
    return _ramp_envelope(phase, rng.uniform(*BEEP_LENGTH_RANGE)) * np.sin(2 * np.pi * freq * t)


def _ticks(t, rng, rate_range):
    """Clicks: one decaying noise burst repeated, so every tick reaches the same peak."""
    period = 1.0 / rng.uniform(*rate_range)
    phase = (t - rng.uniform(0, period)) % period
    step = t[1] - t[0]
    burst = rng.standard_normal(int(round(TICK_LENGTH_SECONDS / step)))
    index = np.minimum(np.round(phase / step).astype(int), len(burst) - 1)
    click = burst[index] * np.exp(-phase / TICK_DECAY_SECONDS)
    return np.where(phase < TICK_LENGTH_SECONDS, click, 0.0)


def _chirps(t, rng, rising):
    low = CHIRP_LOW_HZ * rng.uniform(1 - PITCH_JITTER, 1 + PITCH_JITTER)
    high = CHIRP_HIGH_HZ * rng.uniform(1 - PITCH_JITTER, 1 + PITCH_JITTER)
    start, end = (low, high) if rising else (high, low)
    length = rng.uniform(*CHIRP_LENGTH_RANGE)
    period = length + rng.uniform(*CHIRP_GAP_RANGE)
    phase = (t - rng.uniform(0, period)) % period
    ratio = end / start
    # exponential sweep: frequency start * ratio**(phase/length), phase integrated in closed form
    sweep_phase = 2 * np.pi * start * length / np.log(ratio) * (ratio ** (phase / length) - 1)
    return _ramp_envelope(phase, length) * np.sin(sweep_phase)


def _hum(t, rng):
    freq = rng.uniform(*HUM_HZ_RANGE)
    harmonics = np.arange(1, HUM_HARMONICS + 1)[:, None]
    phases = rng.uniform(0, 2 * np.pi, size=(HUM_HARMONICS, 1))
    tone = (np.sin(2 * np.pi * freq * harmonics * t[None, :] + phases) / harmonics).sum(axis=0)
    return tone * (1 + TREMOLO_DEPTH * np.sin(2 * np.pi * TREMOLO_HZ * t))


def _brown_noise(t, rng):
    brown = lfilter([1.0], [1.0, -BROWN_LEAK], rng.standard_normal(t.shape))
    return brown - brown.mean()


def _random_tones(t, rng):
    low, high = np.log(RANDOM_TONE_HZ_RANGE)
    freqs = np.exp(rng.uniform(low, high, size=(RANDOM_TONE_COUNT, 1)))
    am_freqs = rng.uniform(*RANDOM_TONE_AM_HZ_RANGE, size=(RANDOM_TONE_COUNT, 1))
    am_phases, phases = rng.uniform(0, 2 * np.pi, size=(2, RANDOM_TONE_COUNT, 1))
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * am_freqs * t[None, :] + am_phases)
    return (envelope * np.sin(2 * np.pi * freqs * t[None, :] + phases)).sum(axis=0)


SYNTHESIZERS = {
    "low_beep": lambda t, rng: _beeps(t, rng, LOW_BEEP_HZ),
    "high_beep": lambda t, rng: _beeps(t, rng, HIGH_BEEP_HZ),
    "fast_ticks": lambda t, rng: _ticks(t, rng, FAST_TICK_HZ_RANGE),
    "slow_ticks": lambda t, rng: _ticks(t, rng, SLOW_TICK_HZ_RANGE),
    "rising_chirp": lambda t, rng: _chirps(t, rng, rising=True),
    "falling_chirp": lambda t, rng: _chirps(t, rng, rising=False),
    "hum": _hum,
    "white_noise": lambda t, rng: rng.standard_normal(t.shape),
    "brown_noise": _brown_noise,
    "random_tones": _random_tones,
}
