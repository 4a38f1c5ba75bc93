"""Short supervised pre-training of a (tiny) AST trunk on labelled synthetic sound clips.

Stands in for the AudioSet pre-training of the released AST checkpoint: the retrieval model
keeps the AST trunk frozen, so a randomly initialized trunk would hand it unlearned audio
tokens. The clips are the generator's separate pre-training set
(``synthetic/make_synthetic_av.py --audio_pretrain_clips N``: ``audio_pretrain/*.wav`` and
``audio_pretrain_labels.json``), never the benchmark's train or test clips. The classifier reads
the mean of all normalized output tokens (``AST.norm(AST.tokens)``), so every token the
retrieval model's resampler attends to is trained (the released AST classifies the CLS and
distillation tokens only; with a two-block trunk and ~100 steps, mean pooling reached 88%
held-out accuracy where the pooled token reached 38%). Trunk and classifier train together,
and the result is written in the AudioSet checkpoint format (``module.v.*``
trunk, ``module.mlp_head.*`` classifier) that ``AST.from_checkpoint`` and
``preprocess/cache_audio_features.py`` read. A JSON report (losses, held-out accuracy, time)
is written beside it.

    python -m synthetic.pretrain_audio_trunk --data_dir data/synthetic_av \
        --init_checkpoint demo_runs/checkpoints/ast_tiny.pth --out demo_runs/checkpoints/ast_pretrained.pth

Shapes: N clips, B batch, T fbank frames, M mel bins, A audio tokens, W width, C classes.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from atomic_io import save_torch, write_json
from dataloaders.audio import FbankConfig, load_ast_input
from modules.ast import AST
from synthetic.make_synthetic_av import PRETRAIN_DIR, PRETRAIN_LABELS
from synthetic.make_tiny_checkpoints import ast_to_audioset_checkpoint, audioset_head

REPORT_SUFFIX = ".json"
FBANK_BATCH = 16


@dataclass
class PretrainConfig:
    """Pre-training settings (every field is a CLI flag of the same name).

    Args:
        steps: optimizer steps; batch_size: clips per step.
        lr: peak AdamW learning rate (linear warmup over warmup_steps, then cosine to 0).
        weight_decay: AdamW decoupled weight decay.
        val_fraction: share of the clips held out to report accuracy (not trained on).
        workers: processes computing the fbanks; seed: initialization of the classifier,
            batch order and the held-out split.
    """

    steps: int = 100
    batch_size: int = 16
    lr: float = 1e-3
    warmup_steps: int = 5
    weight_decay: float = 0.05
    val_fraction: float = 0.1
    workers: int = 2
    seed: int = 0


class LabelledFbanks(Dataset):
    """AST inputs of labelled wav files.

    Args:
        paths: wav files; fbank_cfg: fbank settings.
    """

    def __init__(self, paths: Sequence[str], fbank_cfg: FbankConfig):
        self.paths = list(paths)
        self.fbank_cfg = fbank_cfg

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, item: int) -> torch.Tensor:
        """-> fbank [T, M]; a missing file is an error (the labels promise the clip)."""
        if not os.path.isfile(self.paths[item]):
            raise FileNotFoundError(f"{self.paths[item]} is listed in {PRETRAIN_LABELS} but missing; "
                                    "regenerate the benchmark")
        fbank, _ = load_ast_input(self.paths[item], self.fbank_cfg)
        return fbank


def read_labels(data_dir: str) -> tuple[list[str], torch.Tensor, list[str]]:
    """(wav paths [N], labels [N], class names [C]) from the generator's label file."""
    path = os.path.join(data_dir, PRETRAIN_LABELS)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: generate the benchmark with "
                                "synthetic/make_synthetic_av.py --audio_pretrain_clips N (N > 0)")
    with open(path) as handle:
        table = json.load(handle)
    if not table["clips"]:
        raise ValueError(f"{path} lists no clips: regenerate with --audio_pretrain_clips N (N > 0)")
    paths = [os.path.join(data_dir, PRETRAIN_DIR, clip["file"]) for clip in table["clips"]]
    labels = torch.tensor([clip["label"] for clip in table["clips"]], dtype=torch.long)
    return paths, labels, list(table["classes"])


def compute_fbanks(paths: Sequence[str], workers: int) -> torch.Tensor:
    """AST inputs of every clip -> [N, T, M], computed once (the trunk reads them every epoch)."""
    loader = DataLoader(LabelledFbanks(paths, FbankConfig()), batch_size=FBANK_BATCH, num_workers=workers)
    return torch.cat([batch for batch in tqdm(loader, desc="pre-training fbanks", unit="batch")])


def trunk_tokens(ast: AST, fbank: torch.Tensor) -> torch.Tensor:
    """fbank [B, T, M] -> tokens [B, A, W] with gradients.

    ``AST.tokens`` keeps its graph only while the trunk's parameters require gradients (the
    retrieval model freezes them unless --train_ast); pre-training turns them on
    (TrunkClassifier).
    """
    if not ast.trunk_trainable:
        raise ValueError("pre-training trains the AST trunk: turn on its requires_grad first")
    return ast.tokens(fbank)


