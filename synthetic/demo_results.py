"""Aggregation of the synthetic-benchmark demo (synthetic/demo.py): subset recalls, gate
separation, score invariance under shuffling, the results table and the gate figure.

Everything here reads what ``main_task_retrieval.py --do_eval`` writes to its output
directory (``metrics.json``, ``sim_matrix.npy`` [Nt, Nv], ``sim_rows.json``,
``sim_cols.json``, ``gates.json``) and the generator's ``metadata.json`` (which clips have
an informative soundtrack); nothing is recomputed from the model.

Shapes: Nt texts (rows), Nv videos (columns), L fusion layers.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Optional

import matplotlib
import numpy as np
import torch

from metrics import roc_auc, text_to_video_ranks, video_to_text_ranks

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

PERCENT = 100.0
HISTOGRAM_BINS = 25


@dataclass
class EvalRun:
    """One evaluation's outputs.

    Args:
        metrics: metrics.json content ("plain" t2v/v2t metrics, protocol ...).
        sim: scores [Nt, Nv].
        rows: per row {"video_id", "caption"}; cols: video id per column.
        gates: gates.json content, or None for a model without gates.
    """

    metrics: dict
    sim: np.ndarray
    rows: list
    cols: list
    gates: Optional[dict]

    @property
    def caption_video(self) -> np.ndarray:
        """int [Nt]: the column of each row's video."""
        column = {video_id: c for c, video_id in enumerate(self.cols)}
        return np.array([column[row["video_id"]] for row in self.rows], dtype=np.int64)


def read_json(path: str):
    with open(path) as handle:
        return json.load(handle)


def load_eval_run(run_dir: str) -> EvalRun:
    """Read an evaluation output directory (see module docstring)."""
    gates_path = os.path.join(run_dir, "gates.json")
    return EvalRun(metrics=read_json(os.path.join(run_dir, "metrics.json")),
                   sim=np.load(os.path.join(run_dir, "sim_matrix.npy")),
                   rows=read_json(os.path.join(run_dir, "sim_rows.json")),
                   cols=read_json(os.path.join(run_dir, "sim_cols.json")),
                   gates=read_json(gates_path) if os.path.isfile(gates_path) else None)


def informative_flags(metadata: dict, video_ids: list) -> np.ndarray:
    """bool [len(video_ids)]: whether each video's soundtrack is informative (metadata.json)."""
    videos = metadata["videos"]
    missing = [v for v in video_ids if v not in videos]
    if missing:
        raise KeyError(f"videos {missing[:5]} are not in metadata.json; was the benchmark regenerated "
                       "after the run? Delete the demo's run folders and rerun")
    return np.array([bool(videos[v]["informative_audio"]) for v in video_ids])


CAPTION_KINDS = ("sound", "visual_informative", "visual_noise")
# Sound captions split by their clip's category: a twin's sound caption fits 3 identical-looking
# videos (only the sound tells them apart), a solo's names visuals that already identify the clip.
SOUND_SPLITS = ("sound_twin", "sound_solo")


def caption_kinds(metadata: dict, rows: list) -> np.ndarray:
    """str [Nt]: each evaluated caption's kind (metadata.json "test_captions", matched on video
    id and caption, so any row order works)."""
    kind_of = {(c["video_id"], c["caption"]): c["kind"] for c in metadata["test_captions"]}
    missing = [r for r in rows if (r["video_id"], r["caption"]) not in kind_of]
    if missing:
        raise KeyError(f"captions {missing[:3]} are not in metadata.json's test_captions; was the benchmark "
                       "regenerated after the run? Delete the demo's run folders and rerun")
    return np.array([kind_of[(r["video_id"], r["caption"])] for r in rows])


def sound_splits(kinds: np.ndarray, caption_video: np.ndarray, metadata: dict, video_ids: list) -> np.ndarray:
    """str [Nt]: "sound_twin" / "sound_solo" for sound captions (by their video's category), the
    caption's kind otherwise."""
    category = np.array([metadata["videos"][v]["category"] for v in video_ids])[caption_video]
    return np.where(kinds == "sound", np.char.add("sound_", category.astype(str)), kinds)


