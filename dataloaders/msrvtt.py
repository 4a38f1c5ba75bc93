"""MSR-VTT annotations (docs/design.md §9): 9k training videos, 1k-A test pairs.

- ``MSRVTT_data.json``: ``{"sentences": [{"video_id", "caption"}, ...], ...}``, the 20
  captions of each of the 10k videos;
- ``MSRVTT_train.9k.csv``: column ``video_id``, the training videos (every caption of each
  is a training sample);
- ``MSRVTT_JSFUSION_test.csv``: columns ``key, vid_key, video_id, sentence``, the 1k-A
  test: 1000 (video, caption) pairs. preprocess/make_val_split.py writes validation files
  in the same two CSV formats.
"""
from __future__ import annotations

import os
from collections import defaultdict
from typing import Dict, List

from dataloaders.base import (AnnotationError, RetrievalSplit, parse_caption_csv, read_csv_columns,
                              read_json, require_key)

DATA_JSON = "MSRVTT_data.json"
TRAIN_FILE = "MSRVTT_train.9k.csv"
EVAL_FILE = "MSRVTT_JSFUSION_test.csv"


def read_sentences(path: str) -> Dict[str, List[str]]:
    """video_id -> its captions, in file order, from ``MSRVTT_data.json``."""
    sentences = require_key(read_json(path), "sentences", path)
    captions: Dict[str, List[str]] = defaultdict(list)
    for number, entry in enumerate(sentences):
        where = f"sentences[{number}]"
        captions[str(require_key(entry, "video_id", path, where))].append(
            str(require_key(entry, "caption", path, where)))
    return captions


def parse_train(data_path: str, train_file: str = TRAIN_FILE) -> RetrievalSplit:
    """Every caption of every video listed in ``train_file`` (captions from ``MSRVTT_data.json``)."""
    csv_path = os.path.join(data_path, train_file)
    video_ids = read_csv_columns(csv_path, ["video_id"])["video_id"].tolist()
    json_path = os.path.join(data_path, DATA_JSON)
    captions = read_sentences(json_path)
    missing = [v for v in video_ids if v not in captions]
    if missing:
        raise AnnotationError(f"{json_path!r} has no sentences for video(s) {missing[:5]} "
                              f"listed in {csv_path!r}")
    return RetrievalSplit.from_pairs(csv_path, ((v, c) for v in video_ids for c in captions[v]))


def parse_eval(data_path: str, eval_file: str = EVAL_FILE) -> RetrievalSplit:
    """The (video_id, sentence) rows of a JSFUSION-style CSV, one caption per row."""
    return parse_caption_csv(os.path.join(data_path, eval_file))
