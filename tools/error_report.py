"""The worst queries of an evaluation as a readable Markdown page.

Reads ``topk.jsonl`` (written by ``main_task_retrieval.py --do_eval --dump_topk K``) and
``metrics.json`` from an evaluation's output directory and lists the N texts whose correct
video ranked worst (ties: the larger gap between the best score and the correct video's
score first): the caption, the correct video, its rank and score, and the text's top-K
videos with their scores and, where the model has gates, the gates of each listed pair
(text-guided models: the pair's own fusion; text-agnostic models: the video's gates).

    python -m tools.error_report --run runs/tg/eval --worst 20            # -> runs/tg/eval/error_report.md
    python -m tools.error_report --run runs/tg/eval --worst 20 --output -  # print it
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence

TOPK_FILE = "topk.jsonl"  # evaluation.TOPK_FILE (not imported: this tool needs no torch)
REPORT_FILE = "error_report.md"


def read_records(run_dir: str) -> list:
    path = os.path.join(run_dir, TOPK_FILE)
    if not os.path.isfile(path):
        raise SystemExit(f"{path} not found: evaluate with `main_task_retrieval.py --do_eval --dump_topk K "
                         f"--output_dir {run_dir}` first")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def read_optional_json(path: str):
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def worst_queries(records: list, count: int) -> list:
    """The ``count`` records whose correct video ranked worst; ties: larger score gap first."""
    return sorted(records, key=lambda r: (-r["rank"], r["score"] - r["top"][0]["score"], r["text_index"]))[:count]


def _gate_text(values: Optional[list]) -> str:
    return "–" if values is None else " ".join(f"{v:+.3f}" for v in values)


def _header(run_dir: str, metrics: dict, records: list, num_videos: int) -> list:
    plain = metrics.get("plain", {})
    perturbation = metrics.get("audio_perturbation", {"kind": "none"})
    audio = perturbation.get("kind", "none")
    if audio == "noise":
        audio += f" (RMS {perturbation.get('noise_rms')}, seed {perturbation.get('seed')})"
    elif audio == "swap":
        audio += f" (seed {perturbation.get('seed')})"
    k = max((len(r["top"]) for r in records), default=0)
    lines = [f"# Error report: `{run_dir}`", "",
             f"Protocol: {metrics.get('protocol', '?')} · audio: {audio} · t2v R@1 "
             f"{plain.get('t2v_R@1', float('nan')):.2f} · {len(records)} texts, {num_videos} videos, "
             f"top-{k} listed per text", "",
             "Ranks count ties pessimistically, as the metrics do; the lists break ties by video id.", ""]
    if "LEAKING" in metrics:
        lines += [f"**{metrics['LEAKING']}**", ""]
    if "rerank" in metrics:
        lines += [f"Re-ranked (K = {metrics['rerank']['topk']}): scores of fused pairs are text-guided, the others "
                  "stage-1 (agnostic) scores; unfused pairs have no pair gates.", ""]
    return lines


def query_section(number: int, record: dict, num_videos: int, gate_names: list) -> list:
    """Markdown of one query: caption, correct video and its rank, the top-K table."""
    reranked = any("text_guided" in e for e in record["top"])
    lines = [f"## {number}. \"{record['caption']}\"", "",
             f"Text #{record['text_index']}. Correct video `{record['video_id']}`: rank {record['rank']} of "
             f"{num_videos} (score {record['score']:.3f}).", ""]
    head = ["#", "video", "score", *(["scored by"] if reranked else []), *[f"g_{n} (per layer)" for n in gate_names]]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for slot, entry in enumerate(record["top"], start=1):
        correct = entry["video_id"] == record["video_id"]
        video = f"**`{entry['video_id']}`** (correct)" if correct else f"`{entry['video_id']}`"
        cells = [str(slot), video, f"{entry['score']:.3f}"]
        if reranked:
            cells.append("pair fusion" if entry.get("text_guided") else "stage 1")
        gates = entry.get("gates")
        cells += [_gate_text(None if gates is None else gates.get(n)) for n in gate_names]
        lines.append("| " + " | ".join(cells) + " |")
    if all(e["video_id"] != record["video_id"] for e in record["top"]):
        lines.append(f"\nThe correct video is not among the {len(record['top'])} listed.")
    return lines + [""]


def render(run_dir: str, worst: int) -> str:
    records = read_records(run_dir)
    metrics = read_optional_json(os.path.join(run_dir, "metrics.json")) or {}
    cols = read_optional_json(os.path.join(run_dir, "sim_cols.json"))
    num_videos = len(cols) if cols is not None else metrics.get("num_videos", "?")
    gate_names = sorted({n for r in records for e in r["top"] if e.get("gates") for n in e["gates"]})
    lines = _header(run_dir, metrics, records, num_videos)
    if gate_names:
        lines += ["Gates are signed (a tanh gate can settle at either sign); compare |g|.", ""]
    for number, record in enumerate(worst_queries(records, worst), start=1):
        lines += query_section(number, record, num_videos, gate_names)
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--run", required=True, help="evaluation output directory holding topk.jsonl")
    parser.add_argument("--worst", type=int, default=20, help="queries to show")
    parser.add_argument("--output", default=None, help=f"Markdown file (default RUN/{REPORT_FILE}; - = stdout)")
    args = parser.parse_args(argv)
    if args.worst < 1:
        parser.error(f"--worst must be >= 1, got {args.worst}")
    page = render(args.run, args.worst)
    if args.output == "-":
        sys.stdout.write(page)
        return 0
    path = args.output or os.path.join(args.run, REPORT_FILE)
    with open(path, "w") as f:
        f.write(page)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
