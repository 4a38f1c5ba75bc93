"""Per-epoch gate statistics written by training (``--gate_log_split``; docs/diagnostics.md).

Before training and after every epoch, the videos of one labelled split are encoded once by
the text-agnostic video encoder (a text-guided model: its agnostic view, t := 0), and the
gates of every fusion layer are summarized per group of videos (informative vs noise audio,
from per-video labels such as the synthetic benchmark's metadata.json): mean |g_att|,
mean |g_ff|, the count, and the AUC of |g| (informative = positive class) per layer.
``gates_per_epoch.json`` and the figure ``gates_per_epoch.png`` in the run's output
directory are rewritten after each entry.

The pass runs without gradients, in eval mode, through a DataLoader with its own generator,
so it draws nothing from the training RNG streams and leaves the data order alone: the
training numbers are those of a run without it. Every rank encodes its shard; rank 0 writes.

Shapes: Nv videos, L fusion layers.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from dataloaders.base import collate_items
from evaluation import encode_dataset
from metrics import roc_auc
from util import DistInfo, write_json

GATE_LOG_FILE = "gates_per_epoch.json"
GATE_LOG_FIGURE = "gates_per_epoch.png"
GATE_LOG_SPLITS = ("none", "val", "test")
INFORMATIVE, NOISE = "informative", "noise"
LABEL_KEY = "informative_audio"


def read_video_entries(path: str, flag: str, what: str) -> dict:
    """The "videos" mapping (video id -> entry) of a metadata.json-style file; errors name ``flag``
    and say ``what`` the file should be."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{flag} {path!r} does not exist: it should be {what}")
    with open(path) as handle:
        videos = json.load(handle).get("videos")
    if not isinstance(videos, dict):
        raise ValueError(f"{flag} {path}: no \"videos\" mapping of video id -> entry; it should be {what}")
    return videos


def read_informative_labels(path: str, video_ids: list) -> np.ndarray:
    """bool [Nv]: each video's ``informative_audio`` from a metadata.json-style file
    ({"videos": {video_id: {"informative_audio": bool}}}); errors name --gate_labels."""
    videos = read_video_entries(path, "--gate_labels", f"the per-video labels --gate_log_split needs (the synthetic "
                                f"benchmark's metadata.json, or a file with {{\"{LABEL_KEY}\": bool}} per video)")
    missing = [v for v in video_ids if LABEL_KEY not in videos.get(v, {})]
    if missing:
        raise KeyError(f"--gate_labels {path} has no {LABEL_KEY!r} for {len(missing)} videos of the logged split "
                       f"(e.g. {missing[:3]})")
    return np.array([bool(videos[v][LABEL_KEY]) for v in video_ids])


def gate_epoch_stats(gates: dict, informative: np.ndarray) -> dict:
    """gates name -> [Nv, L] values, informative bool [Nv] -> per gate: per group the mean |g|
    per layer and the count, the AUC of |g| per layer (informative positive; None when a group
    is empty) and the last layer's AUC."""
    out = {}
    for name, values in gates.items():
        absolute = np.abs(np.asarray(values, dtype=np.float64))  # [Nv, L]
        groups = {INFORMATIVE: absolute[informative], NOISE: absolute[~informative]}
        auc = [roc_auc(groups[INFORMATIVE][:, layer], groups[NOISE][:, layer]) for layer in range(absolute.shape[1])]
        out[name] = {**{group: {"mean_abs": [float(x) for x in v.mean(0)] if len(v) else None, "count": int(len(v))}
                        for group, v in groups.items()},
                     "auc": auc, "last_layer_auc": auc[-1] if auc else None}
    return out


@dataclass
class GateLog:
    """The per-epoch gate log of one run.

    Args:
        videos: VideoDataset of the logged split; informative: bool [Nv] labels.
        output_dir: where the JSON and the figure go.
        header: split, label file and counts (written at the top of the JSON).
        batch_size, workers, precision: how the videos are encoded.
        entries: one dict per logged epoch (epoch 0 = before training).
    """

    videos: object
    informative: np.ndarray
    output_dir: str
    header: dict
    batch_size: int = 16
    workers: int = 0
    precision: str = "fp32"
    entries: list = field(default_factory=list)

    @property
    def path(self) -> str:
        return os.path.join(self.output_dir, GATE_LOG_FILE)

    def resume(self, previous_dir: str, epochs_done: int) -> None:
        """Continue the log of an interrupted run (its output folder ``previous_dir``, which may be
        this run's): keep its entries for epochs 0..epochs_done."""
        path = os.path.join(previous_dir, GATE_LOG_FILE)
        if os.path.isfile(path):
            with open(path) as handle:
                self.entries = [e for e in json.load(handle)["epochs"] if e["epoch"] <= epochs_done]

    @torch.no_grad()
    def record(self, model: torch.nn.Module, epoch: int, step: int, info: DistInfo) -> Optional[dict]:
        """Encode the split (all ranks), summarize and write (rank 0); returns the entry on rank 0.

        Args:
            epoch: epochs completed (0 = before training); step: optimizer steps so far.
        """
        features = encode_dataset(model, self.videos, "video", self.batch_size, self.workers, collate_items, info,
                                   self.precision, desc=f"gate log epoch {epoch}")
        if not info.is_main:
            return None
        gates = {name: value.numpy() for name, value in features.gates.items()}
        entry = {"epoch": epoch, "step": step, "gates": gate_epoch_stats(gates, self.informative)}
        self.entries = [e for e in self.entries if e["epoch"] != epoch] + [entry]
        log = {**self.header, "epochs": self.entries}
        write_json(self.path, log)
        plot_gate_log(log, os.path.join(self.output_dir, GATE_LOG_FIGURE))
        return entry


def plot_gate_log(log: dict, path: str) -> None:
    """PNG: per gate, mean |g| per layer over the epochs (informative solid, noise dashed), and
    the last layer's AUC of every gate."""
    import matplotlib  # plotting only when a gate log is written (training imports stay light)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [e["epoch"] for e in log["epochs"]]
    names = sorted(log["epochs"][0]["gates"])
    fig, axes = plt.subplots(1, len(names) + 1, figsize=(4.2 * (len(names) + 1), 3.4), squeeze=False)
    for ax, name in zip(axes[0], names):
        layers = len(log["epochs"][0]["gates"][name]["auc"])
        for layer in range(layers):
            for group, style in ((INFORMATIVE, "-"), (NOISE, "--")):
                values = [e["gates"][name][group]["mean_abs"] for e in log["epochs"]]
                if values[0] is not None:
                    ax.plot(epochs, [v[layer] for v in values], style, color=f"C{layer}",
                            label=f"layer {layer + 1} {group}")
        ax.set_title(f"mean |g_{name}|", fontsize=9)
        ax.legend(fontsize=6)
    auc_ax = axes[0][-1]
    for name in names:
        auc = [e["gates"][name]["last_layer_auc"] for e in log["epochs"]]
        auc_ax.plot(epochs, [np.nan if a is None else a for a in auc], marker="o", label=f"|g_{name}|")
    auc_ax.axhline(0.5, color="grey", linewidth=0.8)
    auc_ax.set_ylim(0.0, 1.0)
    auc_ax.set_title("last layer AUC, informative vs noise", fontsize=9)
    auc_ax.legend(fontsize=6)
    for ax in axes[0]:
        ax.set_xticks(epochs)  # whole epochs (0 = before training)
        ax.set_xlabel("epoch", fontsize=8)
    fig.suptitle(f"gates per epoch ({log['split']}: {log['counts'][INFORMATIVE]} informative, "
                 f"{log['counts'][NOISE]} noise videos; {log['view']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
