"""Generate the synthetic audio-visual text-to-video retrieval benchmark.

Each clip shows one coloured shape in motion; its soundtrack is either an informative sound
event that the captions describe, or irrelevant audio (noise, unrelated tones) the captions
never mention. Informative clips come in groups that share their visuals exactly and differ
only in sound, so ranking the right one first needs the audio. Outputs (under --out_dir)
use the MSR-VTT layout the real loaders read (DESIGN.md section 9):

    videos/<video_id>.mp4          small silent videos (libx264 when available, else mpeg4)
    audio/<video_id>.wav           16 kHz mono PCM soundtracks
    MSRVTT_data.json               {"info", "videos", "sentences": [{video_id, caption, sen_id}]}
    MSRVTT_train.9k.csv            column video_id (every training render)
    MSRVTT_JSFUSION_test.csv       key, vid_key, video_id, sentence (one caption per test video)
    metadata.json                  per video: split, visual attributes, sound, informative_audio
    audio_pretrain/<name>.wav      labelled clips for supervised pre-training of the audio trunk
    audio_pretrain_labels.json     {"classes", "informative", "clips": [{file, label, class}]}

The same --seed gives byte-identical files whatever --workers is. Usage:

    python -m synthetic.make_synthetic_av --out_dir data/synthetic_av
"""
import argparse
import itertools
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from multiprocessing import Pool
from typing import Optional

import av
import cv2
import numpy as np
import pandas as pd
import soundfile as sf
from tqdm import tqdm

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from preprocess.compress_video import pick_video_codec  # noqa: E402
from synthetic.vocab import (COLOURS, INFORMATIVE_SOUNDS, IRRELEVANT_SOUNDS, MOTIONS,  # noqa: E402
                             SHAPES, SOUND_EVENTS, SYNTHESIZERS, caption_variants)

VIDEO_DIR, AUDIO_DIR, PRETRAIN_DIR = "videos", "audio", "audio_pretrain"
PRETRAIN_LABELS = "audio_pretrain_labels.json"
# SeedSequence tags: planning, per-render jitter and pre-training audio draw independent streams.
STREAM_PLAN, STREAM_RENDER, STREAM_PRETRAIN = 0, 1, 2
TEST_SPLIT_TAG, TRAIN_SPLIT_TAG = 0, 1

# --- visuals (lengths are fractions of the frame size) ---
COLOUR_RGB = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 90, 235),
              "yellow": (230, 220, 40), "purple": (160, 60, 210), "white": (235, 235, 235)}
COLOUR_JITTER = 15
BACKGROUND_MAX = 60.0
GRADIENT_MAX = 25.0
FRAME_NOISE_STD = 2.0
RADIUS_RANGE = (0.10, 0.14)
GROW_RADIUS_RANGE = (0.07, 0.26)
TRAVEL_RANGE = (0.40, 0.55)
CROSS_OFFSET_RANGE = 0.22
ALONG_OFFSET_RANGE = 0.05
CENTRE_JITTER = 0.10
SUBPIXEL_BITS = 4
TRANSLATIONS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}
_ARM = 0.35
SHAPE_POLYGONS = {  # outlines in units of the radius, centred on the origin
    "square": 0.85 * np.array([(-1, -1), (1, -1), (1, 1), (-1, 1)], dtype=np.float64),
    "triangle": 1.1 * np.array([(np.cos(a), np.sin(a)) for a in np.radians([-90, 30, 150])]),
    "diamond": 1.15 * np.array([(0, -1), (1, 0), (0, 1), (-1, 0)], dtype=np.float64),
    "cross": np.array([(-_ARM, -1), (_ARM, -1), (_ARM, -_ARM), (1, -_ARM), (1, _ARM), (_ARM, _ARM),
                       (_ARM, 1), (-_ARM, 1), (-_ARM, _ARM), (-1, _ARM), (-1, -_ARM),
                       (-_ARM, -_ARM)], dtype=np.float64),
}
MPEG4_BIT_RATE = 200_000
# x264's macroblock-tree rate control reads uninitialized lookahead memory on frames under ~128 px,
# so identical input gave different bytes depending on earlier allocations; without it the output
# is reproducible.
X264_PARAMS = "mbtree=0"

# --- audio ---
PEAK_LEVEL_RANGE = (0.3, 0.6)
FLOOR_SNR_DB_RANGE = (25.0, 40.0)


