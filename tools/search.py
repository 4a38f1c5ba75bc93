"""Search a folder of your own videos with a text query, using a trained checkpoint.

    python -m tools.search --checkpoint ckpts/msrvtt_avigate/pytorch_model.bin.4 --videos my_clips/ \
        --query "a dog catches a frisbee" --top 10 [--index my_clips/.avigate_index] [--html hits.html]

The first call builds an index of the folder (every ``.mp4/.webm/.mkv/.avi`` file directly in it):
each clip's text-agnostic video features (CLIP frames, resampled audio, the fused scoring rows
and gates, docs/design.md §10) plus a small frame strip, one file per clip, written as it is done. A
later call (another query) reads the index; an interrupted build resumes; a clip added or
changed since (size or modification time) is encoded again. An index built with another
checkpoint or other frame settings is refused. Audio: ``<audio_dir>/<name>.wav`` with
``--audio_dir``, else the clip's own soundtrack (decoded with PyAV); a clip without one gets the
zero input (counted, docs/design.md §1).

The answer: ranked file names with scores and the gate values of the fusion that scored them
(|g| per fusion layer, docs/design.md §3). A text-guided checkpoint ranks every clip with its
text-agnostic view and re-scores the top ``--rerank_topk`` under the query (docs/design.md §4a).
``--html PAGE`` writes a static page with each hit's frame strip and gates.
"""
from __future__ import annotations

import argparse
import base64
import dataclasses
import html
import json
import os
import sys
from dataclasses import dataclass
from typing import Optional, Sequence

import cv2
import torch
import torch.nn.functional as nnf

import atomic_io
import checkpoint_record
import util
from dataloaders.audio import FbankConfig, ast_input, load_ast_input, zero_ast_input
from dataloaders.base import find_video_files
from dataloaders.video import FrameSamplingConfig, normalize_frames, read_frames
from modules.modeling import AVIGATE, AVIGATEConfig, TextFeatures, VideoFeatures
from modules.rerank import top_k_with_keys
from modules.tokenization_clip import ClipTokenizer
from modules.weights import file_sha256
from preprocess.extract_audio import decode_mono

INDEX_FILE = "index.json"
CLIPS_DIR = "clips"
DEFAULT_INDEX_NAME = ".avigate_index"
STRIP_HEIGHT = 64   # pixels of a frame in the page's strips
INDEX_VERSION = 1


@dataclass
class Hit:
    """One ranked clip: rank (1 = best), file name, score, how it was scored
    ("text-guided" or "agnostic") and its gates {name: [|g| per fusion layer]}."""

    rank: int
    name: str
    score: float
    scored_by: str
    gates: dict


# ----------------------------------------------------------------------------- model

def load_model(checkpoint: str, device: torch.device) -> AVIGATE:
    """The model of a training run's checkpoint, built from its record (pytorch_model.bin.N.json)."""
    record = checkpoint_record.read_record(checkpoint, "--checkpoint")
    if record is None:
        raise SystemExit(f"--checkpoint {checkpoint}: no record {checkpoint_record.record_path(checkpoint)} beside "
                         f"it; search needs a checkpoint written by main_task_retrieval.py (its record says the "
                         f"architecture)")
    cfg = checkpoint_record.dataclass_from_dict(AVIGATEConfig, record["model_config"],
                                                checkpoint_record.record_path(checkpoint))
    model = AVIGATE(cfg)
    util.load_model_weights(model, checkpoint)
    return model.to(device).eval()


def frame_config(model: AVIGATE) -> FrameSamplingConfig:
    """Frames as the checkpoint was trained with (1 fps, uniform over the clip)."""
    return FrameSamplingConfig(max_frames=model.cfg.fusion.max_frames, image_size=model.cfg.clip.image_resolution)


# ----------------------------------------------------------------------------- index

