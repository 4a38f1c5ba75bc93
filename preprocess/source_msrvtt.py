"""MSR-VTT from its public archives, as the CLIP4Clip family uses it (9k train / 1k-A test).

Where each fact comes from:
- Annotations: ``msrvtt_data.zip`` from CLIP4Clip's release
  (github.com/ArrowLuo/CLIP4Clip README, "Data Preparing"), unpacking to
  ``msrvtt_data/{MSRVTT_data.json, MSRVTT_train.9k.csv, MSRVTT_train.7k.csv,
  MSRVTT_JSFUSION_test.csv}`` (the paths open-mmlab/mmaction2
  tools/data/video_retrieval/prepare_msrvtt.py reads after unzipping it). The loader reads the
  three files dataloaders/msrvtt.py names, unchanged.
- Videos: ``MSRVTT.zip`` shared by Frozen in Time (the CLIP4Clip README links
  www.robots.ox.ac.uk/~maxbain/frozen-in-time/data/MSRVTT.zip), holding
  ``MSRVTT/videos/all/video<N>.mp4`` (mmaction2 tools/data/video_retrieval/prepare_msrvtt.sh
  moves them from there) and ``MSRVTT/annotation/MSR_VTT.json`` (not needed: the captions
  come from MSRVTT_data.json).
- Counts: 10,000 clips with 20 captions each (MSR-VTT, Xu et al. CVPR 2016: 10K clips,
  200K sentences); the 9k split trains on 9,000 videos and 1k-A tests 1,000 (video, caption)
  pairs (CLIP4Clip, Luo et al. 2022, "Datasets").

Bad input: a video listed in the train or test file without a video file is an error (the
archive ships all 10,000), naming the ids.
"""
from __future__ import annotations

import os
from typing import Dict, List, Set

from dataloaders import msrvtt as loader
from dataloaders.base import read_csv_columns
from preprocess.prepare_common import (AnnotationResult, DatasetOptions, Layout, PrepareError, SourceFile,
                                       check_zip_crc, extract_flat, members_named, members_under, open_zip,
                                       shown)

ANNOTATIONS = SourceFile("msrvtt_data.zip",
                         "https://github.com/ArrowLuo/CLIP4Clip/releases/download/v0.0/msrvtt_data.zip",
                         "MSR-VTT captions and 9k / 1k-A splits from CLIP4Clip's release")
VIDEOS = SourceFile("MSRVTT.zip", "https://www.robots.ox.ac.uk/~maxbain/frozen-in-time/data/MSRVTT.zip",
                    "MSR-VTT videos as shared by Frozen in Time, linked from CLIP4Clip's README")
ANNOTATION_FILES = (loader.DATA_JSON, loader.TRAIN_FILE, loader.EVAL_FILE)
VIDEO_PREFIX = "MSRVTT/videos/all/"
VIDEO_SUFFIXES = (".mp4",)
EXPECTED = {"videos": 10_000, "captions": 200_000, "train_entries": 9_000, "test_entries": 1_000}


def downloads(layout: Layout, options: DatasetOptions) -> List[SourceFile]:
    return [ANNOTATIONS] + ([] if layout.videos_given else [VIDEOS])


def unpack(layout: Layout, options: DatasetOptions) -> Dict[str, dict]:
    """The three annotation files into <root>/, the videos into <root>/videos/."""
    path = os.path.join(layout.archives, ANNOTATIONS.name)
    with open_zip(path) as archive:
        check_zip_crc(archive, path)
        members = members_named(archive, path, ANNOTATION_FILES)
        summary = {ANNOTATIONS.name: extract_flat(archive, path, list(members.values()), layout.annotations,
                                                  "annotations")}
    if not layout.videos_given:
        path = os.path.join(layout.archives, VIDEOS.name)
        with open_zip(path) as archive:
            videos = members_under(archive, path, VIDEO_PREFIX, VIDEO_SUFFIXES)
            summary[VIDEOS.name] = extract_flat(archive, path, videos, layout.videos, "videos")
    return summary


def build_annotations(layout: Layout, options: DatasetOptions, available: Set[str]) -> AnnotationResult:
    """Check the unpacked files and that every video they list has a file."""
    data_path = layout.annotations
    train = read_csv_columns(os.path.join(data_path, loader.TRAIN_FILE), ["video_id"])["video_id"].tolist()
    test = loader.parse_eval(data_path)
    captions = loader.read_sentences(os.path.join(data_path, loader.DATA_JSON))
    no_captions = [v for v in train if v not in captions]
    if no_captions:
        raise PrepareError(f"{loader.DATA_JSON} has no captions for {shown(no_captions)} listed in "
                           f"{loader.TRAIN_FILE}: the annotation archive is inconsistent; re-download it")
    video_ids = list(dict.fromkeys(train + test.video_ids))
    missing = [v for v in video_ids if v not in available]
    if missing:
        raise PrepareError(f"{len(missing)} MSR-VTT videos listed in {loader.TRAIN_FILE} / {loader.EVAL_FILE} "
                           f"have no file in {layout.videos}: {shown(missing)}. {VIDEOS.name} ships all "
                           f"10,000; re-download it (or point --videos at a complete folder)")
    counts = {"videos": len(available), "captions": sum(map(len, captions.values())),
              "train_entries": len(train), "test_entries": test.num_texts}
    notes = ["MSR-VTT 9k / 1k-A split (CLIP4Clip's MSRVTT_train.9k.csv and MSRVTT_JSFUSION_test.csv); "
             "training uses all 20 captions of each training video"]
    return AnnotationResult({"train_file": loader.TRAIN_FILE, "eval_file": loader.EVAL_FILE}, video_ids, counts,
                            notes=notes)
