"""Content plan of the synthetic benchmark: which clips exist, what they show and sound like,
and how each is captioned (docs/synthetic_benchmark.md, "Design: audio relevance depends on the query"). Rendering is elsewhere
(synthetic/make_synthetic_av.py); this module draws no pixels and no samples.

Every split holds clips of three categories:

- ``twin``: informative sound, in groups of ``group_size`` clips with exactly the same
  visuals and distinct sounds. Captioned only with sound captions: a caption that ignored
  the sound would have several correct videos.
- ``solo``: informative sound, visuals unique in the split. ``solo_sound_captions`` of its
  captions describe the sound, the others only the visuals, so the same video is queried
  with and without its sound; a visual caption has exactly one correct video.
- ``noise``: irrelevant audio (white/brown noise, unrelated tones), visuals unique in the
  split, visual captions only.

Caption kinds (the study's subsets): ``sound`` (twins and solos), ``visual_informative``
(visual captions of solo clips: a distinctive sound is audible but the query ignores it)
and ``visual_noise`` (captions of noise clips).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from synthetic.vocab import (INFORMATIVE_SOUNDS, IRRELEVANT_SOUNDS, VISUAL_ATTRIBUTES, caption_variants,
                             visual_combinations)

TWIN, SOLO, NOISE = "twin", "solo", "noise"
CATEGORIES = (TWIN, SOLO, NOISE)
KIND_SOUND, KIND_VISUAL_INFORMATIVE, KIND_VISUAL_NOISE = "sound", "visual_informative", "visual_noise"
CAPTION_KINDS = (KIND_SOUND, KIND_VISUAL_INFORMATIVE, KIND_VISUAL_NOISE)
# SeedSequence tags: planning, per-render jitter and pre-training audio draw independent streams.
STREAM_PLAN, STREAM_RENDER, STREAM_PRETRAIN = 0, 1, 2
TEST_SPLIT_TAG, TRAIN_SPLIT_TAG = 0, 1


@dataclass
class SyntheticAVConfig:
    """Generator settings (every field is a CLI flag of the same name).

    Args:
        num_train_clips / num_test_clips: distinct clips per split before rendering.
        train_renders: renders per training clip (fresh jitter each, own video_id, same captions).
        twin_fraction: share of a split's clips in twin groups (rounded to whole groups).
        noise_fraction: share of a split's clips with irrelevant audio; the rest are solo clips.
        group_size: clips per twin group, each with its own informative sound.
        captions_per_clip: captions of every clip (all in MSRVTT_data.json; the test CSV lists
            every caption of every test clip).
        solo_sound_captions: how many of a solo clip's captions describe its sound (the
            others describe only the visuals); at least 1 and fewer than captions_per_clip.
        audio_pretrain_clips: labelled wavs for audio-trunk pre-training (0 = none).
        size: frame height = width in pixels (even); seconds / fps: clip length and frame rate.
        sample_rate: wav sample rate; seed: makes the output reproducible byte for byte.
        workers: parallel processes (does not change the output); codec: auto|libx264|mpeg4.
        crf: libx264 constant rate factor.
    """

    num_train_clips: int = 540
    num_test_clips: int = 540
    train_renders: int = 3
    twin_fraction: float = 1 / 3
    noise_fraction: float = 1 / 3
    group_size: int = 3
    captions_per_clip: int = 3
    solo_sound_captions: int = 1
    audio_pretrain_clips: int = 400
    size: int = 64
    seconds: float = 5.0
    fps: int = 4
    sample_rate: int = 16000
    seed: int = 0
    workers: int = 2
    codec: str = "auto"
    crf: int = 28


@dataclass(frozen=True)
class Caption:
    """One caption. Args: text: the sentence; kind: one of CAPTION_KINDS."""

    text: str
    kind: str

    @property
    def mentions_sound(self) -> bool:
        return self.kind == KIND_SOUND


@dataclass(frozen=True)
class ClipPlan:
    """Content of one clip (shared by all its renders).

    Args:
        index: clip number (unique over both splits); split: "train" or "test".
        shape, colour, motion, background: visual attributes; sound: sound event name.
        category: one of CATEGORIES; group_id: clips sharing visuals share it (twins), every
            other clip has its own (unique over both splits).
        captions: Caption tuple, captions_per_clip long.
    """

    index: int
    split: str
    shape: str
    colour: str
    motion: str
    background: str
    sound: str
    category: str
    group_id: int
    captions: tuple

    @property
    def informative(self) -> bool:
        return self.category != NOISE

    @property
    def visuals(self) -> tuple:
        return self.shape, self.colour, self.motion, self.background

    @property
    def clip_id(self) -> str:
        return f"syn{self.index:05d}"

    def video_id(self, render: int) -> str:
        return f"{self.clip_id}_r{render}"


def category_counts(num_clips: int, cfg: SyntheticAVConfig) -> dict:
    """Clips per category of a split: whole twin groups nearest twin_fraction, noise clips
    nearest noise_fraction, the rest solo (twin groups shrink if the rest would be negative)."""
    noise = int(round(num_clips * cfg.noise_fraction))
    groups = min(int(round(num_clips * cfg.twin_fraction / cfg.group_size)),
                 (num_clips - noise) // cfg.group_size)
    twins = groups * cfg.group_size
    return {TWIN: twins, SOLO: num_clips - twins - noise, NOISE: noise}


def visual_groups(num_clips: int, cfg: SyntheticAVConfig) -> int:
    """Distinct visual combinations a split of num_clips needs (one per twin group, solo, noise clip)."""
    counts = category_counts(num_clips, cfg)
    return counts[TWIN] // cfg.group_size + counts[SOLO] + counts[NOISE]


def validate_design(cfg: SyntheticAVConfig) -> None:
    """Raise ValueError naming the flag at fault (planning settings only)."""
    available = len(visual_combinations())
    visual_variants = len(caption_variants(*visual_combinations()[0]))  # the same for every clip
    checks = (
        (cfg.num_train_clips >= 1 and cfg.num_test_clips >= 1,
         "--num_train_clips and --num_test_clips must be >= 1"),
        (cfg.train_renders >= 1, "--train_renders must be >= 1"),
        (0.0 <= cfg.twin_fraction and 0.0 <= cfg.noise_fraction and cfg.twin_fraction + cfg.noise_fraction <= 1.0,
         "--twin_fraction and --noise_fraction must be >= 0 with a sum <= 1"),
        (2 <= cfg.group_size <= len(INFORMATIVE_SOUNDS),
         f"--group_size must lie in [2, {len(INFORMATIVE_SOUNDS)}] (one distinct sound per twin)"),
        (1 <= cfg.solo_sound_captions < cfg.captions_per_clip,
         "--solo_sound_captions must be >= 1 and < --captions_per_clip (solo clips get both kinds)"),
        (cfg.captions_per_clip <= visual_variants,
         f"--captions_per_clip must be <= {visual_variants}, the distinct visual captions of one clip"),
        (visual_groups(cfg.num_train_clips, cfg) <= available,
         f"--num_train_clips {cfg.num_train_clips} needs {visual_groups(cfg.num_train_clips, cfg)} distinct "
         f"visual combinations, the vocabulary has {available}; lower it (or raise --train_renders)"),
        (visual_groups(cfg.num_test_clips, cfg) <= available,
         f"--num_test_clips {cfg.num_test_clips} needs {visual_groups(cfg.num_test_clips, cfg)} distinct "
         f"visual combinations, the vocabulary has {available}; lower it"),
    )
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


def _pick_captions(visuals: tuple, sound: str, kinds: list, rng: np.random.Generator) -> tuple:
    """Distinct captions, one of each requested kind in the given order."""
    with_sound = iter(rng.permutation(caption_variants(*visuals, sound)) if KIND_SOUND in kinds else ())
    visual_only = iter(rng.permutation(caption_variants(*visuals)))
    return tuple(Caption(str(next(with_sound if kind == KIND_SOUND else visual_only)), kind) for kind in kinds)


def _caption_kinds(category: str, cfg: SyntheticAVConfig, rng: np.random.Generator) -> list:
    """The kind of each caption of one clip; a solo clip's kinds come in random order."""
    if category == TWIN:
        return [KIND_SOUND] * cfg.captions_per_clip
    if category == NOISE:
        return [KIND_VISUAL_NOISE] * cfg.captions_per_clip
    kinds = np.array([KIND_SOUND] * cfg.solo_sound_captions
                     + [KIND_VISUAL_INFORMATIVE] * (cfg.captions_per_clip - cfg.solo_sound_captions))
    return [str(k) for k in kinds[rng.permutation(len(kinds))]]


