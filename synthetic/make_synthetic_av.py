"""Generate the synthetic audio-visual text-to-video retrieval benchmark.

Each clip shows one coloured shape moving over a black or grey background; its soundtrack
is an informative sound event or irrelevant audio (noise, unrelated tones). What each clip
shows, sounds like and how it is captioned is planned in synthetic/design.py (docs/synthetic_benchmark.md,
"Synthetic benchmark: design"): twin groups share their visuals and are queried only by
captions that describe the sound; solo clips (unique visuals, informative sound) are queried
both by sound captions and by captions of the visuals alone; noise clips (unique visuals)
only by visual captions. Outputs (under --out_dir) use the MSR-VTT layout the real loaders
read (docs/design.md §9):

    videos/<video_id>.mp4          small silent videos (libx264 when available, else mpeg4)
    audio/<video_id>.wav           16 kHz mono PCM soundtracks
    MSRVTT_data.json               {"info", "videos", "sentences": [{video_id, caption, sen_id}]}
    MSRVTT_train.9k.csv            column video_id (every training render)
    MSRVTT_JSFUSION_test.csv       key, vid_key, video_id, sentence: one row per test caption
                                   (several per test video; the loader groups them by video)
    metadata.json                  per video: split, category, visual attributes, sound,
                                   informative_audio, group_id, captions with their kind and
                                   mentions_sound; test_captions: the kind of every test CSV row
    audio_pretrain/<name>.wav      labelled clips for supervised pre-training of the audio trunk
    audio_pretrain_labels.json     {"classes", "informative", "clips": [{file, label, class}]}

The same --seed gives byte-identical files whatever --workers is. Usage:

    python -m synthetic.make_synthetic_av --out_dir data/synthetic_av
"""
import argparse
import json
import os
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

from atomic_io import write_text
from preprocess.compress_video import pick_video_codec
from synthetic.design import (STREAM_PRETRAIN, STREAM_RENDER, ClipPlan, SyntheticAVConfig,
                              design_counts, plan_benchmark, validate_design, visual_attributes)
from synthetic.vocab import (BACKGROUNDS, COLOURS, INFORMATIVE_SOUNDS, IRRELEVANT_SOUNDS, MOTIONS,
                             SHAPES, SOUND_EVENTS, SYNTHESIZERS)

VIDEO_DIR, AUDIO_DIR, PRETRAIN_DIR = "videos", "audio", "audio_pretrain"
PRETRAIN_LABELS = "audio_pretrain_labels.json"
# What the caption kinds and clip categories mean, written into metadata.json.
CATEGORY_DESCRIPTIONS = {
    "twin": "informative sound; shares its visuals with the other clips of its group_id; sound captions only",
    "solo": "informative sound; visuals unique in its split; sound captions and visual captions",
    "noise": "irrelevant audio; visuals unique in its split; visual captions only",
}
KIND_DESCRIPTIONS = {
    "sound": "describes the visuals and the clip's informative sound (twin and solo clips)",
    "visual_informative": "describes only the visuals of a solo clip whose informative sound is audible",
    "visual_noise": "describes only the visuals of a noise clip",
}

# --- visuals (lengths are fractions of the frame size) ---
COLOUR_RGB = {"red": (220, 40, 40), "orange": (245, 140, 20), "yellow": (230, 220, 40),
              "green": (40, 200, 60), "cyan": (40, 200, 220), "blue": (50, 90, 235),
              "purple": (160, 60, 210), "white": (235, 235, 235)}
COLOUR_JITTER = 15
# background -> (range of its grey level, range of each channel's offset from that level): with
# the gradient (at most +-0.71 * GRADIENT_MAX) black stays below ~60 and grey within ~80-145, so
# the two never overlap, and every jittered shape colour differs from both by at least ~40 on some
# channel (green on the brightest grey is the closest pair).
BACKGROUND_LEVELS = {"black": ((0.0, 25.0), (0.0, 20.0)), "grey": ((100.0, 125.0), (-6.0, 6.0))}
GRADIENT_MAX = 20.0
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


def validate_config(cfg: SyntheticAVConfig) -> None:
    """Raise ValueError naming the flag at fault."""
    validate_design(cfg)
    checks = (
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


# ----------------------------------------------------------------------------- frames

def _background(background: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """A random shade of the named background with a random linear brightness gradient
    -> float [S, S, 3]."""
    level_range, tint_range = BACKGROUND_LEVELS[background]
    base = rng.uniform(*level_range) + rng.uniform(*tint_range, size=3)
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
    background = _background(plan.background, cfg.size, rng)
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
    write_text(path, json.dumps(payload, indent=1) + "\n")


def _write_msrvtt_files(out_dir: str, videos: list) -> None:
    """MSRVTT_data.json (every caption of every video), the train list and the JSFUSION-style
    test CSV with one row per test caption."""
    sentences = [{"caption": caption.text, "video_id": plan.video_id(render)}
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
    rows = test_caption_rows(videos)
    pd.DataFrame({"key": [row["key"] for row in rows], "vid_key": [row["vid_key"] for row in rows],
                  "video_id": [row["video_id"] for row in rows],
                  "sentence": [row["caption"] for row in rows]}).to_csv(
        os.path.join(out_dir, "MSRVTT_JSFUSION_test.csv"), index=False)


def test_caption_rows(videos: list) -> list:
    """One dict per test caption, in the order of the test CSV's rows."""
    rows = []
    for plan, render in videos:
        if plan.split != "test":
            continue
        for caption in plan.captions:
            rows.append({"key": f"ret{len(rows)}", "vid_key": f"msr{plan.index}",
                         "video_id": plan.video_id(render), "caption": caption.text,
                         "mentions_sound": caption.mentions_sound, "kind": caption.kind})
    return rows


def _video_entry(plan: ClipPlan, render: int) -> dict:
    return {"clip_id": plan.clip_id, "split": plan.split, "render": render, "category": plan.category,
            **visual_attributes(plan), "sound": plan.sound, "informative_audio": plan.informative,
            "group_id": plan.group_id,
            "captions": [{"caption": c.text, "mentions_sound": c.mentions_sound, "kind": c.kind}
                         for c in plan.captions]}


def _write_metadata(out_dir: str, plans: list, videos: list, cfg: SyntheticAVConfig, codec: str) -> None:
    config = {k: v for k, v in asdict(cfg).items() if k != "workers"}  # workers never change output
    _write_json(os.path.join(out_dir, "metadata.json"), {
        "config": config,
        "codec": codec,
        "design": {"categories": CATEGORY_DESCRIPTIONS, "caption_kinds": KIND_DESCRIPTIONS,
                   "counts": design_counts(plans)},
        "vocabulary": {"shapes": SHAPES, "colours": COLOURS, "motions": MOTIONS, "backgrounds": BACKGROUNDS,
                       "informative_sounds": INFORMATIVE_SOUNDS, "irrelevant_sounds": IRRELEVANT_SOUNDS},
        "videos": {plan.video_id(render): _video_entry(plan, render) for plan, render in videos},
        "test_captions": test_caption_rows(videos),
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
    _write_metadata(out_dir, plans, videos, cfg, codec)
    _write_pretrain_labels(out_dir, cfg)
    return {"train_videos": sum(plan.split == "train" for plan, _ in videos),
            "test_videos": sum(plan.split == "test" for plan, _ in videos),
            "test_captions": sum(len(plan.captions) for plan, _ in videos if plan.split == "test"),
            "design": design_counts(plans), "pretrain_clips": cfg.audio_pretrain_clips, "codec": codec,
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
