"""From a ``DataConfig`` to datasets: the one place that knows every dataset format.

``DATASETS`` maps a ``datatype`` ("msrvtt", "vatex", "charades") to its default annotation
file names and its parse functions. The builders:

- ``build_train_split`` / ``build_eval_split``: the parsed ``RetrievalSplit``;
- ``build_train_dataset(cfg) -> PairDataset``;
- ``build_eval_datasets(cfg) -> EvalDatasets(split, texts, videos)``;
check that every video file exists (and, for evaluation, decodes) before training starts.

Example::

    cfg = DataConfig(datatype="msrvtt", data_path="data/msrvtt", features_path="data/videos",
                     audio_path="data/audio")
    train = build_train_dataset(cfg)
    loader = DataLoader(train, batch_size=128, shuffle=True, collate_fn=collate_items)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

from dataloaders import charades, msrvtt, vatex
from dataloaders.audio import FbankConfig
from dataloaders.audio_cache import read_index
from dataloaders.audio_presence import DEFAULT_MAX_MISSING, AudioPresence, check_audio_presence
from dataloaders.base import (AudioSource, MediaLoader, PairDataset, RetrievalSplit, TextDataset,
                              VideoDataset, VideoIssueCounter, prepare_videos)
from dataloaders.frame_cache import FrameCache
from dataloaders.perturb import AudioPerturbation, PerturbedAudio
from dataloaders.video import FrameSamplingConfig
from modules.tokenization_clip import ClipTokenizer


@dataclass(frozen=True)
class DatasetFormat:
    """Annotation file names of a dataset and the functions parsing them.

    Args:
        train_file: default training annotation file (relative to data_path).
        eval_file: default evaluation annotation file.
        parse_train: (data_path, train_file) -> RetrievalSplit.
        parse_eval: (data_path, eval_file) -> RetrievalSplit.
    """

    train_file: str
    eval_file: str
    parse_train: Callable[[str, str], RetrievalSplit]
    parse_eval: Callable[[str, str], RetrievalSplit]


DATASETS = {
    "msrvtt": DatasetFormat(msrvtt.TRAIN_FILE, msrvtt.EVAL_FILE, msrvtt.parse_train, msrvtt.parse_eval),
    "vatex": DatasetFormat(vatex.TRAIN_FILE, vatex.EVAL_FILE, vatex.parse_split, vatex.parse_split),
    "charades": DatasetFormat(charades.TRAIN_FILE, charades.EVAL_FILE, charades.parse_split,
                              charades.parse_split),
}


@dataclass
class DataConfig:
    """Where the data is and how items are made.

    Args:
        datatype: a key of ``DATASETS``.
        data_path: directory of the annotation files.
        features_path: directory of the ``<video_id>.<ext>`` video files.
        audio_path: directory of ``<video_id>.wav`` files (missing file = the zero input; more
            than ``max_missing_audio`` of a split missing stops the build, dataloaders.audio_presence).
        audio_cache_dir: AST feature cache to read tokens from instead of wav files.
            With neither, items carry no audio (the visual-only baseline).
        train_file: training annotation file, default the dataset's (e.g. a reduced
            train CSV from preprocess/make_val_split.py); relative to data_path or absolute.
        eval_file: evaluation annotation file, default the dataset's test file.
        max_words: L, tokens per caption including start and end.
        frames: frame sampling, transform and decoder.
        frame_cache_dir: frame cache (preprocess/cache_frames.py, built with ``frames``) to read
            frames from instead of decoding; checked when the datasets are built.
        fbank: AST input settings (wav audio).
        on_bad_audio: "error" or "zero" for unreadable wav files.
        max_missing_audio: largest fraction of a split's videos whose wav may be missing
            (videos listed as without soundtrack excepted).
        skip_bad_videos: drop missing/unreadable videos (training: replace failing
            samples) and count them, instead of raising.
        expand_sentences: training item per caption (else one per video per epoch, the
            default, as ``--expand_msrvtt_sentences`` off).
        seed: seed of the per-epoch caption draw when not expanding sentences.
        audio_perturbation: what replaces the audio of every evaluation video
            (dataloaders.perturb; evaluation datasets only).
        eval_order_seed: permute the evaluation split's texts and videos with this seed
            (``permuted_split``; None = file order); a score must not depend on it.
    """

    datatype: str = "msrvtt"
    data_path: str = ""
    features_path: str = ""
    audio_path: Optional[str] = None
    audio_cache_dir: Optional[str] = None
    train_file: Optional[str] = None
    eval_file: Optional[str] = None
    max_words: int = 32
    frames: FrameSamplingConfig = field(default_factory=FrameSamplingConfig)
    frame_cache_dir: Optional[str] = None
    fbank: FbankConfig = field(default_factory=FbankConfig)
    on_bad_audio: str = "error"
    max_missing_audio: float = DEFAULT_MAX_MISSING
    skip_bad_videos: bool = False
    expand_sentences: bool = False
    seed: int = 0
    audio_perturbation: AudioPerturbation = field(default_factory=AudioPerturbation)
    eval_order_seed: Optional[int] = None


@dataclass
class EvalDatasets:
    """Evaluation data: texts and videos are separate so each is encoded exactly once.

    Args:
        split: the evaluation split (texts index videos through ``split.caption_video``).
        texts: every caption once.
        videos: every video once, in ``split.video_ids`` order.
        counter: videos dropped while building (skip_bad_videos).
    """

    split: RetrievalSplit
    texts: TextDataset
    videos: VideoDataset
    counter: VideoIssueCounter

    def audio_perturbation(self) -> dict:
        """The audio perturbation of the videos (``PerturbedAudio.record``), {"kind": "none"} without."""
        audio = self.videos.media.audio
        return audio.record() if isinstance(audio, PerturbedAudio) else {"kind": "none"}


def dataset_format(datatype: str) -> DatasetFormat:
    if datatype not in DATASETS:
        raise ValueError(f"unknown datatype {datatype!r}; choose one of {sorted(DATASETS)}")
    return DATASETS[datatype]


def build_train_split(cfg: DataConfig) -> RetrievalSplit:
    fmt = dataset_format(cfg.datatype)
    return fmt.parse_train(cfg.data_path, cfg.train_file or fmt.train_file)


def build_eval_split(cfg: DataConfig) -> RetrievalSplit:
    fmt = dataset_format(cfg.datatype)
    return fmt.parse_eval(cfg.data_path, cfg.eval_file or fmt.eval_file)


def permuted_split(split: RetrievalSplit, seed: int) -> RetrievalSplit:
    """The same captions and videos, texts and videos each in an order drawn from ``seed``
    (``numpy.random.default_rng``); every caption keeps its video."""
    rng = np.random.default_rng(seed)
    text_order = rng.permutation(split.num_texts)
    video_order = rng.permutation(split.num_videos)
    new_position = np.empty(split.num_videos, dtype=np.int64)
    new_position[video_order] = np.arange(split.num_videos)
    return RetrievalSplit(f"{split.name} (order seed {seed})", [split.captions[i] for i in text_order],
                          new_position[split.caption_video[text_order]],
                          [split.video_ids[v] for v in video_order])


def cache_fbank_config(cache_dir: str, default: FbankConfig) -> FbankConfig:
    """The fbank settings an AST feature cache was built with (its fingerprint), else ``default``."""
    settings = (read_index(cache_dir).get("fingerprint") or {}).get("fbank")
    return FbankConfig(**settings) if isinstance(settings, dict) else default


def _perturbed(media: MediaLoader, cfg: DataConfig, video_ids: list) -> MediaLoader:
    """``media`` with its audio replaced as ``cfg.audio_perturbation`` says (unchanged for "none")."""
    if cfg.audio_perturbation.kind == "none":
        return media
    fbank = cache_fbank_config(cfg.audio_cache_dir, cfg.fbank) if cfg.audio_cache_dir else cfg.fbank
    media.audio = PerturbedAudio(media.audio, cfg.audio_perturbation, video_ids, fbank)
    return media


def check_split_audio(cfg: DataConfig, split: RetrievalSplit) -> Optional[AudioPresence]:
    """Count the split's wavs before any work; too many missing stops here (audio_presence).
    None when the split reads no wavs."""
    if not cfg.audio_path:
        return None
    return check_audio_presence(split.video_ids, cfg.audio_path, cfg.max_missing_audio, split.name)


def _media(cfg: DataConfig, video_files) -> MediaLoader:
    audio = AudioSource(cfg.audio_path, cfg.audio_cache_dir, cfg.fbank, cfg.on_bad_audio)
    frame_cache = FrameCache(cfg.frame_cache_dir, cfg.frames, video_files) if cfg.frame_cache_dir else None
    return MediaLoader(video_files, cfg.frames, audio, frame_cache)


def build_train_dataset(cfg: DataConfig, tokenizer=None) -> PairDataset:
    """Training pairs; missing videos raise (or are dropped with ``skip_bad_videos``).

    Args:
        cfg: data settings.
        tokenizer: object with ``tokenize_batch``; default ``ClipTokenizer()``.
    """
    counter = VideoIssueCounter()
    split, files = prepare_videos(build_train_split(cfg), cfg.features_path, cfg.skip_bad_videos, counter)
    check_split_audio(cfg, split)
    return PairDataset(split, _media(cfg, files), tokenizer or ClipTokenizer(), cfg.max_words,
                       cfg.expand_sentences, cfg.seed, cfg.skip_bad_videos, counter)


def build_eval_datasets(cfg: DataConfig, tokenizer=None) -> EvalDatasets:
    """Evaluation texts and videos; every video is checked to decode before evaluation starts.

    Args:
        cfg: data settings.
        tokenizer: object with ``tokenize_batch``; default ``ClipTokenizer()``.
    """
    counter = VideoIssueCounter()
    split, files = prepare_videos(build_eval_split(cfg), cfg.features_path, cfg.skip_bad_videos,
                                  counter, probe_decoder=cfg.frames.decoder)
    check_split_audio(cfg, split)
    if cfg.eval_order_seed is not None:
        split = permuted_split(split, cfg.eval_order_seed)
    media = _perturbed(_media(cfg, files), cfg, split.video_ids)
    return EvalDatasets(split, TextDataset(split, tokenizer or ClipTokenizer(), cfg.max_words),
                        VideoDataset(split, media), counter)
