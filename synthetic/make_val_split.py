"""Carve a validation split out of the synthetic benchmark's TRAINING clips.

Recipe choices (epochs, learning rate) and per-row model selection are made on this split,
never on the test split. Held-out clips leave training with all their renders; twin groups
leave whole (their clips share visuals), and the three clip categories are held out in the
test split's proportions, so the validation split is a small copy of the test split's design.
Each held-out clip is evaluated on its first render with every caption, one row per caption
(the test CSV's layout, read by the MSR-VTT loader unchanged):

    MSRVTT_train.minus_val<N>.csv     the training list without the held-out clips' renders
    MSRVTT_JSFUSION_val<N>.csv        key, vid_key, video_id, sentence: one row per caption
    val<N>_captions.json              the kind / mentions_sound tag of each validation row

Use them with ``--train_csv`` and ``--val_csv``. The same data and (--num_val_clips, --seed)
always give the same files.

    python -m synthetic.make_val_split --data_dir data/synthetic_av --num_val_clips 60
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Optional, Sequence

import numpy as np
import pandas as pd

import atomic_io

from synthetic.design import CATEGORIES, TWIN

TRAIN_CSV = "MSRVTT_train.9k.csv"
VAL_TAG_STREAM = 7  # SeedSequence tag of the held-out draw (not a generator stream)


def split_files(out_dir: str, num_val_clips: int) -> dict:
    return {"train_csv": os.path.join(out_dir, f"MSRVTT_train.minus_val{num_val_clips}.csv"),
            "val_csv": os.path.join(out_dir, f"MSRVTT_JSFUSION_val{num_val_clips}.csv"),
            "val_captions": os.path.join(out_dir, f"val{num_val_clips}_captions.json")}


def training_clips(metadata: dict) -> dict:
    """clip_id -> {"category", "group_id", "renders": [video_id ...], "captions"} of the training split."""
    clips = {}
    for video_id, entry in sorted(metadata["videos"].items()):
        if entry["split"] != "train":
            continue
        clip = clips.setdefault(entry["clip_id"], {"category": entry["category"], "group_id": entry["group_id"],
                                                   "renders": [], "captions": entry["captions"]})
        clip["renders"].append((entry["render"], video_id))
    for clip in clips.values():
        clip["renders"] = [video_id for _, video_id in sorted(clip["renders"])]
    return clips


def choose_val_clips(clips: dict, num_val_clips: int, seed: int) -> list:
    """Held-out clip ids: per category a share of num_val_clips equal to its share of the
    training clips, twins drawn as whole groups."""
    by_category = {c: sorted(cid for cid, clip in clips.items() if clip["category"] == c) for c in CATEGORIES}
    rng = np.random.default_rng([seed, VAL_TAG_STREAM, num_val_clips])
    chosen = []
    for category in CATEGORIES:
        members = by_category[category]
        want = int(round(num_val_clips * len(members) / len(clips)))
        if category == TWIN:
            groups = sorted({clips[cid]["group_id"] for cid in members})
            size = len(members) // max(1, len(groups))
            picked = set(rng.choice(groups, size=min(len(groups), int(round(want / max(1, size)))), replace=False).tolist())
            chosen += [cid for cid in members if clips[cid]["group_id"] in picked]
        else:
            chosen += sorted(rng.choice(members, size=min(len(members), want), replace=False).tolist())
    return sorted(chosen)


def make_val_split(data_dir: str, num_val_clips: int, seed: int = 0, out_dir: Optional[str] = None) -> dict:
    """Write the reduced training list, the validation CSV and its caption tags (under out_dir,
    default data_dir); returns the paths and counts."""
    meta_path = os.path.join(data_dir, "metadata.json")
    if not os.path.isfile(meta_path):
        raise FileNotFoundError(f"{meta_path} not found: --data_dir must be a synthetic benchmark folder "
                                "(python -m synthetic.make_synthetic_av)")
    with open(meta_path) as handle:
        metadata = json.load(handle)
    clips = training_clips(metadata)
    if not 0 < num_val_clips < len(clips):
        raise ValueError(f"--num_val_clips must lie in [1, {len(clips) - 1}] (the training split has "
                         f"{len(clips)} clips), got {num_val_clips}")
    held_out = choose_val_clips(clips, num_val_clips, seed)
    held_renders = {vid for cid in held_out for vid in clips[cid]["renders"]}
    train = pd.read_csv(os.path.join(data_dir, TRAIN_CSV))
    paths = split_files(out_dir or data_dir, num_val_clips)
    atomic_io.write_text(paths["train_csv"], train[~train["video_id"].isin(held_renders)].to_csv(index=False))
    rows, tags = [], []
    for number, cid in enumerate(held_out):
        video_id = clips[cid]["renders"][0]
        for caption in clips[cid]["captions"]:
            rows.append({"key": f"val{len(rows)}", "vid_key": f"val{number}", "video_id": video_id,
                         "sentence": caption["caption"]})
            tags.append({"video_id": video_id, "caption": caption["caption"], "kind": caption["kind"],
                         "mentions_sound": caption["mentions_sound"]})
    atomic_io.write_text(paths["val_csv"], pd.DataFrame(rows, columns=["key", "vid_key", "video_id", "sentence"])
                         .to_csv(index=False))
    atomic_io.write_json(paths["val_captions"], {"held_out_clips": held_out, "captions": tags}, indent=1)
    categories = {c: sum(clips[cid]["category"] == c for cid in held_out) for c in CATEGORIES}
    return {**paths, "val_clips": len(held_out), "val_captions_count": len(rows),
            "val_clips_per_category": categories, "train_videos": int((~train["video_id"].isin(held_renders)).sum())}


def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_dir", required=True, help="synthetic benchmark folder (metadata.json)")
    parser.add_argument("--num_val_clips", type=int, required=True, help="training clips to hold out")
    parser.add_argument("--seed", type=int, default=0, help="seed of the held-out draw")
    parser.add_argument("--out_dir", default=None, help="where the files go (default: --data_dir)")
    args = parser.parse_args(argv)
    summary = make_val_split(args.data_dir, args.num_val_clips, args.seed, args.out_dir)
    print(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()