def fingerprint(checkpoint: str, frames: FrameSamplingConfig, audio_dir: Optional[str]) -> dict:
    """What the indexed features depend on."""
    return {"version": INDEX_VERSION, "checkpoint": {"file": os.path.abspath(checkpoint),
                                                     "sha256": file_sha256(checkpoint)},
            "frames": dataclasses.asdict(frames),
            "audio": os.path.abspath(audio_dir) if audio_dir else "the clips' own soundtracks"}


def open_index(index_dir: str, expected: dict) -> None:
    """Create ``index_dir`` or check that it was built with the same settings."""
    path = os.path.join(index_dir, INDEX_FILE)
    if os.path.isfile(path):
        with open(path) as f:
            stored = json.load(f)
        if stored != expected:
            raise SystemExit(f"--index {index_dir} was built with other settings ({stored}) than this call "
                             f"({expected}); pass another --index or delete {index_dir}")
        return
    os.makedirs(os.path.join(index_dir, CLIPS_DIR), exist_ok=True)
    util.write_json(path, expected)


def file_stamp(path: str) -> dict:
    stat = os.stat(path)
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def clip_entry_path(index_dir: str, name: str) -> str:
    return os.path.join(index_dir, CLIPS_DIR, name + ".pt")


def read_entry(index_dir: str, name: str, video: str) -> Optional[dict]:
    """The indexed entry of a clip, None when missing or made from an older version of the file."""
    path = clip_entry_path(index_dir, name)
    if not os.path.isfile(path):
        return None
    entry = torch.load(path, map_location="cpu", weights_only=True)
    return entry if entry["stamp"] == file_stamp(video) else None


def clip_audio(model: AVIGATE, video: str, name: str, audio_dir: Optional[str],
               fbank_cfg: FbankConfig) -> tuple[Optional[torch.Tensor], bool]:
    """AST input [1024, 128] of a clip and whether it had sound (None for a visual-only model)."""
    if model.ast is None:
        return None, False
    if audio_dir:
        return load_ast_input(os.path.join(audio_dir, name + ".wav"), fbank_cfg, on_bad_audio="zero")
    waveform = decode_mono(video, fbank_cfg.sample_rate)
    if waveform is None:
        return zero_ast_input(fbank_cfg), False
    return ast_input(torch.from_numpy(waveform), fbank_cfg.sample_rate, fbank_cfg), True