def plan_split(split: str, num_clips: int, combos: list, first_index: int, first_group: int,
               cfg: SyntheticAVConfig, rng: np.random.Generator) -> list:
    """Content of every clip of one split.

    Args:
        split: "train" or "test"; num_clips: clips in the split.
        combos: distinct visual combinations, at least one per visual group, used in order.
        first_index / first_group: numbering offsets so ids are unique across splits.
        rng: the split's planning stream.
    """
    counts = category_counts(num_clips, cfg)
    groups = ([(TWIN, cfg.group_size)] * (counts[TWIN] // cfg.group_size)
              + [(SOLO, 1)] * counts[SOLO] + [(NOISE, 1)] * counts[NOISE])
    order = rng.permutation(len(groups))  # categories interleave in clip order
    plans = []
    for offset, group_index in enumerate(order):
        category, size = groups[group_index]
        pool = IRRELEVANT_SOUNDS if category == NOISE else INFORMATIVE_SOUNDS
        for sound in rng.choice(pool, size=size, replace=False):
            captions = _pick_captions(combos[offset], str(sound), _caption_kinds(category, cfg, rng), rng)
            plans.append(ClipPlan(first_index + len(plans), split, *combos[offset], str(sound), category,
                                  first_group + offset, captions))
    return plans


def plan_benchmark(cfg: SyntheticAVConfig) -> list:
    """Every clip: train clips first, then test clips; clip indices and group ids never overlap.

    The test split draws its visual combinations at random; the training split uses the test
    combinations first (in its own random order), then the others, so with at least as many
    training groups every test combination also occurs in training (in whatever category).
    """
    validate_design(cfg)
    all_combos = visual_combinations()
    test_rng = np.random.default_rng([cfg.seed, STREAM_PLAN, TEST_SPLIT_TAG])
    train_rng = np.random.default_rng([cfg.seed, STREAM_PLAN, TRAIN_SPLIT_TAG])
    test_order = test_rng.permutation(len(all_combos))[:visual_groups(cfg.num_test_clips, cfg)]
    rest = np.setdiff1d(np.arange(len(all_combos)), test_order)
    train_order = np.concatenate([train_rng.permutation(test_order), train_rng.permutation(rest)])
    train = plan_split("train", cfg.num_train_clips, [all_combos[i] for i in train_order], 0, 0, cfg, train_rng)
    first_group = max(p.group_id for p in train) + 1
    test = plan_split("test", cfg.num_test_clips, [all_combos[i] for i in test_order], len(train), first_group,
                      cfg, test_rng)
    return train + test


def design_counts(plans: list) -> dict:
    """Per split: clips per category, captions per kind, twin groups, distinct visual combinations."""
    out = {}
    for split in ("train", "test"):
        clips = [p for p in plans if p.split == split]
        out[split] = {
            "clips": len(clips),
            "clips_per_category": {c: sum(p.category == c for p in clips) for c in CATEGORIES},
            "twin_groups": len({p.group_id for p in clips if p.category == TWIN}),
            "captions": sum(len(p.captions) for p in clips),
            "captions_per_kind": {k: sum(c.kind == k for p in clips for c in p.captions) for k in CAPTION_KINDS},
            "distinct_visual_combinations": len({p.visuals for p in clips}),
        }
    return out


def visual_attributes(plan: ClipPlan) -> dict:
    """attribute name -> value, in VISUAL_ATTRIBUTES order."""
    return dict(zip(VISUAL_ATTRIBUTES, plan.visuals))