def kind_recalls(sim: np.ndarray, caption_video: np.ndarray, kinds: np.ndarray, k: int = 1,
                 names: tuple = CAPTION_KINDS) -> dict:
    """t2v R@k (percent) of the captions of each kind in ``names``, every caption ranking its
    video among all videos: {"t2v_R@k": {kind: x}} (None for a kind without captions)."""
    hits = (text_to_video_ranks(torch.as_tensor(sim, dtype=torch.float64), torch.as_tensor(caption_video))
            <= k).numpy()
    return {f"t2v_R@{k}": {kind: (float(PERCENT * hits[kinds == kind].mean()) if (kinds == kind).any() else None)
                           for kind in names}}


def subset_recalls(sim: np.ndarray, caption_video: np.ndarray, video_informative: np.ndarray,
                   k: int = 1) -> dict:
    """R@k (percent) of text-to-video and video-to-text queries restricted to one subset.

    Every query still ranks against the whole gallery (all Nv videos / all Nt texts); only
    the queries averaged over are restricted: texts whose video is informative (or noise),
    and informative (or noise) videos.

    Args:
        sim: scores [Nt, Nv]; caption_video: int [Nt], each text's video column.
        video_informative: bool [Nv].
    Returns: {"t2v_R@k": {"informative": x, "noise": y}, "v2t_R@k": {...}}; a subset without
        queries gives None.
    """
    scores = torch.as_tensor(sim, dtype=torch.float64)
    index = torch.as_tensor(caption_video)
    t2v_hit = (text_to_video_ranks(scores, index) <= k).numpy()
    v2t_hit = (video_to_text_ranks(scores, index) <= k).numpy()
    text_informative = video_informative[caption_video]

    def mean(hits: np.ndarray, mask: np.ndarray) -> Optional[float]:
        return float(PERCENT * hits[mask].mean()) if mask.any() else None

    return {f"t2v_R@{k}": {"informative": mean(t2v_hit, text_informative),
                           "noise": mean(t2v_hit, ~text_informative)},
            f"v2t_R@{k}": {"informative": mean(v2t_hit, video_informative),
                           "noise": mean(v2t_hit, ~video_informative)}}


def video_gate_values(gates: dict, video_ids: list) -> dict:
    """gates.json -> name -> |g| per video and layer [Nv, L], rows in ``video_ids`` order.

    Text-agnostic models store one gate vector per video; text-guided models store each
    caption's gates on its own video, averaged over the video's captions (``own_caption_mean``).
    """
    key = "own_caption_mean" if gates["text_guided"] else "gates"
    by_video = {entry["video_id"]: entry[key] for entry in gates["videos"]}
    return {name: np.abs(np.array([by_video[v][name] for v in video_ids], dtype=float))
            for name in gates["gate_names"]}


def gate_separation(last_layer: np.ndarray, video_informative: np.ndarray) -> dict:
    """How a last-layer |gate| per video [Nv] separates informative (positive) from noise clips
    (bool [Nv]): AUC and the mean gap (informative minus noise); None where a side is empty."""
    informative, noise = last_layer[video_informative], last_layer[~video_informative]
    return {"last_layer_auc": roc_auc(informative, noise),
            "last_layer_gap": (float(informative.mean() - noise.mean()) if len(informative) and len(noise)
                               else None)}


def gate_summary(gates: dict, video_ids: list, video_informative: np.ndarray) -> dict:
    """Mean |g| per layer on informative and noise videos for every gate, and for each gate the
    last layer's separation: AUC (informative = positive class) and the mean gap
    (informative minus noise)."""
    summary = {}
    for name, values in video_gate_values(gates, video_ids).items():
        informative, noise = values[video_informative], values[~video_informative]
        summary[name] = {
            "informative_mean": [float(x) for x in informative.mean(0)] if len(informative) else None,
            "noise_mean": [float(x) for x in noise.mean(0)] if len(noise) else None,
            **gate_separation(values[:, -1], video_informative),
        }
    return summary


def pair_scores(run: EvalRun) -> dict:
    """(caption, its video id, column video id) -> score, for order-free comparisons."""
    return {(row["caption"], row["video_id"], video_id): float(run.sim[i, j])
            for i, row in enumerate(run.rows) for j, video_id in enumerate(run.cols)}


def max_pair_difference(a: EvalRun, b: EvalRun) -> float:
    """Largest |score difference| of the same (text, video) pair in two evaluations whose rows
    and columns may be ordered differently; raises if they do not score the same pairs."""
    first, second = pair_scores(a), pair_scores(b)
    if first.keys() != second.keys():
        raise ValueError("the two evaluations do not score the same (text, video) pairs")
    return max(abs(first[key] - second[key]) for key in first)


