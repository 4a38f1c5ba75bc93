"""Charades annotations (docs/design.md §9): train/test CSVs with columns ``video_id, sentence``.

Each row is one caption (one per video in the usual retrieval split); rows sharing a
video_id become captions of the same video.
"""
from __future__ import annotations

import os

from dataloaders.base import RetrievalSplit, parse_caption_csv

TRAIN_FILE = "charades_train.csv"
EVAL_FILE = "charades_test.csv"


def parse_split(data_path: str, csv_file: str) -> RetrievalSplit:
    """The (video_id, sentence) rows of ``data_path/csv_file``; used for train and test."""
    return parse_caption_csv(os.path.join(data_path, csv_file))
