"""VATEX (English captions) from the official annotation files, in the split the CLIP4Clip
family reports (HGR's: 25,991 train / 1,500 test).

Where each fact comes from:
- Annotation files: ``vatex_training_v1.0.json`` and ``vatex_validation_v1.0.json`` from the
  VATEX download page (eric-xw.github.io/vatex-website/download.html, files under
  .../vatex-website/data/). Each is a JSON list of ``{"videoID", "enCap": [10 English
  captions], "chCap": [10 Chinese captions]}``; 25,991 training and 3,000 validation videos
  (VATEX, Wang et al., ICCV 2019).
- Ids: ``videoID`` = ``<YouTube id>_<start>_<end>``, start and end in seconds, zero-padded to
  six digits (e.g. ``Ptf_2VRj-V0_000122_000132``); a YouTube id may itself contain "_", so
  it is split from the right (``youtube_segment``). VATEX distributes no video files: the
  clips are those 10 s YouTube segments, which the user downloads (e.g. with yt-dlp) as
  ``<videoID>.mp4`` into one folder, passed as ``--videos``. This module checks which are there.
- Split: HGR's (Chen et al., CVPR 2020, "Fine-grained Video-Text Retrieval with Hierarchical
  Graph Reasoning"): train on the 25,991 official training videos; the 3,000 official
  validation videos are halved into 1,500 validation and 1,500 test videos. The test half is
  a list HGR published (``public_split/tst_names.npy``, github.com/cshizhe/hgr_v2t), also
  shipped as ``data/vatex_data/test_list.txt`` by CLIP2Video (github.com/CryhanFang/CLIP2Video,
  README: "HGR split"); it cannot be derived from the official files, so pass it with
  ``--vatex_test_list``. ``--vatex_test_all_validation`` tests on all 3,000 validation videos
  instead (numbers then do not compare with published ones). The files written,
  ``train_list.txt``, ``test_list.txt`` and ``ref_captions.json`` ({video: [captions]}), are
  that convention's names (dataloaders/vatex.py); every English caption is used.

Bad input: YouTube videos disappear, so a listed video without a file is a counted, reported
skip (left out of the lists; ``missing_videos`` in the report and ``<root>/missing_videos.txt``),
not an error. A missing annotation or test-list file, test ids outside the official validation
set and entries without English captions are errors.
"""
from __future__ import annotations

import json
import os
from typing import Dict, List, Set, Tuple

import numpy as np

from atomic_io import atomic_path, write_json
from dataloaders import vatex as loader
from preprocess.prepare_common import AnnotationResult, DatasetOptions, Layout, PrepareError, SourceFile, shown

DATA_URL = "https://eric-xw.github.io/vatex-website/data/"
TRAINING = SourceFile("vatex_training_v1.0.json", DATA_URL + "vatex_training_v1.0.json",
                      "VATEX official training annotations (VATEX download page)")
VALIDATION = SourceFile("vatex_validation_v1.0.json", DATA_URL + "vatex_validation_v1.0.json",
                        "VATEX official validation annotations (VATEX download page)")
EXPECTED = {"official_train_videos": 25_991, "official_validation_videos": 3_000, "test_list_videos": 1_500}
EXPECTED_ALL_VALIDATION_TEST = 3_000
YOUTUBE_URL = "https://www.youtube.com/watch?v={}"
MISSING_LIST = "missing_videos.txt"


def youtube_segment(video_id: str) -> Tuple[str, int, int]:
    """``<YouTube id>_<start>_<end>`` -> (YouTube id, start s, end s)."""
    youtube_id, start, end = video_id.rsplit("_", 2)
    return youtube_id, int(start), int(end)


def missing_line(video_id: str) -> str:
    """``videoID<TAB>YouTube URL<TAB>start<TAB>end`` (just the id when it is not in that form)."""
    try:
        youtube_id, start, end = youtube_segment(video_id)
    except ValueError:
        return video_id
    return "\t".join([video_id, YOUTUBE_URL.format(youtube_id), str(start), str(end)])


def downloads(layout: Layout, options: DatasetOptions) -> List[SourceFile]:
    if not layout.videos_given:
        raise PrepareError("VATEX videos come from YouTube, not from an archive: download the clips as "
                           "<videoID>.mp4 into one folder and pass it with --videos")
    return [TRAINING, VALIDATION]


def unpack(layout: Layout, options: DatasetOptions) -> Dict[str, dict]:
    return {}  # plain JSON files; the videos are the user's folder


