"""Dataset machinery shared by MSR-VTT, VATEX and Charades (docs/design.md §8, §9).

Each dataset module only parses its annotation files into a ``RetrievalSplit`` (captions,
the video of each caption, unique video ids). Everything else lives here once:

- ``prepare_videos``: finds ``<video_id>.{mp4,webm,mkv,avi}`` files, drops (with
  ``skip_bad_videos``) or reports missing / unreadable ones, naming them;
- ``MediaLoader``: frames of one video (decoded by ``dataloaders.video``, or read from a frame
  cache, ``dataloaders.frame_cache``) plus its audio, either the AST input computed from
  ``<video_id>.wav`` or AST tokens from a feature cache;
- ``PairDataset`` (training: one item per caption, or one per video per epoch),
  ``TextDataset`` and ``VideoDataset`` (evaluation: every caption and every video once);
- ``collate_items``: stacks item dicts into batch dicts; ``video_inputs``: a batch's video
  keys -> the model's keyword arguments, on the device.

Item dicts (S = image_size, F = max_frames, L = max_words, A audio tokens, W AST width):
    text_ids  int64 [L]      text_mask int64 [L]      text_index  int64 []
    frames    uint8 [F, 3, S, S]  frame_mask bool [F]  video_index int64 []
    has_audio bool []
    fbank     float32 [1024, 128]   (audio from wav files)  or
    audio_tokens float16 [A, W]     (audio from an AST feature cache); neither without audio.
``frames`` are RGB after resize and center crop, zeros at padded frames, not yet
normalized: workers ship uint8 (a quarter of the float bytes) and the training process
normalizes the batch on its device (``dataloaders.video.normalize_frames``, called by
``video_inputs``).
PairDataset items hold all keys, TextDataset items the text keys plus video_index,
VideoDataset items the video keys. Batches add a leading B dimension.

Everything an item holds depends only on (seed, epoch, index) and the files: no global RNG.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd
import torch
import torch.utils.data
from torch.utils.data import Dataset

from dataloaders.audio import AudioIssueCounter, FbankConfig, load_ast_input
from dataloaders.audio_cache import AudioFeatureCache
from dataloaders.frame_cache import FrameCache
from dataloaders.video import FrameSamplingConfig, VideoReadError, decode_frames, normalize_frames, read_frames

logger = logging.getLogger(__name__)

VIDEO_EXTENSIONS = (".mp4", ".webm", ".mkv", ".avi")  # preference order when several exist
AUDIO_EXTENSION = ".wav"
NAMES_SHOWN = 5  # file names quoted in one error or warning


class AnnotationError(ValueError):
    """An annotation file is missing, malformed, or lacks a column or key it needs."""


def read_csv_columns(path: str, columns: Sequence[str]) -> pd.DataFrame:
    """A CSV as strings (empty cells stay "", ids like "NA" stay text), checking ``columns``."""
    if not os.path.isfile(path):
        raise AnnotationError(f"annotation file {path!r} not found")
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise AnnotationError(f"{path!r} is not a readable CSV ({type(err).__name__}: {err})") from err
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise AnnotationError(f"{path!r} lacks column(s) {missing}; it has {list(table.columns)}")
    return table


def read_json(path: str):
    """A JSON file, with errors naming it."""
    if not os.path.isfile(path):
        raise AnnotationError(f"annotation file {path!r} not found")
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as err:
            raise AnnotationError(f"{path!r} is not valid JSON ({err})") from err


def require_key(mapping, key: str, path: str, where: str = "the top level"):
    """``mapping[key]``, or an AnnotationError naming the file, the key and where it was expected."""
    if not isinstance(mapping, dict) or key not in mapping:
        raise AnnotationError(f"{path!r} lacks key {key!r} in {where}")
    return mapping[key]


def parse_caption_csv(path: str) -> RetrievalSplit:
    """A split from a CSV with one (video_id, sentence) caption per row."""
    table = read_csv_columns(path, ["video_id", "sentence"])
    return RetrievalSplit.from_pairs(path, zip(table["video_id"], table["sentence"]))


def read_id_list(path: str) -> List[str]:
    """Video ids, one per line (blank lines ignored)."""
    if not os.path.isfile(path):
        raise AnnotationError(f"annotation file {path!r} not found")
    with open(path) as f:
        return [line.strip() for line in f if line.strip()]


@dataclass
class RetrievalSplit:
    """Captions of a split and the video each belongs to.

    Args:
        name: where it came from, for messages (e.g. the annotation file).
        captions: Nt caption strings (may be empty).
        caption_video: int64 [Nt], index into ``video_ids`` of each caption's video.
        video_ids: Nv unique video ids, in first-appearance order.
    """

    name: str
    captions: List[str]
    caption_video: np.ndarray
    video_ids: List[str]

    @classmethod
    def from_pairs(cls, name: str, pairs: Iterable[Tuple[str, str]]) -> "RetrievalSplit":
        """Build from (video_id, caption) pairs; videos are numbered as they first appear."""
        video_index: Dict[str, int] = {}
        captions, caption_video = [], []
        for video_id, caption in pairs:
            captions.append(caption)
            caption_video.append(video_index.setdefault(video_id, len(video_index)))
        return cls(name, captions, np.asarray(caption_video, dtype=np.int64), list(video_index))

    @property
    def num_texts(self) -> int:
        return len(self.captions)

    @property
    def num_videos(self) -> int:
        return len(self.video_ids)

    def captions_of(self, video_index: int) -> np.ndarray:
        """Caption indices of one video, int64 [k]."""
        return np.flatnonzero(self.caption_video == video_index)

    def without_videos(self, dropped: Iterable[str]) -> "RetrievalSplit":
        """The split minus the given videos and their captions (order otherwise kept)."""
        dropped = set(dropped)
        return RetrievalSplit.from_pairs(self.name, (
            (self.video_ids[v], c) for c, v in zip(self.captions, self.caption_video)
            if self.video_ids[v] not in dropped))


def find_video_files(features_path: str) -> Dict[str, str]:
    """video_id -> file for every video file directly under ``features_path``."""
    if not os.path.isdir(features_path):
        raise FileNotFoundError(f"video directory {features_path!r} (features_path) not found")
    files: Dict[str, str] = {}
    rank = {ext: k for k, ext in enumerate(VIDEO_EXTENSIONS)}
    for entry in sorted(os.scandir(features_path), key=lambda e: e.name):
        stem, ext = os.path.splitext(entry.name)
        ext = ext.lower()
        if ext in rank and entry.is_file():
            if stem not in files or rank[ext] < rank[os.path.splitext(files[stem])[1].lower()]:
                files[stem] = entry.path
    return files


class VideoIssueCounter:
    """Counts videos dropped or replaced, across DataLoader workers.

    Kinds: "missing" (no file, dropped when the split is built), "unreadable" (dropped
    when the split is built), "replaced" (a training sample whose video failed to decode
    was replaced by another sample). The counts live in shared memory, one row per
    worker, so the main process can report them once.

    Args:
        max_workers: DataLoader workers the table has rows for; more share rows mod this.
    """

    KINDS = ("missing", "unreadable", "replaced")

    def __init__(self, max_workers: int = 64):
        self._table = torch.zeros(max_workers + 1, len(self.KINDS), dtype=torch.int64).share_memory_()

    def record(self, kind: str, count: int = 1) -> None:
        info = torch.utils.data.get_worker_info()
        row = (0 if info is None else 1 + info.id) % self._table.shape[0]
        self._table[row, self.KINDS.index(kind)] += count

    def count(self, kind: str) -> int:
        return int(self._table[:, self.KINDS.index(kind)].sum())

    def summary(self) -> str:
        return ("videos: " + ", ".join(f"{self.count(k)} {k}" for k in self.KINDS)
                + " (--skip_bad_videos)")


def _names(paths: Sequence[str]) -> str:
    shown = ", ".join(repr(p) for p in paths[:NAMES_SHOWN])
    return shown + (f" and {len(paths) - NAMES_SHOWN} more" if len(paths) > NAMES_SHOWN else "")


def _probe(path: str, decoder: str) -> Optional[str]:
    """None if the first frame of ``path`` decodes, else the reason it does not."""
    try:
        decode_frames(path, lambda num_frames, fps: np.zeros(1, dtype=np.int64), decoder)
    except VideoReadError as err:
        return err.reason
    return None


def prepare_videos(split: RetrievalSplit, features_path: str, skip_bad_videos: bool,
                   counter: VideoIssueCounter, probe_decoder: Optional[str] = None
                   ) -> Tuple[RetrievalSplit, Dict[str, str]]:
    """Locate every video of ``split``; drop or report the missing and unreadable ones.

    Args:
        split: the parsed split.
        features_path: directory with ``<video_id>.<ext>`` files.
        skip_bad_videos: drop bad videos (and their captions) and count them; otherwise a
            bad video raises VideoReadError naming it.
        counter: receives the dropped counts.
        probe_decoder: if given, decode the first frame of every video with this decoder
            (catches corrupt files before evaluation, where a video cannot be replaced).

    Returns:
        (the split without dropped videos, video_id -> file).
    """
    files = find_video_files(features_path)
    missing = [v for v in split.video_ids if v not in files]
    if missing and not skip_bad_videos:
        paths = [os.path.join(features_path, v + VIDEO_EXTENSIONS[0]) for v in missing]
        raise VideoReadError(paths[0], f"file not found ({len(missing)} videos of {split.name} are "
                                       f"missing: {_names(paths)}); pass --skip_bad_videos to drop them")
    unreadable = []
    if probe_decoder is not None:
        for video_id in split.video_ids:
            reason = _probe(files[video_id], probe_decoder) if video_id in files else None
            if reason is not None and not skip_bad_videos:
                raise VideoReadError(files[video_id], reason + "; pass --skip_bad_videos to drop it")
            if reason is not None:
                unreadable.append(video_id)
    if missing or unreadable:
        counter.record("missing", len(missing))
        counter.record("unreadable", len(unreadable))
        logger.warning("%s: dropped %d missing and %d unreadable videos: %s", split.name, len(missing),
                       len(unreadable), _names(missing + unreadable))
        split = split.without_videos(missing + unreadable)
    return split, {v: files[v] for v in split.video_ids}


class AudioSource:
    """Audio of a video: AST input from ``<audio_path>/<video_id>.wav``, or cached AST tokens.

    Args:
        audio_path: directory of wav files (a missing file = a video without soundtrack).
        audio_cache_dir: AST feature cache directory (used instead of wav files).
        fbank: settings of the AST input computed from wav files.
        on_bad_audio: "error" or "zero" for unreadable wav files (see ``load_ast_input``).
    With neither directory, items carry no audio and ``has_audio`` is False.
    """

    def __init__(self, audio_path: Optional[str] = None, audio_cache_dir: Optional[str] = None,
                 fbank: Optional[FbankConfig] = None, on_bad_audio: str = "error"):
        if audio_path and audio_cache_dir:
            raise ValueError(f"give audio_path ({audio_path!r}) or audio_cache_dir "
                             f"({audio_cache_dir!r}), not both")
        if audio_path and not os.path.isdir(audio_path):
            raise FileNotFoundError(f"audio directory {audio_path!r} (audio_path) not found")
        self.audio_path = audio_path
        self.cache = AudioFeatureCache(audio_cache_dir) if audio_cache_dir else None
        self.fbank = fbank or FbankConfig()
        self.on_bad_audio = on_bad_audio
        self.counter = AudioIssueCounter()

    def load(self, video_id: str) -> Dict[str, torch.Tensor]:
        """{"fbank" [1024, 128] | "audio_tokens" [A, W] | nothing, "has_audio" []}."""
        if self.cache is not None:
            return {"audio_tokens": torch.from_numpy(self.cache.tokens(video_id)),
                    "has_audio": torch.tensor(self.cache.has_audio(video_id))}
        if self.audio_path is None:
            return {"has_audio": torch.tensor(False)}
        fbank, has_audio = load_ast_input(os.path.join(self.audio_path, video_id + AUDIO_EXTENSION),
                                          self.fbank, self.on_bad_audio, self.counter)
        return {"fbank": torch.as_tensor(fbank, dtype=torch.float32), "has_audio": torch.tensor(has_audio)}


class MediaLoader:
    """Frames and audio of one video.

    Args:
        video_files: video_id -> file (from ``prepare_videos``).
        frames: frame sampling and transform settings.
        audio: where the audio comes from.
        frame_cache: frames decoded once (built with ``frames``' settings), read instead of
            decoding; None decodes every time.
    """

    def __init__(self, video_files: Dict[str, str], frames: FrameSamplingConfig, audio: AudioSource,
                 frame_cache: Optional[FrameCache] = None):
        self.video_files = video_files
        self.frames = frames
        self.audio = audio
        self.frame_cache = frame_cache

    def load(self, video_id: str) -> Dict[str, torch.Tensor]:
        """Video keys of an item (without video_index); raises VideoReadError naming the file."""
        if self.frame_cache is not None:
            frames, frame_mask = self.frame_cache.read(video_id)
        else:
            frames, frame_mask = read_frames(self.video_files[video_id], self.frames)
        return {"frames": frames, "frame_mask": frame_mask, **self.audio.load(video_id)}


def _text_item(tokenizer, caption: str, max_words: int, text_index: int) -> Dict[str, torch.Tensor]:
    ids, mask = tokenizer.tokenize_batch([caption], max_words)
    return {"text_ids": ids[0], "text_mask": mask[0], "text_index": torch.tensor(text_index)}


class PairDataset(Dataset):
    """Training pairs (caption, its video).

    Args:
        split: the training split (after ``prepare_videos``).
        media: frames/audio loader.
        tokenizer: has ``tokenize_batch(texts, max_words) -> (ids [N, L], mask [N, L])``.
        max_words: L.
        expand_sentences: one item per caption; otherwise one item per video per epoch
            with its caption drawn from an RNG seeded by (seed, epoch).
        seed: seed of that draw.
        skip_bad_videos: an item whose video fails to decode is replaced by the next item
            (cyclically) whose video decodes, and counted; otherwise the error propagates.
        counter: receives the replacement counts.
    """

    def __init__(self, split: RetrievalSplit, media: MediaLoader, tokenizer, max_words: int,
                 expand_sentences: bool = False, seed: int = 0, skip_bad_videos: bool = False,
                 counter: Optional[VideoIssueCounter] = None):
        if split.num_texts == 0:
            raise ValueError(f"{split.name}: no training captions left")
        self.split = split
        self.media = media
        self.tokenizer = tokenizer
        self.max_words = max_words
        self.expand_sentences = expand_sentences
        self.seed = seed
        self.skip_bad_videos = skip_bad_videos
        self.counter = counter or VideoIssueCounter()
        self._bad_videos: set = set()
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        """Redraw the caption of each video (only used without ``expand_sentences``)."""
        self.epoch = epoch
        counts = np.bincount(self.split.caption_video, minlength=self.split.num_videos)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        order = np.argsort(self.split.caption_video, kind="stable")  # captions grouped by video
        draw = np.random.default_rng([self.seed, epoch]).random(self.split.num_videos)
        self._epoch_caption = order[starts + np.floor(draw * counts).astype(np.int64)]

    def __len__(self) -> int:
        return self.split.num_texts if self.expand_sentences else self.split.num_videos

    def _caption_index(self, index: int) -> int:
        return index if self.expand_sentences else int(self._epoch_caption[index])

    def _load(self, index: int) -> Dict[str, torch.Tensor]:
        text_index = self._caption_index(index)
        video_index = int(self.split.caption_video[text_index])
        item = self.media.load(self.split.video_ids[video_index])
        item.update(_text_item(self.tokenizer, self.split.captions[text_index], self.max_words, text_index))
        item["video_index"] = torch.tensor(video_index)
        return item

    def __getitem__(self, index: int) -> Dict[str, torch.Tensor]:
        if not self.skip_bad_videos:
            return self._load(index)
        for step in range(len(self)):
            candidate = (index + step) % len(self)
            video_index = int(self.split.caption_video[self._caption_index(candidate)])
            if video_index in self._bad_videos:
                continue
            try:
                item = self._load(candidate)
            except VideoReadError as err:
                logger.warning("%s; replacing its training samples (--skip_bad_videos)", err)
                self._bad_videos.add(video_index)
                continue
            if step:
                self.counter.record("replaced")
            return item
        raise VideoReadError(self.split.name, "no video of the split can be decoded")


class TextDataset(Dataset):
    """Every caption of an evaluation split once: text keys plus video_index."""

    def __init__(self, split: RetrievalSplit, tokenizer, max_words: int):
        self.split = split
        self.tokenizer = tokenizer
        self.max_words = max_words

    def __len__(self) -> int:
        return self.split.num_texts

    def __getitem__(self, index: int) -> Dict[str, torch.Tensor]:
        item = _text_item(self.tokenizer, self.split.captions[index], self.max_words, index)
        item["video_index"] = torch.tensor(int(self.split.caption_video[index]))
        return item


class VideoDataset(Dataset):
    """Every video of an evaluation split once: video keys plus video_index."""

    def __init__(self, split: RetrievalSplit, media: MediaLoader):
        self.split = split
        self.media = media

    def __len__(self) -> int:
        return self.split.num_videos

    def __getitem__(self, index: int) -> Dict[str, torch.Tensor]:
        item = self.media.load(self.split.video_ids[index])
        item["video_index"] = torch.tensor(index)
        return item


def collate_items(items: List[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    """Stack a list of item dicts (same keys) into a batch dict with a leading B dimension
    (dtypes kept: frames stay uint8 [B, F, 3, S, S])."""
    return {key: torch.stack([item[key] for item in items]) for key in items[0]}


def video_inputs(batch: dict, device: torch.device) -> dict:
    """Collated video keys (``collate_items``) -> keyword arguments of ``AVIGATE.encode_video``.

    The uint8 frames [B, F, 3, S, S] are moved and CLIP-normalized on ``device`` (fp32). Copies
    are ``non_blocking``: asynchronous from the pinned batches of a CUDA loader (kernels
    on the same stream wait for them), ordinary copies otherwise. The audio is the fbank
    (wav files), the cached AST tokens, or None (no audio source).
    """
    audio = batch.get("fbank", batch.get("audio_tokens"))
    return {"frames": normalize_frames(batch["frames"], batch["frame_mask"], device),
            "frame_mask": batch["frame_mask"].to(device, non_blocking=True),
            "audio": None if audio is None else audio.to(device, non_blocking=True)}
