"""Charades from the official release, as text-to-video retrieval with one caption per video.

Where each fact comes from:
- Files: the Charades README (prior.allenai.org/projects/data/charades/README.txt) lists
  ``Charades.zip`` (annotations: ``Charades_v1_train.csv``, ``Charades_v1_test.csv`` ...) and
  the videos ``Charades_v1.zip``; the project page (prior.allenai.org/projects/charades) links
  them and the 480p copy ``Charades_v1_480.zip`` under
  ai2-public-datasets.s3-us-west-2.amazonaws.com/charades/. The video archives hold
  ``Charades_v1_480/<id>.mp4`` / ``Charades_v1/<id>.mp4``.
- CSV columns used: ``id``, ``script`` (the script the actors performed) and ``descriptions``
  (annotators' descriptions, ";"-separated). 9,848 videos: 7,985 in the training CSV and 1,863
  in the test CSV (Sigurdsson et al., ECCV 2016).
- Retrieval convention: the official train/test split with each video's ``script`` as its one
  caption, as the audio-visual retrieval baseline AVIGATE compares with reads Charades
  (ECLIPSE, github.com/GenjiB/ECLIPSE dataloaders/dataloader_charades_retrieval.py: column
  ``script`` of Charades_v1_{train,test}.csv, videos from Charades_v1_480).
  ``--charades_text descriptions`` uses the annotators' descriptions instead (several
  captions per video, multi-sentence evaluation). The written files are
  ``charades_train.csv`` / ``charades_test.csv`` (video_id, sentence; dataloaders/charades.py).

Bad input: a video in the CSVs without a video file is an error (the archives ship all of
them); a row with an empty caption is a counted, reported skip (``empty_caption``).
"""
from __future__ import annotations

import os
from typing import Dict, List, Set, Tuple

import pandas as pd

from atomic_io import atomic_path
from dataloaders import charades as loader
from dataloaders.base import read_csv_columns
from preprocess.prepare_common import (AnnotationResult, DatasetOptions, Layout, PrepareError, SourceFile,
                                       check_zip_crc, extract_flat, members_named, members_under, open_zip,
                                       shown)

BASE_URL = "https://ai2-public-datasets.s3-us-west-2.amazonaws.com/charades/"
ANNOTATIONS = SourceFile("Charades.zip", BASE_URL + "Charades.zip",
                         "Charades annotations (Charades_v1_train.csv, Charades_v1_test.csv)")
VIDEO_ARCHIVES = {
    "480": (SourceFile("Charades_v1_480.zip", BASE_URL + "Charades_v1_480.zip", "Charades videos scaled to 480p"),
            "Charades_v1_480/"),
    "original": (SourceFile("Charades_v1.zip", BASE_URL + "Charades_v1.zip", "Charades videos, original size"),
                 "Charades_v1/"),
}
VIDEO_SUFFIXES = (".mp4",)
OFFICIAL_FILES = {"train_file": "Charades_v1_train.csv", "eval_file": "Charades_v1_test.csv"}
WRITTEN_FILES = {"train_file": loader.TRAIN_FILE, "eval_file": loader.EVAL_FILE}
OFFICIAL_DIR = "official"  # the unpacked official CSVs, under the annotation folder
TEXT_COLUMNS = ("script", "descriptions")
DESCRIPTION_SEPARATOR = ";"
EXPECTED = {"videos": 9_848, "train_videos": 7_985, "test_videos": 1_863}


def downloads(layout: Layout, options: DatasetOptions) -> List[SourceFile]:
    return [ANNOTATIONS] + ([] if layout.videos_given else [VIDEO_ARCHIVES[options.charades_videos][0]])


def unpack(layout: Layout, options: DatasetOptions) -> Dict[str, dict]:
    """The official CSVs into <root>/official/, the videos into <root>/videos/."""
    path = os.path.join(layout.archives, ANNOTATIONS.name)
    with open_zip(path) as archive:
        check_zip_crc(archive, path)
        members = members_named(archive, path, OFFICIAL_FILES.values())
        summary = {ANNOTATIONS.name: extract_flat(archive, path, list(members.values()),
                                                  os.path.join(layout.annotations, OFFICIAL_DIR), "annotations")}
    if not layout.videos_given:
        source, prefix = VIDEO_ARCHIVES[options.charades_videos]
        path = os.path.join(layout.archives, source.name)
        with open_zip(path) as archive:
            videos = members_under(archive, path, prefix, VIDEO_SUFFIXES)
            summary[source.name] = extract_flat(archive, path, videos, layout.videos, "videos")
    return summary


def captions_of(row: pd.Series, column: str) -> List[str]:
    text = str(row[column]).strip()
    if column == "script":
        return [text] if text else []
    return [part.strip() for part in text.split(DESCRIPTION_SEPARATOR) if part.strip()]


def convert_split(official_path: str, column: str) -> Tuple[pd.DataFrame, List[str], List[str]]:
    """(video_id, sentence) rows of one official CSV; returns (rows, video ids, ids without a caption)."""
    table = read_csv_columns(official_path, ["id", column])
    rows, empty = [], []
    for _, row in table.iterrows():
        captions = captions_of(row, column)
        if not captions:
            empty.append(row["id"])
        rows.extend((row["id"], caption) for caption in captions)
    return pd.DataFrame(rows, columns=["video_id", "sentence"]), table["id"].tolist(), empty


def build_annotations(layout: Layout, options: DatasetOptions, available: Set[str]) -> AnnotationResult:
    """charades_train.csv / charades_test.csv from the official CSVs, checked against the videos."""
    if options.charades_text not in TEXT_COLUMNS:
        raise PrepareError(f"--charades_text {options.charades_text!r}: choose one of {TEXT_COLUMNS}")
    counts, video_ids, empty = {"videos": len(available)}, [], []
    for key, official in OFFICIAL_FILES.items():
        rows, ids, no_caption = convert_split(os.path.join(layout.annotations, OFFICIAL_DIR, official),
                                              options.charades_text)
        missing = [v for v in ids if v not in available]
        if missing:
            raise PrepareError(f"{len(missing)} Charades videos of {official} have no file in {layout.videos}: "
                               f"{shown(missing)}. The video archive ships all 9,848; re-download it (or point "
                               f"--videos at a complete folder)")
        with atomic_path(os.path.join(layout.annotations, WRITTEN_FILES[key])) as tmp:
            rows.to_csv(tmp, index=False)
        split = "train" if key == "train_file" else "test"
        counts[f"{split}_videos"], counts[f"{split}_captions"] = len(ids), len(rows)
        video_ids += [v for v in dict.fromkeys(rows["video_id"])]
        empty += no_caption
    notes = [f"Charades official train/test split; captions from the '{options.charades_text}' column "
             f"({'one per video' if options.charades_text == 'script' else 'several per video'})"]
    return AnnotationResult(dict(WRITTEN_FILES), video_ids, counts, skipped={"empty_caption": empty}, notes=notes)
