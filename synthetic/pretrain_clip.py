"""Pre-train the tiny CLIP towers: a stand-in for OpenAI's web-scale CLIP pre-training.

The retrieval recipe fine-tunes CLIP at ``lr * coef_lr`` (1e-3 of the new modules' rate), so
its towers must arrive already knowing what frames show and what captions say. A random
tiny CLIP knows neither, and the synthetic benchmark then measures the fusion's capacity on
weak features instead of the method. This module gives the tiny towers what real CLIP has
before it ever sees a video dataset:

- **Images and their captions** (CLIP's symmetric InfoNCE): still frames rendered by the
  benchmark's own drawing code (one shape over a background, the frame size and jitter of a
  clip, a YUV 4:2:0 round trip like the clips' codec), each captioned with what a single frame
  shows: colour, shape, size, where it is, background. Nothing moves in a still, so no caption
  names a motion; nothing is heard, so no caption names a sound.
- **Language** (a text-side InfoNCE between two phrasings of the same content, SimCSE-style
  with paraphrases as positives): sentences naming a shape, colour, background, often a motion
  and often a sound event, in this module's own templates. A batch holds groups of sentences
  that share their visuals and differ only in the sound they name (or name none), so the text
  tower must tell sound words apart, as real CLIP's text tower, trained on web language, tells
  "a dog barking" from "a siren".

Nothing here is a benchmark clip or caption: images and sentences come from their own random
stream (``CORPUS_STREAM``, refused if it equals a benchmark stream), and every sentence is
checked against every caption the benchmark's templates can produce (an overlap is an error).
The result is written as a plain state dict with OpenAI's key names, read by
``modules.clip.load_clip_state_dict`` through ``--pretrained_clip_name`` like the released
file, with a JSON report beside it (held-out zero-shot accuracy per attribute, held-out
paraphrase retrieval, the named sound decoded from held-out caption embeddings, losses, time,
and the config). Calling ``pretrain_clip`` again with the same config and initial file reuses
the file; any other config rebuilds it.

    python -m synthetic.pretrain_clip --init_checkpoint demo_out/checkpoints/clip_tiny.pt \
        --out demo_out/checkpoints/clip_pretrained.pt

Shapes: N images or sentences, B batch, S image side, L tokens, D joint width, G groups, K
sentences per group.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from typing import Optional, Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import atomic_io
from dataloaders.video import normalize_frames, resize_center_crop
from modules.clip import CLIP, load_clip_state_dict
from modules.tokenization_clip import ClipTokenizer
from modules.weights import file_sha256
from synthetic.design import STREAM_PLAN, STREAM_PRETRAIN, STREAM_RENDER
from synthetic.make_synthetic_av import (COLOUR_JITTER, COLOUR_RGB, FRAME_NOISE_STD, GROW_RADIUS_RANGE,
                                         _background, _draw_shape)
from synthetic.pretrain_audio_trunk import warmup_cosine
from synthetic.vocab import (BACKGROUND_PHRASES, BACKGROUNDS, COLOURS, INFORMATIVE_SOUNDS, MOTION_PHRASES,
                             MOTIONS, SHAPES, SOUND_BY_NAME, caption_variants, visual_combinations)

# The benchmark draws plans, renders and audio pre-training clips from streams 0, 1, 2 of its
# SeedSequence; the CLIP corpus has its own.
BENCHMARK_STREAMS = (STREAM_PLAN, STREAM_RENDER, STREAM_PRETRAIN)
CORPUS_STREAM = 3
IMAGE_PART, TEXT_PART, HELD_OUT_PART, CAPTION_CHOICE_PART = 0, 1, 2, 3
REPORT_SUFFIX = ".json"

# What a single frame shows, in words: thirds of the frame and of the radius range.
HORIZONTAL = ("on the left", "in the middle", "on the right")
VERTICAL = ("near the top", "", "near the bottom")
SIZES = ("small", "medium-sized", "large")
STILL_TEMPLATES = ("a photo of a {size} {colour} {shape} {where} {background}",
                   "an image of a {size} {colour} {shape} {where} {background}",
                   "a {size} {colour} {shape} {where} {background}")
# Language corpus: this module's own phrasings (the benchmark's are in synthetic/vocab.py).
SENTENCE_TEMPLATES = ("a short clip: a {colour} {shape} that {motion} {background}",
                      "footage of a {colour} {shape} which {motion} {background}",
                      "in this clip a {colour} {shape} {motion} {background}")
STILL_SENTENCE_TEMPLATES = ("a short clip: a {colour} {shape} resting {background}",
                            "footage of a {colour} {shape} standing still {background}",
                            "in this clip a {colour} {shape} stays put {background}")
SOUND_SUFFIXES = (", and the soundtrack is {sound}", "; meanwhile there is {sound}",
                  ". on the audio track: {sound}")
NO_SOUND = None


@dataclass
class ClipPretrainConfig:
    """Pre-training settings (every field is a CLI flag of the same name).

    Args:
        steps: optimizer steps; batch_size: images (and sentences) per step.
        group_size: sentences per language group (same visuals, different or no sound).
        lr / warmup_steps / weight_decay: AdamW, linear warmup then cosine to 0.
        text_weight: weight of the language InfoNCE beside the image-caption InfoNCE.
        text_temperature: fixed temperature of the language InfoNCE.
        num_images: distinct training stills rendered once; held_out: stills and sentence
            groups kept out of training for the report.
        frame_size: rendered side in pixels (the benchmark's --size); image_resolution comes
            from the checkpoint.
        motion_fraction / sound_fraction: share of language sentences naming a motion / a sound.
        max_words: caption tokens (the retrieval default, 32).
        seed: corpus and initialization seed; stream: the corpus' SeedSequence stream (never a
            benchmark stream).
    """

    steps: int = 1500
    batch_size: int = 128
    group_size: int = 4
    lr: float = 1e-3
    warmup_steps: int = 50
    weight_decay: float = 0.05
    text_weight: float = 1.0
    text_temperature: float = 0.05
    num_images: int = 20000
    held_out: int = 1000
    frame_size: int = 64
    motion_fraction: float = 0.8
    sound_fraction: float = 0.7
    max_words: int = 32
    seed: int = 0
    stream: int = CORPUS_STREAM


def validate_config(cfg: ClipPretrainConfig) -> None:
    """Raise ValueError naming the flag at fault."""
    checks = (
        (cfg.stream not in BENCHMARK_STREAMS,
         f"--stream {cfg.stream} is a stream of the benchmark generator {BENCHMARK_STREAMS}: the corpus "
         f"would render benchmark clips; use another stream (default {CORPUS_STREAM})"),
        (cfg.steps >= 1 and cfg.batch_size >= 2, "--steps must be >= 1 and --batch_size >= 2"),
        (cfg.group_size >= 2 and cfg.batch_size % cfg.group_size == 0,
         "--group_size must be >= 2 and divide --batch_size"),
        (cfg.group_size <= len(INFORMATIVE_SOUNDS) + 1,
         f"--group_size must be <= {len(INFORMATIVE_SOUNDS) + 1} (distinct sounds plus none)"),
        (cfg.num_images >= cfg.batch_size and cfg.held_out >= 1,
         "--num_images must be >= --batch_size and --held_out >= 1"),
        (0.0 <= cfg.motion_fraction <= 1.0 and 0.0 <= cfg.sound_fraction <= 1.0,
         "--motion_fraction and --sound_fraction must lie in [0, 1]"),
        (cfg.text_weight >= 0.0 and cfg.text_temperature > 0.0,
         "--text_weight must be >= 0 and --text_temperature > 0"),
    )
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


def corpus_rng(cfg: ClipPretrainConfig, part: int, index: int) -> np.random.Generator:
    """The stream of one image or sentence group: [seed, stream, part, index]."""
    return np.random.default_rng([cfg.seed, cfg.stream, part, index])


# ----------------------------------------------------------------------------- stills

@dataclass(frozen=True)
class Still:
    """What one still shows. Args: shape, colour, background: vocabulary entries; column, row,
    size: thirds (0, 1, 2) of the frame's x, y and of the radius range."""

    shape: str
    colour: str
    background: str
    column: int
    row: int
    size: int

    def caption(self, template: str) -> str:
        where = " ".join(w for w in (HORIZONTAL[self.column], VERTICAL[self.row]) if w)
        return template.format(size=SIZES[self.size], colour=self.colour, shape=self.shape, where=where,
                               background=BACKGROUND_PHRASES[self.background][0])