@dataclass
class SyntheticAVConfig:
    """Generator settings (every field is a CLI flag of the same name).

    Args:
        num_train_clips / num_test_clips: distinct clips per split before rendering.
        train_renders: renders per training clip (fresh jitter each, own video_id, same captions).
        informative_fraction: share of clips whose soundtrack is described by the captions.
        group_size: informative clips sharing one visual combination, each with its own sound.
        captions_per_clip: captions per clip in MSRVTT_data.json (the test CSV uses the first).
        audio_pretrain_clips: labelled wavs for audio-trunk pre-training (0 = none).
        size: frame height = width in pixels (even); seconds / fps: clip length and frame rate.
        sample_rate: wav sample rate; seed: makes the output reproducible byte for byte.
        workers: parallel processes (does not change the output); codec: auto|libx264|mpeg4.
        crf: libx264 constant rate factor.
    """

    num_train_clips: int = 500
    num_test_clips: int = 100
    train_renders: int = 3
    informative_fraction: float = 0.5
    group_size: int = 3
    captions_per_clip: int = 5
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
class ClipPlan:
    """Content of one clip (shared by all its renders)."""

    index: int
    split: str
    shape: str
    colour: str
    motion: str
    sound: str
    informative: bool
    group_id: int
    captions: tuple

    @property
    def clip_id(self) -> str:
        return f"syn{self.index:05d}"

    def video_id(self, render: int) -> str:
        return f"{self.clip_id}_r{render}"


def validate_config(cfg: SyntheticAVConfig) -> None:
    """Raise ValueError naming the flag at fault."""
    checks = (
        (cfg.num_train_clips >= 1 and cfg.num_test_clips >= 1,
         "--num_train_clips and --num_test_clips must be >= 1"),
        (cfg.train_renders >= 1, "--train_renders must be >= 1"),
        (0.0 <= cfg.informative_fraction <= 1.0, "--informative_fraction must lie in [0, 1]"),
        (1 <= cfg.group_size <= len(INFORMATIVE_SOUNDS),
         f"--group_size must lie in [1, {len(INFORMATIVE_SOUNDS)}] (one distinct sound per member)"),
        (cfg.captions_per_clip >= 1, "--captions_per_clip must be >= 1"),
        (cfg.audio_pretrain_clips >= 0, "--audio_pretrain_clips must be >= 0"),
        (cfg.size >= 16 and cfg.size % 2 == 0, "--size must be even and >= 16 (yuv420p)"),
        (cfg.seconds > 0 and cfg.fps >= 1 and round(cfg.seconds * cfg.fps) >= 2,
         "--seconds * --fps must give at least 2 frames"),
        (cfg.sample_rate >= 8000, "--sample_rate must be >= 8000"),
        (cfg.codec in ("auto", "libx264", "mpeg4"), "--codec must be auto, libx264 or mpeg4"),
    )
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


def num_frames(cfg: SyntheticAVConfig) -> int:
    return int(round(cfg.seconds * cfg.fps))


def num_samples(cfg: SyntheticAVConfig) -> int:
    return int(round(cfg.seconds * cfg.sample_rate))


def resolve_codec(requested: str) -> str:
    """--codec auto: libx264 when PyAV's ffmpeg has it, else mpeg4; an explicit codec must exist."""
    if requested == "auto":
        return pick_video_codec()
    if requested not in av.codecs_available:
        raise ValueError(f"--codec {requested}: PyAV's ffmpeg has no such encoder; use --codec auto")
    return requested


# ----------------------------------------------------------------------------- planning