def frame_strip(frames: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
    """uint8 [F, 3, S, S] -> the real frames side by side, STRIP_HEIGHT high: uint8 [3, h, w]."""
    real = frames[frame_mask].float()
    small = nnf.interpolate(real, size=(STRIP_HEIGHT, STRIP_HEIGHT), mode="bilinear", antialias=True)
    return torch.cat(list(small), dim=2).round().clamp(0, 255).to(torch.uint8)


@torch.no_grad()
def encode_clip(model: AVIGATE, video: str, name: str, frames_cfg: FrameSamplingConfig,
                audio_dir: Optional[str]) -> dict:
    """One clip's index entry: its VideoFeatures (one row), has_audio, frame strip and file stamp."""
    device = model.logit_scale.device
    frames, frame_mask = read_frames(video, frames_cfg)
    fbank, has_audio = clip_audio(model, video, name, audio_dir, FbankConfig())
    features = model.encode_video(normalize_frames(frames[None], frame_mask[None], device), frame_mask[None].to(device),
                                  None if fbank is None else fbank[None].to(device))
    return {"stamp": file_stamp(video), "has_audio": has_audio, "strip": frame_strip(frames, frame_mask),
            "features": features_to_dict(features.to("cpu"))}


def features_to_dict(features: VideoFeatures) -> dict:
    return {"frames": features.frames, "frame_mask": features.frame_mask, "audio": features.audio,
            "index": features.index, "gates": features.gates}


def features_from_dicts(entries: Sequence[dict]) -> VideoFeatures:
    return VideoFeatures.cat([VideoFeatures(**entry["features"]) for entry in entries])


def build_index(model: AVIGATE, videos_dir: str, index_dir: str, checkpoint: str,
                audio_dir: Optional[str]) -> dict[str, dict]:
    """Every clip's entry (file name -> entry), encoding only the clips not indexed yet."""
    files = find_video_files(videos_dir)
    if not files:
        raise SystemExit(f"--videos {videos_dir}: no .mp4/.webm/.mkv/.avi file in it")
    frames_cfg = frame_config(model)
    open_index(index_dir, fingerprint(checkpoint, frames_cfg, audio_dir))
    entries, encoded = {}, 0
    for stem, video in sorted(files.items()):
        name = os.path.basename(video)
        entry = read_entry(index_dir, stem, video)
        if entry is None:
            entry = encode_clip(model, video, stem, frames_cfg, audio_dir)
            atomic_io.save_torch(entry, clip_entry_path(index_dir, stem))
            encoded += 1
        entries[name] = entry
    silent = sum(not e["has_audio"] for e in entries.values()) if model.ast is not None else 0
    print(f"index {index_dir}: {len(entries)} clips ({encoded} encoded now, {len(entries) - encoded} from the "
          f"index); {silent} without sound (zero audio input)", file=sys.stderr)
    return entries


# ----------------------------------------------------------------------------- ranking

@torch.no_grad()
def encode_query(model: AVIGATE, query: str, max_words: int) -> TextFeatures:
    ids, mask = ClipTokenizer().tokenize_batch([query], max_words)
    device = model.logit_scale.device
    return model.encode_text(ids.to(device), mask.to(device))


def gate_values(gates: dict, row) -> dict:
    """{name: [|g| per layer]} of one clip (docs/design.md §3: analyses use |g|)."""
    return {name: [round(abs(float(g)), 4) for g in value[row]] for name, value in gates.items()}


@torch.no_grad()
def rank_clips(model: AVIGATE, text: TextFeatures, videos: VideoFeatures, names: Sequence[str],
               rerank_topk: int) -> list[Hit]:
    """Every clip ranked for one query; a text-guided model re-scores its agnostic top K under the query."""
    stage1 = model.agnostic_scores(text, videos)                     # scores [1, Nv], gates [Nv, L]
    keys = torch.arange(len(names))                                  # ties: by file name (names are sorted)
    order = top_k_with_keys(stage1.scores.cpu(), len(names), keys)[0]
    if not model.text_guided:
        return [Hit(r + 1, names[v], float(stage1.scores[0, v]), "agnostic", gate_values(videos.gates, v))
                for r, v in enumerate(order.tolist())]
    shortlist = order[:min(rerank_topk, len(names))]
    guided = model.score_with_gates(text, videos.select(shortlist))  # scores [1, K], gates [1, K, L]
    by_guided = torch.sort(guided.scores[0].cpu(), descending=True, stable=True).indices
    hits = [Hit(0, names[int(shortlist[i])], float(guided.scores[0, i]), "text-guided",
                {n: [round(abs(float(x)), 4) for x in g[0, i]] for n, g in guided.gates.items()})
            for i in by_guided.tolist()]
    hits += [Hit(0, names[v], float(stage1.scores[0, v]), "agnostic", gate_values(videos.gates, v))
             for v in order[len(shortlist):].tolist()]
    for rank, hit in enumerate(hits, 1):
        hit.rank = rank
    return hits


# ----------------------------------------------------------------------------- output

def hit_line(hit: Hit) -> str:
    gates = "  ".join(f"{n} " + ",".join(f"{g:.3f}" for g in v) for n, v in hit.gates.items())
    return f"{hit.rank:3d}. {hit.name}  score {hit.score:.4f} ({hit.scored_by})" + (f"  |g| {gates}" if gates else "")


def png_data_uri(image: torch.Tensor) -> str:
    """uint8 RGB [3, h, w] -> data:image/png;base64,..."""
    ok, encoded = cv2.imencode(".png", cv2.cvtColor(image.permute(1, 2, 0).numpy(), cv2.COLOR_RGB2BGR))
    if not ok:
        raise RuntimeError("PNG encoding of a frame strip failed")
    return "data:image/png;base64," + base64.b64encode(encoded.tobytes()).decode("ascii")


def render_page(query: str, checkpoint: str, hits: Sequence[Hit], entries: dict) -> str:
    """A static HTML page: the query, then one row per hit (rank, file, score, gates, frame strip)."""
    rows = []
    for hit in hits:
        gates = "".join(f"<li>{html.escape(n)}: {', '.join(f'{g:.3f}' for g in v)}</li>" for n, v in hit.gates.items())
        strip = png_data_uri(entries[hit.name]["strip"])
        rows.append(f'<tr class="hit" data-rank="{hit.rank}" data-file="{html.escape(hit.name)}" '
                    f'data-score="{hit.score:.6f}"><td>{hit.rank}</td><td>{html.escape(hit.name)}</td>'
                    f'<td>{hit.score:.4f} ({hit.scored_by})</td><td><ul class="gates">{gates}</ul></td>'
                    f'<td><img alt="frames of {html.escape(hit.name)}" src="{strip}">'
                    f'</td></tr>')
    return ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>search: "
            f"{html.escape(query)}</title></head><body>\n<h1>{html.escape(query)}</h1>\n"
            f"<p>checkpoint {html.escape(checkpoint)}; |g| = gate magnitude per fusion layer</p>\n"
            "<table><tr><th>rank</th><th>file</th><th>score</th><th>gates</th><th>frames</th></tr>\n"
            + "\n".join(rows) + "\n</table></body></html>\n")