def _third(value: float, low: float, high: float) -> int:
    return min(2, int(3 * (value - low) / (high - low)))


def render_still(cfg: ClipPretrainConfig, part: int, index: int) -> tuple[np.ndarray, Still]:
    """One still -> (RGB uint8 [S, S, 3] after a YUV 4:2:0 round trip, its content)."""
    rng = corpus_rng(cfg, part, index)
    shape, colour, background = (str(rng.choice(v)) for v in (SHAPES, COLOURS, BACKGROUNDS))
    radius = rng.uniform(*GROW_RADIUS_RANGE)
    centre = rng.uniform(0.15, 0.85, size=2)
    image = np.clip(_background(background, cfg.frame_size, rng), 0, 255).astype(np.uint8)
    rgb = np.clip(np.array(COLOUR_RGB[colour]) + rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, size=3), 0, 255)
    _draw_shape(image, shape, centre * cfg.frame_size, radius * cfg.frame_size, rgb)
    noisy = np.clip(np.round(image + rng.normal(0.0, FRAME_NOISE_STD, size=image.shape)), 0, 255).astype(np.uint8)
    # the clips are stored as yuv420p video: the stills lose the same chroma detail
    yuv = cv2.cvtColor(noisy, cv2.COLOR_RGB2YUV_I420)
    still = Still(shape, colour, background, _third(centre[0], 0.15, 0.85), _third(centre[1], 0.15, 0.85),
                  _third(radius, *GROW_RADIUS_RANGE))
    return cv2.cvtColor(yuv, cv2.COLOR_YUV2RGB_I420), still


