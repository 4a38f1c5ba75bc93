"""Hold out a validation slice of the TRAINING videos, written in the dataset's own formats.

Model selection on the test set inflates test numbers; this picks ``--num_val`` training
videos with a seeded RNG and writes, next to the originals (or in ``--output_dir``):

- msrvtt: ``MSRVTT_train.9k.minus_val500.csv`` (the training CSV without them, original
  columns kept) and ``MSRVTT_JSFUSION_val500.csv`` (key, vid_key, video_id, sentence:
  one caption per held-out video, drawn with the same seed, like the 1k-A test file);
- vatex: ``train_list.minus_val500.txt`` and ``val_list500.txt`` (every caption of each
  held-out video is evaluated, as for the test list);
- charades: ``charades_train.minus_val500.csv`` and ``charades_val500.csv`` (the rows of
  the held-out videos).

Train on the reduced file and validate on the held-out one with the data flags
``--train_file <reduced> --eval_file <val>`` (``DataConfig.train_file`` / ``eval_file``).
The same (input, --num_val, --seed) always gives the same files.

Example:
    python -m preprocess.make_val_split --datatype msrvtt --data_path data/msrvtt --num_val 500
"""
from __future__ import annotations

import argparse
import os
from typing import Dict, List, Optional, Sequence

import numpy as np
import pandas as pd

from dataloaders import msrvtt
from dataloaders.base import read_csv_columns, read_id_list
from dataloaders.registry import DATASETS, DataConfig, build_train_split

DEFAULT_NUM_VAL = 500
DEFAULT_SEED = 0
MSRVTT_VID_PREFIX, MSRVTT_KEY_PREFIX = "video", "msr"
JSFUSION_COLUMNS = ["key", "vid_key", "video_id", "sentence"]


def choose_videos(video_ids: Sequence[str], num_val: int, seed: int) -> List[str]:
    """``num_val`` distinct ids drawn with ``seed``, returned in their original order."""
    unique = list(dict.fromkeys(video_ids))
    if not 0 < num_val < len(unique):
        raise ValueError(f"--num_val must be between 1 and {len(unique) - 1} (the training set "
                         f"has {len(unique)} videos), got {num_val}")
    picked = np.random.default_rng(seed).choice(len(unique), size=num_val, replace=False)
    return [unique[i] for i in sorted(picked)]


def _stem_with(file_name: str, suffix: str) -> str:
    stem, ext = os.path.splitext(os.path.basename(file_name))
    return f"{stem}{suffix}{ext}"


def split_msrvtt(data_path: str, train_file: str, num_val: int, seed: int,
                 output_dir: str) -> Dict[str, str]:
    """Reduced training CSV plus a JSFUSION-style validation CSV (one seeded caption per video)."""
    train_path = os.path.join(data_path, train_file)
    table = read_csv_columns(train_path, ["video_id"])
    held_out = choose_videos(table["video_id"].tolist(), num_val, seed)
    paths = {"train_file": os.path.join(output_dir, _stem_with(train_file, f".minus_val{num_val}")),
             "eval_file": os.path.join(output_dir, f"MSRVTT_JSFUSION_val{num_val}.csv")}
    table[~table["video_id"].isin(set(held_out))].to_csv(paths["train_file"], index=False)
    split = msrvtt.parse_train(data_path, train_file)  # every training video's captions, checked
    draw = np.random.default_rng([seed, num_val])
    rows = []
    for number, video_id in enumerate(held_out):
        captions = split.captions_of(split.video_ids.index(video_id))
        sentence = split.captions[captions[draw.integers(len(captions))]]
        vid_key = (MSRVTT_KEY_PREFIX + video_id[len(MSRVTT_VID_PREFIX):]
                   if video_id.startswith(MSRVTT_VID_PREFIX) else video_id)
        rows.append({"key": f"val{number}", "vid_key": vid_key, "video_id": video_id, "sentence": sentence})
    pd.DataFrame(rows, columns=JSFUSION_COLUMNS).to_csv(paths["eval_file"], index=False)
    return paths