class TrunkClassifier(nn.Module):
    """AST trunk + final norm + AudioSet-style classifier on the mean token.

    Args:
        ast: the trunk (all of it is trained here); num_classes: C.
    """

    def __init__(self, ast: AST, num_classes: int):
        super().__init__()
        self.ast = ast
        self.head = audioset_head(ast.cfg.embed_dim, num_classes)
        for param in ast.parameters():
            param.requires_grad_(True)

    def forward(self, fbank: torch.Tensor) -> torch.Tensor:
        """fbank [B, T, M] -> class logits [B, C]."""
        pooled = self.ast.norm(trunk_tokens(self.ast, fbank)).mean(dim=1)  # [B, W]
        return self.head(pooled)


def split_indices(num_clips: int, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train indices, held-out indices), a seeded random split."""
    order = torch.randperm(num_clips, generator=torch.Generator().manual_seed(seed))
    held_out = int(round(num_clips * val_fraction))
    if held_out >= num_clips:
        raise ValueError(f"--val_fraction {val_fraction} leaves no training clip out of {num_clips}")
    return order[held_out:], order[:held_out]


def warmup_cosine(step: int, total: int, warmup: int) -> float:
    """Learning-rate multiplier: linear warmup over ``warmup`` steps, then cosine to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def train(model: TrunkClassifier, fbanks: torch.Tensor, labels: torch.Tensor, train_idx: torch.Tensor,
          cfg: PretrainConfig) -> list[float]:
    """cfg.steps AdamW steps on random batches of the training clips; returns the losses."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                                  weight_decay=cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, cfg.steps, cfg.warmup_steps))
    generator = torch.Generator().manual_seed(cfg.seed)
    model.train()
    losses = []
    progress = tqdm(range(cfg.steps), desc="audio trunk pre-training", unit="step")
    for _ in progress:
        batch = train_idx[torch.randint(len(train_idx), (cfg.batch_size,), generator=generator)]
        loss = F.cross_entropy(model(fbanks[batch]), labels[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        progress.set_postfix(loss=f"{losses[-1]:.3f}")
    return losses


@torch.no_grad()
def accuracy(model: TrunkClassifier, fbanks: torch.Tensor, labels: torch.Tensor, index: torch.Tensor,
             batch_size: int) -> Optional[float]:
    """Top-1 accuracy (%) on the clips ``index``; None when there are none."""
    if len(index) == 0:
        return None
    model.eval()
    correct = sum(int((model(fbanks[part]).argmax(-1) == labels[part]).sum())
                  for part in index.split(batch_size))
    return 100.0 * correct / len(index)


def pretrain(data_dir: str, init_checkpoint: str, out_path: str, cfg: PretrainConfig) -> dict:
    """Pre-train, write the AudioSet-format checkpoint and its JSON report; returns the report."""
    start = time.time()
    torch.manual_seed(cfg.seed)
    paths, labels, classes = read_labels(data_dir)
    fbanks = compute_fbanks(paths, cfg.workers)
    train_idx, val_idx = split_indices(len(paths), cfg.val_fraction, cfg.seed)
    model = TrunkClassifier(AST.from_checkpoint(init_checkpoint), len(classes))
    chance = 100.0 / len(classes)
    before = accuracy(model, fbanks, labels, val_idx, cfg.batch_size)
    fbank_seconds = time.time() - start
    losses = train(model, fbanks, labels, train_idx, cfg)
    after = accuracy(model, fbanks, labels, val_idx, cfg.batch_size)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    save_torch(ast_to_audioset_checkpoint(model.ast.state_dict(), model.head.state_dict()), out_path)
    report = {"checkpoint": out_path, "init_checkpoint": init_checkpoint, "config": asdict(cfg),
              "classes": classes, "train_clips": len(train_idx), "held_out_clips": len(val_idx),
              "chance_accuracy": chance, "held_out_accuracy_before": before,
              "held_out_accuracy_after": after, "first_loss": losses[0] if losses else None,
              "last_loss": float(np.mean(losses[-5:])) if losses else None,
              "fbank_seconds": round(fbank_seconds, 1), "seconds": round(time.time() - start, 1)}
    write_json(os.path.splitext(out_path)[0] + REPORT_SUFFIX, report, indent=1, default=None)
    return report


def parse_args(argv: Optional[Sequence[str]]) -> tuple[argparse.Namespace, PretrainConfig]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_dir", required=True,
                        help="benchmark folder holding audio_pretrain/ and audio_pretrain_labels.json")
    parser.add_argument("--init_checkpoint", required=True,
                        help="AudioSet-format AST checkpoint to start from (synthetic/make_tiny_checkpoints.py)")
    parser.add_argument("--out", required=True, help="pre-trained checkpoint to write (.pth)")
    for name, value in asdict(PretrainConfig()).items():
        parser.add_argument(f"--{name}", type=type(value), default=value, help=f"default: {value}")
    args = parser.parse_args(argv)
    paths = argparse.Namespace(data_dir=args.data_dir, init_checkpoint=args.init_checkpoint, out=args.out)
    cfg = PretrainConfig(**{k: v for k, v in vars(args).items() if k not in vars(paths)})
    return paths, cfg


def main(argv: Optional[Sequence[str]] = None) -> dict:
    paths, cfg = parse_args(argv)
    report = pretrain(paths.data_dir, paths.init_checkpoint, paths.out, cfg)
    print(json.dumps({k: report[k] for k in ("held_out_accuracy_before", "held_out_accuracy_after",
                                             "last_loss", "seconds")}))
    return report


if __name__ == "__main__":
    main()