def render_stills(cfg: ClipPretrainConfig, part: int, count: int, image_size: int) -> tuple[torch.Tensor, list]:
    """``count`` stills of one corpus part -> (uint8 [N, 3, S', S'] resized as the loader does, contents)."""
    frames, stills = [], []
    for index in tqdm(range(count), desc="CLIP corpus stills", unit="img", mininterval=2.0):
        frame, still = render_still(cfg, part, index)
        frames.append(frame)
        stills.append(still)
    return resize_center_crop(np.stack(frames), image_size), stills


# ----------------------------------------------------------------------------- language

@dataclass(frozen=True)
class Sentence:
    """Content of one language sentence. Args: visuals: (shape, colour, motion or None,
    background); sound: an informative sound name or None."""

    visuals: tuple
    sound: Optional[str]

    def phrasing(self, rng: np.random.Generator) -> str:
        shape, colour, motion, background = self.visuals
        background_phrase = str(rng.choice(BACKGROUND_PHRASES[background]))
        if motion is None:
            text = str(rng.choice(STILL_SENTENCE_TEMPLATES)).format(colour=colour, shape=shape,
                                                                      background=background_phrase)
        else:
            third_person = MOTION_PHRASES[motion][int(rng.integers(len(MOTION_PHRASES[motion])))][0]
            text = str(rng.choice(SENTENCE_TEMPLATES)).format(colour=colour, shape=shape, motion=third_person,
                                                                background=background_phrase)
        if self.sound is not None:
            sound_phrase = str(rng.choice(SOUND_BY_NAME[self.sound].phrases))
            text += str(rng.choice(SOUND_SUFFIXES)).format(sound=sound_phrase)
        return text


def sentence_group(cfg: ClipPretrainConfig, part: int, index: int) -> tuple[list, list]:
    """One language group: K sentences sharing their visuals, each naming another sound (or
    none) -> (two phrasings per sentence [[a, b] x K], contents [K])."""
    rng = corpus_rng(cfg, part, index)
    motion = str(rng.choice(MOTIONS)) if rng.random() < cfg.motion_fraction else None
    visuals = (str(rng.choice(SHAPES)), str(rng.choice(COLOURS)), motion, str(rng.choice(BACKGROUNDS)))
    with_sound = rng.random() < cfg.sound_fraction
    sounds = list(rng.choice(INFORMATIVE_SOUNDS, size=cfg.group_size, replace=False)) if with_sound else []
    if with_sound:
        sounds[int(rng.integers(cfg.group_size))] = NO_SOUND  # the same visuals without a sound word
    # without sounds the group is one sentence: it differs from the batch's others by its visuals
    contents = [Sentence(visuals, None if s is None else str(s)) for s in sounds] or [Sentence(visuals, None)]
    return [[c.phrasing(rng), c.phrasing(rng)] for c in contents], contents