def split_vatex(data_path: str, train_file: str, num_val: int, seed: int,
                output_dir: str) -> Dict[str, str]:
    """Reduced training id list plus a validation id list (all captions stay in ref_captions.json)."""
    # Parsing the split first checks that every listed video has captions.
    build_train_split(DataConfig(datatype="vatex", data_path=data_path, train_file=train_file))
    video_ids = read_id_list(os.path.join(data_path, train_file))
    held_out = set(choose_videos(video_ids, num_val, seed))
    paths = {"train_file": os.path.join(output_dir, _stem_with(train_file, f".minus_val{num_val}")),
             "eval_file": os.path.join(output_dir, f"val_list{num_val}.txt")}
    for key, keep_held_out in (("train_file", False), ("eval_file", True)):
        with open(paths[key], "w") as f:
            f.writelines(f"{v}\n" for v in video_ids if (v in held_out) == keep_held_out)
    return paths


def split_charades(data_path: str, train_file: str, num_val: int, seed: int,
                   output_dir: str) -> Dict[str, str]:
    """Reduced training CSV plus a validation CSV with the held-out videos' rows."""
    train_path = os.path.join(data_path, train_file)
    table = read_csv_columns(train_path, ["video_id", "sentence"])
    held_out = table["video_id"].isin(set(choose_videos(table["video_id"].tolist(), num_val, seed)))
    paths = {"train_file": os.path.join(output_dir, _stem_with(train_file, f".minus_val{num_val}")),
             "eval_file": os.path.join(output_dir, f"charades_val{num_val}.csv")}
    table[~held_out].to_csv(paths["train_file"], index=False)
    table[held_out].to_csv(paths["eval_file"], index=False)
    return paths


SPLITTERS = {"msrvtt": split_msrvtt, "vatex": split_vatex, "charades": split_charades}


def make_val_split(datatype: str, data_path: str, num_val: int = DEFAULT_NUM_VAL, seed: int = DEFAULT_SEED,
                   train_file: Optional[str] = None, output_dir: Optional[str] = None) -> Dict[str, str]:
    """Write the reduced training file and the validation file; returns their paths.

    Args:
        datatype: "msrvtt", "vatex" or "charades".
        data_path: directory of the annotation files.
        num_val: held-out training videos.
        seed: RNG seed of the draw.
        train_file: training annotation file to split (default: the dataset's).
        output_dir: where to write (default: data_path).

    Returns:
        {"train_file": reduced training file, "eval_file": validation file}, absolute paths.
    """
    if datatype not in SPLITTERS:
        raise ValueError(f"unknown --datatype {datatype!r}; choose one of {sorted(SPLITTERS)}")
    # Absolute paths: DataConfig joins train_file/eval_file to data_path unless absolute.
    output_dir = os.path.abspath(output_dir or data_path)
    os.makedirs(output_dir, exist_ok=True)
    train_file = train_file or DATASETS[datatype].train_file
    return SPLITTERS[datatype](data_path, train_file, num_val, seed, output_dir)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, str]:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datatype", required=True, choices=sorted(SPLITTERS))
    parser.add_argument("--data_path", required=True, help="directory of the annotation files")
    parser.add_argument("--num_val", type=int, default=DEFAULT_NUM_VAL, help="training videos to hold out")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed of the held-out draw")
    parser.add_argument("--train_file", default=None,
                        help="training annotation file to split (default: the dataset's, "
                             "e.g. MSRVTT_train.9k.csv)")
    parser.add_argument("--output_dir", default=None,
                        help="where to write the two files (default: --data_path)")
    args = parser.parse_args(argv)
    paths = make_val_split(args.datatype, args.data_path, args.num_val, args.seed, args.train_file,
                           args.output_dir)
    print(f"wrote {paths['train_file']} and {paths['eval_file']}; train with "
          f"--train_file {paths['train_file']} --eval_file {paths['eval_file']}")
    return paths


if __name__ == "__main__":
    main()