def row_summary(run: EvalRun, metadata: dict) -> dict:
    """Plain metrics, subset R@1 (by caption kind, and by the video's audio) and (when the model
    has gates) the gate summary of one run."""
    video_informative = informative_flags(metadata, run.cols)
    plain = run.metrics["plain"]
    subsets = subset_recalls(run.sim, run.caption_video, video_informative)
    kinds = caption_kinds(metadata, run.rows)
    subsets["t2v_R@1"].update(kind_recalls(run.sim, run.caption_video, kinds)["t2v_R@1"])
    splits = sound_splits(kinds, run.caption_video, metadata, run.cols)
    subsets["t2v_R@1"].update(kind_recalls(run.sim, run.caption_video, splits, names=SOUND_SPLITS)["t2v_R@1"])
    summary = {"metrics": {key: plain[key] for key in
                           ("t2v_R@1", "t2v_R@5", "t2v_R@10", "t2v_MdR", "v2t_R@1", "v2t_R@5", "v2t_R@10")},
               "subsets": subsets,
               "num_texts": len(run.rows), "num_videos": len(run.cols),
               "num_informative_videos": int(video_informative.sum())}
    if run.gates is not None:
        summary["gates"] = gate_summary(run.gates, run.cols, video_informative)
    return summary


def _fmt(value: Optional[float], digits: int = 1) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def retrieval_table(rows: list) -> list:
    """Markdown lines of the main table. ``rows``: dicts with "label", "summary" (row_summary)
    and optionally "paired_block" (R@1 t2v under the leaking protocol)."""
    lines = ["| model | t2v R@1 | R@5 | R@10 | v2t R@1 | R@5 | R@10 | t2v R@1 sound captions | "
             "visual captions, informative audio | visual captions, noise clips | sound captions, twins | "
             "sound captions, solos | t2v R@1 paired_block (LEAKING) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        m, sub = row["summary"]["metrics"], row["summary"]["subsets"]["t2v_R@1"]
        leak = row.get("paired_block")
        lines.append(f"| {row['label']} | {_fmt(m['t2v_R@1'])} | {_fmt(m['t2v_R@5'])} | {_fmt(m['t2v_R@10'])} | "
                     f"{_fmt(m['v2t_R@1'])} | {_fmt(m['v2t_R@5'])} | {_fmt(m['v2t_R@10'])} | "
                     + " | ".join(_fmt(sub.get(kind)) for kind in CAPTION_KINDS + SOUND_SPLITS) + f" | {_fmt(leak)} |")
    return lines


def gate_table(rows: list) -> list:
    """Markdown lines: mean |g_att| and |g_ff| per layer (informative / noise) and the last
    layer's |g_att| AUC and gap, for every row with gates."""
    lines = ["| model | gate | mean abs g per layer: informative | noise | last-layer AUC | last-layer gap |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        for name, g in sorted(row["summary"].get("gates", {}).items()):
            def layers(values):
                return " / ".join(_fmt(v, 3) for v in values) if values else "–"
            lines.append(f"| {row['label']} | {name} | {layers(g['informative_mean'])} | "
                         f"{layers(g['noise_mean'])} | {_fmt(g['last_layer_auc'], 3)} | "
                         f"{_fmt(g['last_layer_gap'], 3)} |")
    return lines


def plot_gate_distributions(gates: dict, video_ids: list, video_informative: np.ndarray, title: str,
                            path: str) -> None:
    """PNG of |g| histograms per gate (rows) and layer (columns), informative vs noise clips."""
    values = video_gate_values(gates, video_ids)
    names = sorted(values)
    layers = values[names[0]].shape[1]
    fig, axes = plt.subplots(len(names), layers, figsize=(3.2 * layers, 2.6 * len(names)), squeeze=False)
    bins = np.linspace(0.0, 1.0, HISTOGRAM_BINS + 1)
    for r, name in enumerate(names):
        for layer in range(layers):
            ax = axes[r][layer]
            ax.hist(values[name][video_informative, layer], bins=bins, alpha=0.6, label="informative audio")
            ax.hist(values[name][~video_informative, layer], bins=bins, alpha=0.6, label="noise audio")
            ax.set_title(f"|g_{name}| layer {layer + 1}", fontsize=9)
            ax.set_xlabel("|g|", fontsize=8)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