def _group_sizes(num_informative: int, group_size: int) -> list:
    """Split informative clips into shared-visual groups; a remainder of one joins the last group
    when a distinct sound is left for it."""
    sizes = [group_size] * (num_informative // group_size)
    remainder = num_informative % group_size
    if remainder == 1 and sizes and group_size < len(INFORMATIVE_SOUNDS):
        sizes[-1] += 1
    elif remainder:
        sizes.append(remainder)
    return sizes


def _visual_combos(num_groups: int, rng: np.random.Generator) -> list:
    """One (shape, colour, motion) per group; all combinations are used before any repeats."""
    combos = list(itertools.product(SHAPES, COLOURS, MOTIONS))
    rounds = -(-num_groups // len(combos))
    order = np.concatenate([rng.permutation(len(combos)) for _ in range(rounds)])
    return [combos[i] for i in order[:num_groups]]


def _pick_captions(shape, colour, motion, sound, count, rng) -> tuple:
    variants = caption_variants(shape, colour, motion, sound)
    order = rng.permutation(len(variants))
    return tuple(variants[order[i % len(variants)]] for i in range(count))


def plan_split(split: str, num_clips: int, first_index: int, first_group: int,
               cfg: SyntheticAVConfig) -> list:
    """Content of every clip of one split.

    Args:
        split: "train" or "test"; num_clips: clips in the split.
        first_index / first_group: numbering offsets so ids are unique across splits.
    """
    split_tag = TRAIN_SPLIT_TAG if split == "train" else TEST_SPLIT_TAG
    rng = np.random.default_rng([cfg.seed, STREAM_PLAN, split_tag])
    num_informative = int(round(num_clips * cfg.informative_fraction))
    groups = [(True, size) for size in _group_sizes(num_informative, cfg.group_size)]
    groups += [(False, 1)] * (num_clips - num_informative)
    order = rng.permutation(len(groups))
    combos = _visual_combos(len(groups), rng)
    plans = []
    for group_offset, (group_index, combo) in enumerate(zip(order, combos)):
        informative, size = groups[group_index]
        pool = INFORMATIVE_SOUNDS if informative else IRRELEVANT_SOUNDS
        sounds = rng.choice(pool, size=size, replace=False)
        for sound in sounds:
            captions = _pick_captions(*combo, str(sound) if informative else None,
                                      cfg.captions_per_clip, rng)
            plans.append(ClipPlan(first_index + len(plans), split, *combo, str(sound),
                                  informative, first_group + group_offset, captions))
    return plans


def plan_benchmark(cfg: SyntheticAVConfig) -> list:
    """Train clips first, then test clips; clip indices and group ids never overlap."""
    train = plan_split("train", cfg.num_train_clips, 0, 0, cfg)
    first_group = max(p.group_id for p in train) + 1
    return train + plan_split("test", cfg.num_test_clips, len(train), first_group, cfg)


# ----------------------------------------------------------------------------- frames

def _background(size: int, rng: np.random.Generator) -> np.ndarray:
    """Dark random colour with a random linear brightness gradient -> float [S, S, 3]."""
    base = rng.uniform(0.0, BACKGROUND_MAX, size=3)
    angle = rng.uniform(0.0, 2 * np.pi)
    coords = (np.arange(size) + 0.5) / size - 0.5
    ramp = np.cos(angle) * coords[None, :] + np.sin(angle) * coords[:, None]
    return base[None, None, :] + rng.uniform(0.0, GRADIENT_MAX) * ramp[:, :, None]


def _trajectory(motion: str, count: int, size: int, rng: np.random.Generator):
    """Shape centres [count, 2] (x, y pixels) and radii [count] over the clip."""
    progress = np.linspace(0.0, 1.0, count)
    if motion in TRANSLATIONS:
        direction = np.array(TRANSLATIONS[motion])
        across = np.array([direction[1], direction[0]])
        travel = rng.uniform(*TRAVEL_RANGE)
        start = (0.5 - direction * travel / 2 + direction * rng.uniform(-1, 1) * ALONG_OFFSET_RANGE
                 + across * rng.uniform(-1, 1) * CROSS_OFFSET_RANGE)
        centres = start[None, :] + direction[None, :] * travel * progress[:, None]
        radii = np.full(count, rng.uniform(*RADIUS_RANGE))
    else:
        small, large = GROW_RADIUS_RANGE
        centre = 0.5 + rng.uniform(-CENTRE_JITTER, CENTRE_JITTER, size=2)
        centres = np.repeat(centre[None, :], count, axis=0)
        grow = progress if motion == "grows" else 1.0 - progress
        radii = small + (large - small) * grow
    return centres * size, radii * size


def _draw_shape(image: np.ndarray, shape: str, centre: np.ndarray, radius: float, rgb) -> None:
    """Anti-aliased filled shape drawn in place at sub-pixel precision."""
    scale = 1 << SUBPIXEL_BITS
    colour = tuple(int(c) for c in rgb)
    if shape == "circle":
        cv2.circle(image, tuple(int(v) for v in np.round(centre * scale)), int(round(radius * scale)),
                   colour, thickness=-1, lineType=cv2.LINE_AA, shift=SUBPIXEL_BITS)
        return
    points = np.round((centre + radius * SHAPE_POLYGONS[shape]) * scale).astype(np.int32)
    cv2.fillPoly(image, [points], colour, lineType=cv2.LINE_AA, shift=SUBPIXEL_BITS)


def render_frames(plan: ClipPlan, cfg: SyntheticAVConfig, rng: np.random.Generator) -> np.ndarray:
    """RGB frames [N, S, S, 3] uint8 of one render."""
    count = num_frames(cfg)
    background = _background(cfg.size, rng)
    rgb = np.clip(np.array(COLOUR_RGB[plan.colour]) + rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1,
                                                                     size=3), 0, 255)
    centres, radii = _trajectory(plan.motion, count, cfg.size, rng)
    frames = np.empty((count, cfg.size, cfg.size, 3), dtype=np.uint8)
    for k in range(count):
        image = np.clip(background, 0, 255).astype(np.uint8)
        _draw_shape(image, plan.shape, centres[k], radii[k], rgb)
        noisy = image + rng.normal(0.0, FRAME_NOISE_STD, size=image.shape)
        frames[k] = np.clip(np.round(noisy), 0, 255).astype(np.uint8)
    return frames


def write_video(path: str, frames: np.ndarray, fps: int, codec: str, crf: int) -> None:
    """Encode frames [N, S, S, 3] uint8 as yuv420p; one encoder thread keeps the bytes reproducible."""
    with av.open(path, mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.codec_context.thread_count = 1
        if codec == "libx264":
            stream.options = {"crf": str(crf), "x264-params": X264_PARAMS}
        else:
            stream.bit_rate = MPEG4_BIT_RATE
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


# ----------------------------------------------------------------------------- audio

def synthesize_audio(sound: str, cfg: SyntheticAVConfig, rng: np.random.Generator) -> np.ndarray:
    """Sound event at a random level over a faint white-noise floor -> float32 [T] in [-1, 1]."""
    t = np.arange(num_samples(cfg)) / cfg.sample_rate
    event = SYNTHESIZERS[sound](t, rng)
    level = rng.uniform(*PEAK_LEVEL_RANGE)
    event = event * (level / max(np.abs(event).max(), np.finfo(np.float32).eps))
    floor = level * 10 ** (-rng.uniform(*FLOOR_SNR_DB_RANGE) / 20)
    wave = event + floor * rng.standard_normal(t.shape)
    return np.clip(wave, -1.0, 1.0).astype(np.float32)


def write_wav(path: str, wave: np.ndarray, sample_rate: int) -> None:
    sf.write(path, wave, sample_rate, subtype="PCM_16")


# ----------------------------------------------------------------------------- jobs

@dataclass(frozen=True)
class RenderJob:
    """One rendered training/test video (plan + render index) or one pre-training wav (plan None)."""

    out_dir: str
    cfg: SyntheticAVConfig
    codec: str
    plan: Optional[ClipPlan] = None
    render: int = 0
    pretrain_index: int = 0


def pretrain_classes() -> tuple:
    """Class ids of the pre-training labels: every sound event, irrelevant ones included."""
    return tuple(event.name for event in SOUND_EVENTS)


def pretrain_file(index: int) -> str:
    return f"pre{index:05d}.wav"


def run_job(job: RenderJob) -> None:
    """Render one video + soundtrack, or one pre-training wav; seeded by its own identity only."""
    cfg = job.cfg
    if job.plan is None:
        rng = np.random.default_rng([cfg.seed, STREAM_PRETRAIN, job.pretrain_index])
        sound = pretrain_classes()[job.pretrain_index % len(pretrain_classes())]
        path = os.path.join(job.out_dir, PRETRAIN_DIR, pretrain_file(job.pretrain_index))
        write_wav(path, synthesize_audio(sound, cfg, rng), cfg.sample_rate)
        return
    rng = np.random.default_rng([cfg.seed, STREAM_RENDER, job.plan.index, job.render])
    video_id = job.plan.video_id(job.render)
    frames = render_frames(job.plan, cfg, rng)
    write_video(os.path.join(job.out_dir, VIDEO_DIR, video_id + ".mp4"), frames, cfg.fps, job.codec,
                cfg.crf)
    write_wav(os.path.join(job.out_dir, AUDIO_DIR, video_id + ".wav"),
              synthesize_audio(job.plan.sound, cfg, rng), cfg.sample_rate)


def rendered_videos(plans: list, cfg: SyntheticAVConfig) -> list:
    """(plan, render index) of every video: train clips cfg.train_renders times, test clips once."""
    return [(plan, render) for plan in plans
            for render in range(cfg.train_renders if plan.split == "train" else 1)]


def _run_all(jobs: list, workers: int) -> None:
    if workers <= 1:
        for job in tqdm(jobs, desc="render"):
            run_job(job)
        return
    with Pool(workers) as pool:
        for _ in tqdm(pool.imap_unordered(run_job, jobs, chunksize=8), total=len(jobs), desc="render"):
            pass


# ----------------------------------------------------------------------------- tables

def _write_json(path: str, payload: dict) -> None:
    with open(path, "w") as handle:
        json.dump(payload, handle, indent=1)
        handle.write("\n")


def _write_msrvtt_files(out_dir: str, videos: list) -> None:
    """MSRVTT_data.json (every caption of every video), the train list and the 1k-A style test CSV."""
    sentences = [{"caption": caption, "video_id": plan.video_id(render)}
                 for plan, render in videos for caption in plan.captions]
    for sen_id, sentence in enumerate(sentences):
        sentence["sen_id"] = sen_id
    _write_json(os.path.join(out_dir, "MSRVTT_data.json"), {
        "info": {"description": "synthetic audio-visual benchmark (synthetic/make_synthetic_av.py)"},
        "videos": [{"video_id": plan.video_id(render), "split": plan.split, "id": n}
                   for n, (plan, render) in enumerate(videos)],
        "sentences": sentences,
    })
    train_ids = [plan.video_id(render) for plan, render in videos if plan.split == "train"]
    pd.DataFrame({"video_id": train_ids}).to_csv(os.path.join(out_dir, "MSRVTT_train.9k.csv"),
                                                 index=False)
    test = [plan for plan, _ in videos if plan.split == "test"]
    pd.DataFrame({"key": [f"ret{n}" for n in range(len(test))],
                  "vid_key": [f"msr{plan.index}" for plan in test],
                  "video_id": [plan.video_id(0) for plan in test],
                  "sentence": [plan.captions[0] for plan in test]}).to_csv(
        os.path.join(out_dir, "MSRVTT_JSFUSION_test.csv"), index=False)


def _write_metadata(out_dir: str, videos: list, cfg: SyntheticAVConfig, codec: str) -> None:
    config = {k: v for k, v in asdict(cfg).items() if k != "workers"}  # workers never change output
    _write_json(os.path.join(out_dir, "metadata.json"), {
        "config": config,
        "codec": codec,
        "vocabulary": {"shapes": SHAPES, "colours": COLOURS, "motions": MOTIONS,
                       "informative_sounds": INFORMATIVE_SOUNDS, "irrelevant_sounds": IRRELEVANT_SOUNDS},
        "videos": {plan.video_id(render): {
            "clip_id": plan.clip_id, "split": plan.split, "render": render, "shape": plan.shape,
            "colour": plan.colour, "motion": plan.motion, "sound": plan.sound,
            "informative_audio": plan.informative, "group_id": plan.group_id}
            for plan, render in videos},
    })


def _write_pretrain_labels(out_dir: str, cfg: SyntheticAVConfig) -> None:
    classes = pretrain_classes()
    _write_json(os.path.join(out_dir, PRETRAIN_LABELS), {
        "sample_rate": cfg.sample_rate,
        "classes": classes,
        "informative": [event.informative for event in SOUND_EVENTS],
        "clips": [{"file": pretrain_file(i), "label": i % len(classes), "class": classes[i % len(classes)]}
                  for i in range(cfg.audio_pretrain_clips)],
    })


def generate(out_dir: str, cfg: SyntheticAVConfig) -> dict:
    """Write the whole benchmark under out_dir; returns counts and the wall time in seconds."""
    validate_config(cfg)
    start = time.time()
    codec = resolve_codec(cfg.codec)
    for sub in (VIDEO_DIR, AUDIO_DIR, PRETRAIN_DIR):
        os.makedirs(os.path.join(out_dir, sub), exist_ok=True)
    plans = plan_benchmark(cfg)
    videos = rendered_videos(plans, cfg)
    jobs = [RenderJob(out_dir, cfg, codec, plan=plan, render=render) for plan, render in videos]
    jobs += [RenderJob(out_dir, cfg, codec, pretrain_index=i) for i in range(cfg.audio_pretrain_clips)]
    _run_all(jobs, cfg.workers)
    _write_msrvtt_files(out_dir, videos)
    _write_metadata(out_dir, videos, cfg, codec)
    _write_pretrain_labels(out_dir, cfg)
    return {"train_videos": sum(plan.split == "train" for plan, _ in videos),
            "test_videos": sum(plan.split == "test" for plan, _ in videos),
            "pretrain_clips": cfg.audio_pretrain_clips, "codec": codec,
            "seconds": round(time.time() - start, 1)}


def parse_args(argv=None) -> tuple:
    defaults = SyntheticAVConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out_dir", required=True, help="output folder (created if missing)")
    for name, value in asdict(defaults).items():
        parser.add_argument(f"--{name}", type=type(value), default=value, help=f"default: {value}")
    args = parser.parse_args(argv)
    out_dir = args.out_dir
    del args.out_dir
    return out_dir, SyntheticAVConfig(**vars(args))


def main(argv=None) -> dict:
    out_dir, cfg = parse_args(argv)
    summary = generate(out_dir, cfg)
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
