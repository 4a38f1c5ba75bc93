"""VATEX annotations (docs/design.md §9): id lists plus a caption file, multi-sentence evaluation.

- ``train_list.txt`` / ``test_list.txt``: one video id per line;
- ``ref_captions.json``: ``{video_id: [caption, ...]}`` (about 10 English captions each).
Both splits use every caption of every listed video; at evaluation a video therefore has
several captions (docs/design.md §8: multi-sentence video-to-text).
"""
from __future__ import annotations

import os

from dataloaders.base import AnnotationError, RetrievalSplit, read_id_list, read_json, require_key

CAPTIONS_JSON = "ref_captions.json"
TRAIN_FILE = "train_list.txt"
EVAL_FILE = "test_list.txt"


def parse_split(data_path: str, list_file: str) -> RetrievalSplit:
    """Every caption in ``ref_captions.json`` of every video in ``list_file``; used for train and test."""
    list_path = os.path.join(data_path, list_file)
    json_path = os.path.join(data_path, CAPTIONS_JSON)
    captions = read_json(json_path)
    pairs = []
    for video_id in read_id_list(list_path):
        video_captions = require_key(captions, video_id, json_path, f"the captions of {list_path!r}")
        if not isinstance(video_captions, list):
            raise AnnotationError(f"{json_path!r}: captions of {video_id!r} must be a list, "
                                  f"got {type(video_captions).__name__}")
        pairs.extend((video_id, str(c)) for c in video_captions)
    return RetrievalSplit.from_pairs(list_path, pairs)