def sentence_batch(cfg: ClipPretrainConfig, part: int, first_group: int, size: int) -> tuple[list, list, int]:
    """Groups from ``first_group`` on until ``size`` sentences -> (views a [B], views b [B], next group)."""
    views_a, views_b, group = [], [], first_group
    while len(views_a) < size:
        pairs, _ = sentence_group(cfg, part, group)
        for a, b in pairs[: size - len(views_a)]:
            views_a.append(a)
            views_b.append(b)
        group += 1
    return views_a, views_b, group


def benchmark_captions() -> set:
    """Every caption the benchmark's templates can produce (any clip, with or without sound)."""
    out = set()
    for combo in visual_combinations():
        out.update(caption_variants(*combo))
        for sound in INFORMATIVE_SOUNDS:
            out.update(caption_variants(*combo, sound))
    return out


def check_no_benchmark_text(texts: Sequence[str], forbidden: set) -> None:
    """Raise if a corpus sentence is a benchmark caption (the corpus may use the benchmark's
    words and sound phrases, never its captions)."""
    clash = [t for t in texts if t in forbidden]
    if clash:
        raise ValueError(f"{len(clash)} corpus sentences equal benchmark captions, e.g. {clash[0]!r}: "
                         "change STILL_TEMPLATES / SENTENCE_TEMPLATES in synthetic/pretrain_clip.py")


def all_corpus_phrasings() -> list:
    """Every sentence the language and still templates can produce (for the overlap check)."""
    texts = []
    for shape, colour, background in itertools.product(SHAPES, COLOURS, BACKGROUNDS):
        for template, phrase in itertools.product(STILL_SENTENCE_TEMPLATES, BACKGROUND_PHRASES[background]):
            texts.append(template.format(colour=colour, shape=shape, background=phrase))
        for motion, template, phrase in itertools.product(MOTIONS, SENTENCE_TEMPLATES, BACKGROUND_PHRASES[background]):
            for third_person, _ in MOTION_PHRASES[motion]:
                texts.append(template.format(colour=colour, shape=shape, motion=third_person, background=phrase))
        for template, size, column, row in itertools.product(STILL_TEMPLATES, range(3), range(3), range(3)):
            texts.append(Still(shape, colour, background, column, row, size).caption(template))
    base = list(texts)
    for text, sound in itertools.product(base, INFORMATIVE_SOUNDS):
        for phrase, suffix in itertools.product(SOUND_BY_NAME[sound].phrases, SOUND_SUFFIXES):
            texts.append(text + suffix.format(sound=phrase))
    return texts


# ----------------------------------------------------------------------------- training

class TokenCache:
    """Tokenizes each distinct sentence once. Args: tokenizer; max_words: L."""

    def __init__(self, tokenizer: ClipTokenizer, max_words: int):
        self.tokenizer, self.max_words, self.ids = tokenizer, max_words, {}

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        """texts [N] -> ids [N, L]."""
        missing = [t for t in dict.fromkeys(texts) if t not in self.ids]
        if missing:
            ids, _ = self.tokenizer.tokenize_batch(missing, self.max_words)
            self.ids.update(zip(missing, ids))
        return torch.stack([self.ids[t] for t in texts])


def symmetric_info_nce(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """CLIP's loss on matched rows of a [B, D] and b [B, D] (L2-normalized inside)."""
    logits = scale * F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).t()  # [B, B]
    targets = torch.arange(len(a), device=a.device)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets)) / 2


def image_input(frames: torch.Tensor) -> torch.Tensor:
    """uint8 [N, 3, S, S] -> CLIP-normalized float [N, 3, S, S] (the loader's normalization)."""
    mask = torch.ones(len(frames), dtype=torch.bool)
    return normalize_frames(frames, mask, frames.device)