# ----------------------------------------------------------------------------- command line

def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="pytorch_model.bin.N of a training run (with its record)")
    p.add_argument("--videos", required=True, help="folder of clips to search")
    p.add_argument("--query", required=True, help="what to look for, in words")
    p.add_argument("--top", type=int, default=10, help="hits to show (default: 10)")
    p.add_argument("--index", default=None, help=f"index folder (default: <videos>/{DEFAULT_INDEX_NAME})")
    p.add_argument("--audio_dir", default=None, help="<name>.wav files (default: the clips' own soundtracks)")
    p.add_argument("--rerank_topk", type=int, default=50,
                   help="text-guided checkpoints: agnostic shortlist re-scored under the query (default: 50)")
    p.add_argument("--max_words", type=int, default=32, help="query tokens, start and end included (default: 32)")
    p.add_argument("--html", default=None, help="also write a static page with frame strips and gates")
    p.add_argument("--json", default=None, help="also write the hits as JSON")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    args = p.parse_args(argv)
    for flag, low in (("top", 1), ("rerank_topk", 1), ("max_words", 3)):
        if getattr(args, flag) < low:
            p.error(f"--{flag} must be >= {low}, got {getattr(args, flag)}")
    if not os.path.isdir(args.videos):
        p.error(f"--videos {args.videos}: no such folder")
    if args.audio_dir and not os.path.isdir(args.audio_dir):
        p.error(f"--audio_dir {args.audio_dir}: no such folder")
    return args


def main(argv: Optional[Sequence[str]] = None) -> list[Hit]:
    """Index the folder (once), rank its clips for the query, print the top hits; returns every hit."""
    args = parse_args(argv)
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    model = load_model(args.checkpoint, device)
    index_dir = args.index or os.path.join(args.videos, DEFAULT_INDEX_NAME)
    entries = build_index(model, args.videos, index_dir, args.checkpoint, args.audio_dir)
    names = list(entries)
    videos = features_from_dicts([entries[n] for n in names]).to(device)
    hits = rank_clips(model, encode_query(model, args.query, args.max_words), videos, names, args.rerank_topk)
    for hit in hits[:args.top]:
        print(hit_line(hit))
    if args.json:
        util.write_json(args.json, {"query": args.query, "checkpoint": args.checkpoint,
                                    "hits": [dataclasses.asdict(h) for h in hits[:args.top]]})
    if args.html:
        atomic_io.write_text(args.html, render_page(args.query, args.checkpoint, hits[:args.top], entries))
        print(f"page: {args.html}", file=sys.stderr)
    return hits


if __name__ == "__main__":
    main()