def read_official(path: str) -> Dict[str, List[str]]:
    """videoID -> English captions of one official annotation file, checked."""
    try:
        with open(path) as handle:
            entries = json.load(handle)
    except json.JSONDecodeError as err:
        raise PrepareError(f"{path} is not valid JSON ({err}): re-download it") from err
    if not isinstance(entries, list):
        raise PrepareError(f"{path} holds a {type(entries).__name__}; the official files are lists of "
                           f'{{"videoID", "enCap", "chCap"}}')
    captions = {}
    for number, entry in enumerate(entries):
        video_id, english = (entry.get("videoID"), entry.get("enCap")) if isinstance(entry, dict) else (None, None)
        if not isinstance(video_id, str) or not isinstance(english, list) or not english:
            raise PrepareError(f"{path}: entry {number} lacks a videoID or English captions (enCap)")
        captions[video_id] = [str(c) for c in english]
    return captions


def read_test_list(path: str) -> List[str]:
    """Test video ids from a text file (one per line) or HGR's tst_names.npy."""
    if not path or not os.path.isfile(path):
        raise PrepareError(
            f"VATEX test list {path!r} not found. Pass the HGR split's 1,500 test ids with --vatex_test_list: "
            "public_split/tst_names.npy from github.com/cshizhe/hgr_v2t, or data/vatex_data/test_list.txt from "
            "github.com/CryhanFang/CLIP2Video (or --vatex_test_all_validation to test on all 3,000 validation "
            "videos, which published numbers do not use)")
    if path.endswith(".npy"):
        try:
            return [str(v) for v in np.load(path, allow_pickle=False).tolist()]
        except ValueError as err:
            raise PrepareError(f"{path} stores Python objects; write its ids to a text file, one per line, and "
                               f"pass that") from err
    with open(path) as handle:
        return [line.strip() for line in handle if line.strip()]


def write_lines(path: str, lines: List[str]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w") as handle:
        handle.writelines(f"{line}\n" for line in lines)


def build_annotations(layout: Layout, options: DatasetOptions, available: Set[str]) -> AnnotationResult:
    """train_list.txt, test_list.txt and ref_captions.json for the videos that are present."""
    train = read_official(os.path.join(layout.archives, TRAINING.name))
    validation = read_official(os.path.join(layout.archives, VALIDATION.name))
    if options.vatex_test_all_validation:
        test_ids = list(validation)
    else:
        test_ids = list(dict.fromkeys(read_test_list(options.vatex_test_list)))
        outside = [v for v in test_ids if v not in validation]
        if outside:
            raise PrepareError(f"{options.vatex_test_list}: {len(outside)} test ids are not official validation "
                               f"videos ({shown(outside)}); the HGR test split is half of the validation set")
    missing = [v for v in list(train) + test_ids if v not in available]
    train_ids = [v for v in train if v in available]
    test_present = [v for v in test_ids if v in available]
    if not train_ids or not test_present:
        raise PrepareError(f"{layout.videos} holds {len(train_ids)} of the {len(train)} training and "
                           f"{len(test_present)} of the {len(test_ids)} test videos: expected <videoID>.mp4 files "
                           f"such as {next(iter(train))}.mp4")
    os.makedirs(layout.annotations, exist_ok=True)
    write_lines(os.path.join(layout.annotations, loader.TRAIN_FILE), train_ids)
    write_lines(os.path.join(layout.annotations, loader.EVAL_FILE), test_present)
    captions = {**train, **validation}
    write_json(os.path.join(layout.annotations, loader.CAPTIONS_JSON),
                      {v: captions[v] for v in train_ids + test_present})
    write_lines(os.path.join(layout.root, MISSING_LIST), [missing_line(v) for v in missing])
    counts = {"official_train_videos": len(train), "official_validation_videos": len(validation),
              "test_list_videos": len(test_ids), "train_videos_present": len(train_ids),
              "test_videos_present": len(test_present), "test_captions": sum(len(captions[v]) for v in test_present)}
    split = ("all 3,000 official validation videos as the test set (not HGR's split)"
             if options.vatex_test_all_validation else f"HGR split, test ids from {options.vatex_test_list}")
    notes = [f"VATEX {split}; train = official training videos; English captions (enCap) only",
             "videoID = <YouTube id>_<start s>_<end s>; missing_videos.txt lists absent clips with their YouTube "
             "URL, start and end"]
    return AnnotationResult({"train_file": loader.TRAIN_FILE, "eval_file": loader.EVAL_FILE},
                            train_ids + test_present, counts, skipped={"missing_video": missing}, notes=notes)