def train(model: CLIP, frames: torch.Tensor, stills: list, tokens: TokenCache, cfg: ClipPretrainConfig) -> list:
    """cfg.steps AdamW steps of image-caption plus language InfoNCE; returns per-step losses."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, cfg.steps, cfg.warmup_steps))
    generator = torch.Generator().manual_seed(cfg.seed)
    caption_rng = np.random.default_rng([cfg.seed, cfg.stream, CAPTION_CHOICE_PART])
    text_scale = torch.tensor(1.0 / cfg.text_temperature)
    model.train()
    losses, group = [], 0
    progress = tqdm(range(cfg.steps), desc="CLIP pre-training", unit="step", mininterval=2.0)
    for _ in progress:
        batch = torch.randint(len(frames), (cfg.batch_size,), generator=generator)
        captions = [stills[i].caption(str(caption_rng.choice(STILL_TEMPLATES))) for i in batch.tolist()]
        image_loss = symmetric_info_nce(model.encode_image(image_input(frames[batch])),
                                        model.encode_text(tokens(captions)), model.logit_scale.exp())
        views_a, views_b, group = sentence_batch(cfg, TEXT_PART, group, cfg.batch_size)
        text_loss = symmetric_info_nce(model.encode_text(tokens(views_a)), model.encode_text(tokens(views_b)),
                                       text_scale)
        loss = image_loss + cfg.text_weight * text_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            model.logit_scale.clamp_(max=math.log(100.0))
        losses.append([image_loss.item(), text_loss.item()])
        progress.set_postfix(image=f"{losses[-1][0]:.3f}", text=f"{losses[-1][1]:.3f}")
    return losses


# ----------------------------------------------------------------------------- held-out report

@torch.no_grad()
def encode_texts(model: CLIP, tokens: TokenCache, texts: Sequence[str], batch: int = 512) -> torch.Tensor:
    """texts [N] -> normalized embeddings [N, D]."""
    return F.normalize(torch.cat([model.encode_text(tokens(list(texts[i:i + batch])))
                                  for i in range(0, len(texts), batch)]), dim=-1)


ATTRIBUTES = ("shape", "colour", "background", "column", "row", "size")
ATTRIBUTE_VALUES = {"shape": SHAPES, "colour": COLOURS, "background": BACKGROUNDS,
                    "column": (0, 1, 2), "row": (0, 1, 2), "size": (0, 1, 2)}


@torch.no_grad()
def zero_shot_accuracy(model: CLIP, frames: torch.Tensor, stills: list, tokens: TokenCache) -> dict:
    """Per attribute: % of held-out stills whose true caption outscores every caption that
    changes only that attribute (first still template); plus chance."""
    model.eval()
    images = F.normalize(model.encode_image(image_input(frames)), dim=-1)  # [N, D]
    template = STILL_TEMPLATES[0]
    out = {}
    for name in ATTRIBUTES:
        values = ATTRIBUTE_VALUES[name]
        candidates = [[Still(**{**asdict(s), name: v}).caption(template) for v in values] for s in stills]
        texts = encode_texts(model, tokens, [c for row in candidates for c in row]).view(len(stills), len(values), -1)
        best = (texts @ images[:, :, None]).squeeze(-1).argmax(dim=1)  # [N]
        truth = torch.tensor([values.index(getattr(s, name)) for s in stills])
        out[name] = {"accuracy": round(100.0 * float((best == truth).float().mean()), 1),
                     "chance": round(100.0 / len(values), 1)}
    return out


@torch.no_grad()
def language_report(model: CLIP, tokens: TokenCache, cfg: ClipPretrainConfig, groups: int) -> dict:
    """On held-out sentence groups: paraphrase retrieval top-1 (view a finds its view b among all)
    and, among sentences naming a sound, nearest-centroid decoding of the named sound
    (centroids from the first half of the groups, tested on the second)."""
    model.eval()
    views_a, views_b, contents = [], [], []
    for index in range(groups):
        pairs, group_contents = sentence_group(cfg, HELD_OUT_PART, index)
        views_a += [a for a, _ in pairs]
        views_b += [b for _, b in pairs]
        contents += group_contents
    a, b = encode_texts(model, tokens, views_a), encode_texts(model, tokens, views_b)
    paraphrase = float(((a @ b.t()).argmax(dim=1) == torch.arange(len(a))).float().mean())
    named = [i for i, c in enumerate(contents) if c.sound is not None]
    labels = torch.tensor([INFORMATIVE_SOUNDS.index(contents[i].sound) for i in named])
    feats = a[named]
    half = len(named) // 2
    centroids = torch.stack([F.normalize(feats[:half][labels[:half] == k].mean(0), dim=-1)
                             for k in range(len(INFORMATIVE_SOUNDS))])
    decoded = (feats[half:] @ centroids.t()).argmax(dim=1)
    return {"paraphrase_top1": round(100.0 * paraphrase, 1), "sentences": len(a),
            "named_sound_nearest_centroid": round(100.0 * float((decoded == labels[half:]).float().mean()), 1),
            "named_sound_chance": round(100.0 / len(INFORMATIVE_SOUNDS), 1)}


# ----------------------------------------------------------------------------- entry points

def report_path(out_path: str) -> str:
    return os.path.splitext(out_path)[0] + REPORT_SUFFIX


def cached_report(init_checkpoint: str, out_path: str, cfg: ClipPretrainConfig) -> Optional[dict]:
    """The report of an existing pre-trained file made from the same initial file with the same
    config and still intact on disk; None when it must be (re)built."""
    report_file = report_path(out_path)
    if not (os.path.isfile(out_path) and os.path.isfile(report_file)):
        return None
    with open(report_file) as handle:
        report = json.load(handle)
    same = (report.get("config") == asdict(cfg) and report.get("init_sha256") == file_sha256(init_checkpoint)
            and report.get("sha256") == file_sha256(out_path))
    return report if same else None


def pretrain_clip(init_checkpoint: str, out_path: str, cfg: ClipPretrainConfig) -> dict:
    """Pre-train (or reuse an identical earlier result), write the OpenAI-format state dict and
    its JSON report; returns the report."""
    validate_config(cfg)
    cached = cached_report(init_checkpoint, out_path, cfg)
    if cached is not None:
        return {**cached, "reused": True}
    start = time.time()
    torch.manual_seed(cfg.seed)
    model = CLIP.from_state_dict(load_clip_state_dict(init_checkpoint))
    size = model.cfg.image_resolution
    check_no_benchmark_text(all_corpus_phrasings(), benchmark_captions())
    frames, stills = render_stills(cfg, IMAGE_PART, cfg.num_images, size)
    held_frames, held_stills = render_stills(cfg, HELD_OUT_PART, cfg.held_out, size)
    tokens = TokenCache(ClipTokenizer(), cfg.max_words)
    held_groups = max(1, cfg.held_out // cfg.group_size)
    before = {"zero_shot": zero_shot_accuracy(model, held_frames, held_stills, tokens),
              "language": language_report(model, tokens, cfg, held_groups)}
    losses = train(model, frames, stills, tokens, cfg)
    after = {"zero_shot": zero_shot_accuracy(model, held_frames, held_stills, tokens),
             "language": language_report(model, tokens, cfg, held_groups)}
    atomic_io.save_torch({k: v.detach().clone() for k, v in model.state_dict().items()}, out_path)
    tail = np.array(losses[-20:])
    report = {"checkpoint": out_path, "init_checkpoint": init_checkpoint,
              "init_sha256": file_sha256(init_checkpoint), "sha256": file_sha256(out_path),
              "config": asdict(cfg), "held_out_before": before, "held_out_after": after,
              "first_losses": {"image": losses[0][0], "text": losses[0][1]},
              "last_losses": {"image": float(tail[:, 0].mean()), "text": float(tail[:, 1].mean())},
              "logit_scale": float(model.logit_scale.detach().exp()), "seconds": round(time.time() - start, 1)}
    atomic_io.write_json(report_path(out_path), report, indent=1)
    return {**report, "reused": False}


def parse_args(argv: Optional[Sequence[str]]) -> tuple[argparse.Namespace, ClipPretrainConfig]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--init_checkpoint", required=True,
                        help="CLIP state dict to start from (synthetic/make_tiny_checkpoints.py)")
    parser.add_argument("--out", required=True, help="pre-trained CLIP file to write (.pt)")
    for name, value in asdict(ClipPretrainConfig()).items():
        parser.add_argument(f"--{name}", type=type(value), default=value, help=f"default: {value}")
    args = parser.parse_args(argv)
    paths = argparse.Namespace(init_checkpoint=args.init_checkpoint, out=args.out)
    cfg = ClipPretrainConfig(**{k: v for k, v in vars(args).items() if k not in vars(paths)})
    return paths, cfg


def main(argv: Optional[Sequence[str]] = None) -> dict:
    paths, cfg = parse_args(argv)
    report = pretrain_clip(paths.init_checkpoint, paths.out, cfg)
    print(json.dumps({"reused": report["reused"], "held_out_after": report["held_out_after"],
                      "seconds": report["seconds"]}, indent=1))
    return report


if __name__ == "__main__":
    main()
