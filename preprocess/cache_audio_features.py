"""Compute the frozen AST trunk's tokens once per video into a memory-mapped cache.

    python -m preprocess.cache_audio_features \
        --video_list MSRVTT_train.9k.csv MSRVTT_JSFUSION_test.csv \
        --audio_dir data/msrvtt/audio --cache_dir data/msrvtt/ast_cache --device cuda

The AST weights are resolved as main_task_retrieval.py resolves them (modules/weights.py):
``--checkpoint`` defaults to the released ``audioset_10_10_0.4593.pth``, looked for in modules/
and the weights cache and downloaded when missing (not with ``--offline``: the error names the
URL and the exact path to put the file at). Audio is read as
``<audio_dir>/<video_id>.<audio_ext>``; a video without that file is cached from the zero
input and flagged (``has_audio`` False). The wavs are counted first
(dataloaders/audio_presence.py): an audio folder where no listed video has its file, or where
more than ``--max_missing_audio`` of them are missing (videos the extraction listed as without
soundtrack excepted), is refused. Rerunning the same command resumes an interrupted run; a
cache built from another checkpoint or other fbank settings is refused. The reader is
``dataloaders.audio_cache.AudioFeatureCache``.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Optional, Sequence

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from dataloaders.audio import BAD_AUDIO_POLICIES, AudioIssueCounter, FbankConfig, load_ast_input
from dataloaders.audio_cache import AudioCacheWriter, cache_fingerprint
from dataloaders.audio_presence import DEFAULT_MAX_MISSING, MissingAudioError, check_audio_presence
from dataloaders.base import read_csv_columns
from modules import weights
from modules.ast import AST

logger = logging.getLogger("cache_audio_features")
VIDEO_ID_COLUMN = "video_id"


def read_video_ids(paths: Sequence[str]) -> list[str]:
    """Video ids from .csv files (column ``video_id``) or text files (one id per line).

    Ids are kept in first-seen order without duplicates, so several lists (train, test)
    can share one cache.
    """
    ids: dict[str, None] = {}
    for path in paths:
        if path.endswith(".csv"):
            listed = read_csv_columns(path, [VIDEO_ID_COLUMN])[VIDEO_ID_COLUMN].tolist()
        else:
            with open(path) as handle:
                listed = [line.strip() for line in handle if line.strip()]
        ids.update(dict.fromkeys(listed))
    return list(ids)


class ClipFbanks(Dataset):
    """AST inputs of the rows still to compute.

    Args:
        rows: cache rows to load.
        audio_paths: audio file of every cache row (a missing file = no soundtrack).
        fbank_cfg: fbank settings.
        on_bad_audio: "error" or "zero" for unreadable files (see load_ast_input).
        counter: shared AudioIssueCounter.
    """

    def __init__(self, rows: Sequence[int], audio_paths: Sequence[str], fbank_cfg: FbankConfig,
                 on_bad_audio: str, counter: AudioIssueCounter):
        self.rows = list(rows)
        self.audio_paths = audio_paths
        self.fbank_cfg = fbank_cfg
        self.on_bad_audio = on_bad_audio
        self.counter = counter

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, item: int) -> tuple[int, torch.Tensor, bool]:
        """-> (row, fbank [T, M], has_audio)"""
        row = self.rows[item]
        fbank, has_audio = load_ast_input(self.audio_paths[row], self.fbank_cfg,
                                          self.on_bad_audio, self.counter)
        return row, fbank, has_audio


def cache_audio_features(model: AST, writer: AudioCacheWriter, loader: DataLoader,
                         device: torch.device) -> int:
    """Run the trunk over every batch of ``loader`` and store it; returns the rows written."""
    written = 0
    for rows, fbank, has_audio in tqdm(loader, desc="AST tokens", unit="batch"):
        tokens = model.tokens(fbank.to(device))  # [b, A, W]
        writer.write(rows.tolist(), tokens.half().cpu().numpy(), has_audio.tolist())
        written += len(rows)
    return written


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default=weights.AST_RELEASE.file_name,
                        help="AST AudioSet checkpoint; the default released file is taken from modules/ or the "
                             "weights cache, else downloaded (default: %(default)s)")
    parser.add_argument("--weights_cache", default=None,
                        help=weights.WEIGHTS_CACHE_HELP)
    parser.add_argument("--offline", action="store_true",
                        help=weights.OFFLINE_HELP)
    parser.add_argument("--max_missing_audio", type=float, default=DEFAULT_MAX_MISSING,
                        help="refuse the audio folder when more than this fraction of the videos have no file "
                             "(default: %(default)s; 1 = only when none has one)")
    parser.add_argument("--video_list", nargs="+", required=True,
                        help=".csv files with a video_id column or text files with one id per line")
    parser.add_argument("--audio_dir", required=True, help="folder of <video_id>.<audio_ext> files")
    parser.add_argument("--audio_ext", default="wav", help="audio file extension (wav, flac)")
    parser.add_argument("--cache_dir", required=True, help="cache directory to create or resume")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--num_workers", type=int, default=4,
                        help="DataLoader workers decoding audio")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--on_bad_audio", choices=BAD_AUDIO_POLICIES, default="error",
                        help="unreadable audio file: stop with its name, or cache the zero input")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Create or resume the cache; returns the number of rows computed by this run."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    args = parse_args(argv)
    device = torch.device(args.device)
    video_ids = read_video_ids(args.video_list)
    check_audio_presence(video_ids, args.audio_dir, args.max_missing_audio, "the --video_list files",
                         flag="--audio_dir", extension=f".{args.audio_ext}")
    checkpoint = weights.resolve_ast_checkpoint(args.checkpoint, args.weights_cache,
                                                args.offline or weights.offline_by_default()).path
    fbank_cfg = FbankConfig()
    model = AST.from_checkpoint(checkpoint).to(device).eval()
    if (model.cfg.target_frames, model.cfg.num_mel_bins) != (fbank_cfg.target_frames,
                                                             fbank_cfg.num_mel_bins):
        raise ValueError(f"{checkpoint}: the AST reads {model.cfg.target_frames} x "
                         f"{model.cfg.num_mel_bins} fbanks, FbankConfig gives "
                         f"{fbank_cfg.target_frames} x {fbank_cfg.num_mel_bins}")
    writer = AudioCacheWriter(args.cache_dir, video_ids,
                              cache_fingerprint(checkpoint, fbank_cfg),
                              model.cfg.num_output_tokens, model.cfg.embed_dim)
    pending = writer.pending_rows()
    logger.info("%d videos, %d already cached in %s", len(video_ids),
                len(video_ids) - len(pending), args.cache_dir)
    audio_paths = [os.path.join(args.audio_dir, f"{vid}.{args.audio_ext}") for vid in video_ids]
    counter = AudioIssueCounter(max_workers=max(1, args.num_workers))
    dataset = ClipFbanks(pending, audio_paths, fbank_cfg, args.on_bad_audio, counter)
    loader = DataLoader(dataset, batch_size=args.batch_size, num_workers=args.num_workers,
                        pin_memory=device.type == "cuda")
    written = cache_audio_features(model, writer, loader, device)
    logger.info("%s; cached %d videos in %s", counter.summary(), written, args.cache_dir)
    return written


if __name__ == "__main__":
    try:
        main()
    except (weights.WeightsError, MissingAudioError) as err:  # messages name the flag, URL and path
        sys.exit(f"cache_audio_features: error: {err}")
