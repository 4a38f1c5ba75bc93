"""The category-shortcut control (issue 17): an AST-token cache in which every clip's tokens are
replaced by those of ONE fixed exemplar clip of its audio category.

On the synthetic benchmark a clip's soundtrack is informative (a sound event) or irrelevant
(noise, unrelated tones), and that category alone predicts which captions can match it (noise
clips only ever get visual captions). A row trained and tested on this cache hears one fixed
informative exemplar for every informative clip and one fixed irrelevant exemplar for every
noise clip: it keeps the category bit and loses the sound itself. Its gain over the
zero-audio control is what the category shortcut is worth; the real cache's gain beyond it is
what the sound is worth (docs/diagnostics.md).

The exemplars are training clips (never test clips) with a soundtrack, drawn by ``--seed`` from
the sorted candidates, and recorded in the new cache's index.json (its fingerprint gains
``category_exemplars``: video id, sound and category of each exemplar, and the source cache).

    python -m synthetic.category_audio_cache --source_cache demo_out/ast_cache \
        --metadata demo_out/data/metadata.json --out demo_out/category_cache

Shapes: N videos, A audio tokens, W token width.
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Optional, Sequence

import numpy as np

from dataloaders.audio_cache import AudioCacheWriter, AudioFeatureCache, read_index
from gate_log import read_video_entries

INFORMATIVE, IRRELEVANT = "informative", "irrelevant"
TRAIN_SPLIT = "train"
# Rows written per call (bounds the [rows, A, W] float16 block held in memory).
WRITE_BATCH = 64


def audio_category(entry: dict) -> str:
    """metadata.json video entry -> INFORMATIVE or IRRELEVANT (its ``informative_audio``)."""
    return INFORMATIVE if entry["informative_audio"] else IRRELEVANT


def read_video_metadata(path: str) -> dict:
    """metadata.json's "videos" (video id -> entry); errors name the file."""
    return read_video_entries(path, "--metadata", "synthetic/make_synthetic_av.py's metadata.json (written beside "
                                                  "MSRVTT_data.json)")


def choose_exemplars(cache: AudioFeatureCache, video_ids: Sequence[str], videos: dict, seed: int) -> dict:
    """One training clip with a soundtrack per audio category, drawn by ``seed`` from the sorted
    candidates: category -> video id. Raises when a category that the cache needs has none."""
    rng = np.random.default_rng(seed)
    needed = {audio_category(videos[v]) for v in video_ids}
    exemplars = {}
    for category in (INFORMATIVE, IRRELEVANT):
        if category not in needed:
            continue
        candidates = sorted(v for v in video_ids if videos[v]["split"] == TRAIN_SPLIT
                            and audio_category(videos[v]) == category and cache.has_audio(v))
        if not candidates:
            raise ValueError(f"--source_cache {cache.directory}: no training clip with {category} audio and a "
                             f"soundtrack to serve as the exemplar; cache the training split too")
        exemplars[category] = candidates[int(rng.integers(len(candidates)))]
    return exemplars


def build_category_cache(source_cache: str, metadata_path: str, out_dir: str, seed: int = 0) -> dict:
    """Write the control cache (module docstring) to ``out_dir``; returns its exemplars and counts.

    Args:
        source_cache: an AST-token cache (preprocess/cache_audio_features.py) of every clip.
        metadata_path: the benchmark's metadata.json (split and informative_audio per video).
        out_dir: the new cache directory (same videos, rows and shape as the source).
        seed: picks the exemplars among the candidates.
    """
    if os.path.abspath(source_cache) == os.path.abspath(out_dir):
        raise ValueError("--out must differ from --source_cache (the source tokens are read while writing)")
    index = read_index(source_cache)
    cache = AudioFeatureCache(source_cache)
    video_ids = sorted(index["rows"], key=index["rows"].get)  # row order
    missing = [v for v in video_ids if v not in cache]
    if missing:
        raise ValueError(f"--source_cache {source_cache}: {len(missing)} videos are not computed yet "
                         f"(e.g. {missing[:3]}); finish it with `python -m preprocess.cache_audio_features`")
    videos = read_video_metadata(metadata_path)
    unknown = [v for v in video_ids if v not in videos]
    if unknown:
        raise ValueError(f"--metadata {metadata_path} lacks {len(unknown)} videos of --source_cache "
                         f"{source_cache} (e.g. {unknown[:3]}): are they from the same benchmark?")
    exemplars = choose_exemplars(cache, video_ids, videos, seed)
    record = {category: {"video_id": vid, "sound": videos[vid]["sound"], "category": videos[vid]["category"]}
              for category, vid in exemplars.items()}
    fingerprint = {**(index.get("fingerprint") or {}),
                   "category_exemplars": {"exemplars": record, "seed": seed,
                                          "source_cache": os.path.abspath(source_cache)}}
    _, num_tokens, width = index["shape"]
    writer = AudioCacheWriter(out_dir, video_ids, fingerprint, num_tokens, width)
    tokens = {category: cache.tokens(vid) for category, vid in exemplars.items()}  # [A, W] each
    categories = [audio_category(videos[v]) for v in video_ids]
    for start in range(0, len(video_ids), WRITE_BATCH):
        rows = range(start, min(start + WRITE_BATCH, len(video_ids)))
        writer.write(rows, np.stack([tokens[categories[r]] for r in rows]), [True] * len(rows))
    return {"out": out_dir, "exemplars": record, "seed": seed,
            "clips_per_category": {c: categories.count(c) for c in exemplars}}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source_cache", required=True, help="AST-token cache of every clip (train and test)")
    parser.add_argument("--metadata", required=True, help="the benchmark's metadata.json")
    parser.add_argument("--out", required=True, help="the new cache directory")
    parser.add_argument("--seed", type=int, default=0, help="draws the exemplars among the training clips")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    summary = build_category_cache(args.source_cache, args.metadata, args.out, args.seed)
    print(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()
