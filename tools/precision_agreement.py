"""bf16 autocast vs fp32 training, side by side (docs/precision_memory.md).

Trains two copies of one tiny model from the same initialization on the same batches, one
in fp32 and one under bf16 autocast (the encoders and the fusion; scores and the loss are fp32
in both), with the real objective and optimizer (ContrastiveObjective, BertAdam at lr 1e-3,
CLIP at the full lr). Reports the loss trajectories' agreement, how far apart the weights
ended relative to how far training moved them (|w_bf16 - w_fp32| / |w_fp32 - w_init|), and the
retrieval metrics of both final models on their training pairs, each evaluated
in fp32 and in bf16. Text-agnostic and text-guided (gate + query + query gate).

Usage:
    python -m tools.precision_agreement [--steps 40] [--pairs 16] [--batches 4] [--device cpu]
"""
from __future__ import annotations

import argparse
import copy
from dataclasses import replace

import numpy as np
import torch

from atomic_io import write_json
import util
from metrics import retrieval_metrics
from modules.ast import ASTConfig
from modules.modeling import AVIGATE, AVIGATEConfig
from modules.objective import ContrastiveObjective, ObjectiveConfig
from modules.optimization import OptimConfig, build_optimizer

GUIDED = dict(text_gate=True, text_query=True, query_gate=True)
START_TOKEN, END_TOKEN = 49406, 49407
SHORT_SPECTROGRAM = 96  # 109 AST tokens: fast, and nothing here depends on A
RECALLS = [f"{d}_R@{k}" for d in ("t2v", "v2t") for k in (1, 5, 10)]


def tiny_model(seed: int, **flags) -> AVIGATE:
    torch.manual_seed(seed)
    cfg = AVIGATEConfig.tiny(**flags)
    return AVIGATE(replace(cfg, ast=replace(ASTConfig.tiny(), target_frames=SHORT_SPECTROGRAM)))


def make_batch(cfg: AVIGATEConfig, n: int, seed: int, device: torch.device) -> dict:
    """n random (text, video) pairs: ids/mask [n, 10], frames [n, F, 3, H, W] (every other video
    has padded frames), AST tokens [n, A, W_a]."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, START_TOKEN, (n, 10), generator=g)
    ids[:, 0], ids[:, -1] = START_TOKEN, END_TOKEN
    f, res = cfg.fusion.max_frames, cfg.clip.image_resolution
    frame_mask = torch.ones(n, f, dtype=torch.long)
    frame_mask[1::2, f // 2:] = 0
    batch = {"text_ids": ids, "text_mask": torch.ones_like(ids),
             "frames": torch.randn(n, f, 3, res, res, generator=g), "frame_mask": frame_mask,
             "audio": torch.randn(n, cfg.ast.num_output_tokens, cfg.ast.embed_dim, generator=g)}
    return {k: v.to(device) for k, v in batch.items()}


def train(model: AVIGATE, batches: list[dict], steps: int, precision: str, device: torch.device) -> list[float]:
    objective = ContrastiveObjective(model, ObjectiveConfig())
    optimizer = build_optimizer(model, OptimConfig(lr=1e-3, coef_lr=1.0))
    losses = []
    for step in range(steps):
        model.train()
        with util.autocast(device, precision):
            loss = objective(**batches[step % len(batches)]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.clamp_logit_scale_()
        losses.append(loss.item())
    return losses


@torch.no_grad()
def evaluate(model: AVIGATE, batch: dict, precision: str, device: torch.device) -> tuple[dict, np.ndarray]:
    model.eval()
    with util.autocast(device, precision):
        text = model.encode_text(batch["text_ids"], batch["text_mask"]).to(dtype=torch.float32)
        video = model.encode_video(batch["frames"], batch["frame_mask"], batch["audio"]).to(dtype=torch.float32)
        scores = model.score(text, video).float().cpu().numpy()
    metrics = retrieval_metrics(scores, np.arange(len(text)))
    return {k: metrics[k] for k in RECALLS}, scores


def compare(flags: dict, args, device: torch.device) -> dict:
    fp32_model = tiny_model(args.seed, **flags).to(device)
    bf16_model = copy.deepcopy(fp32_model)
    initial = {n: p.detach().clone() for n, p in fp32_model.named_parameters()}
    batches = [make_batch(fp32_model.cfg, args.pairs, seed, device) for seed in range(args.batches)]
    losses = {"fp32": train(fp32_model, batches, args.steps, "fp32", device),
              "bf16": train(bf16_model, batches, args.steps, "bf16", device)}
    diff = np.abs(np.array(losses["bf16"]) - np.array(losses["fp32"]))
    # How far apart the two runs ended, relative to how far training moved the fp32 weights.
    params = dict(bf16_model.named_parameters())
    trained = [(n, p) for n, p in fp32_model.named_parameters() if p.requires_grad]
    apart = sum(((p - params[n]) ** 2).sum() for n, p in trained).sqrt()
    moved = sum(((p - initial[n]) ** 2).sum() for n, p in trained).sqrt()
    drift = (apart / moved).item()
    evaluation = {}
    for trained, model in (("fp32", fp32_model), ("bf16", bf16_model)):
        for precision in ("fp32", "bf16"):
            recalls, scores = zip(*[evaluate(model, b, precision, device) for b in batches])
            evaluation[f"trained {trained}, eval {precision}"] = {
                k: float(np.mean([r[k] for r in recalls])) for k in RECALLS}
            evaluation[f"trained {trained}, eval {precision}"]["scores"] = scores
    same_model = max(np.abs(a - b).max() for a, b in zip(evaluation["trained fp32, eval fp32"].pop("scores"),
                                                          evaluation["trained fp32, eval bf16"].pop("scores")))
    for key in evaluation:
        evaluation[key].pop("scores", None)
    return {"model": "text-guided" if flags else "agnostic", "losses": losses,
            "max_abs_loss_diff": float(diff.max()), "max_rel_loss_diff": float((diff / np.abs(losses["fp32"])).max()),
            "first_loss": losses["fp32"][0], "final_loss": {k: v[-1] for k, v in losses.items()},
            "weight_drift": drift, "eval_score_diff_per_s": float(same_model) / fp32_model.logit_scale.exp().item(),
            "evaluation": evaluation}


def report(results: list[dict], args) -> str:
    lines = [f"bf16 vs fp32 training: {args.steps} steps, {args.batches} batches of {args.pairs} pairs, "
             f"tiny model, device {args.device}, torch {torch.__version__}", "",
             "| model | loss step 1 | final loss fp32 / bf16 | max abs loss diff | max rel loss diff | "
             "weights apart / moved | eval score diff (same weights) |", "|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['model']} | {r['first_loss']:.4f} | {r['final_loss']['fp32']:.4f} / "
                     f"{r['final_loss']['bf16']:.4f} | {r['max_abs_loss_diff']:.4f} | {r['max_rel_loss_diff']:.4f} | "
                     f"{r['weight_drift']:.4f} | {r['eval_score_diff_per_s']:.4f} s |")
    lines += ["", "| model | trained / evaluated | " + " | ".join(RECALLS) + " |", "|---|---|" + "---|" * len(RECALLS)]
    for r in results:
        for setting, metrics in r["evaluation"].items():
            lines.append(f"| {r['model']} | {setting} | " + " | ".join(f"{metrics[k]:.1f}" for k in RECALLS) + " |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--pairs", type=int, default=16, help="pairs per batch (the contrastive batch)")
    p.add_argument("--batches", type=int, default=4, help="distinct batches, cycled")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    util.setup_precision(device, "bf16", tf32=True)
    results = [compare(flags, args, device) for flags in ({}, GUIDED)]
    print(report(results, args))
    if args.json:
        write_json(args.json, results, indent=1, default=None)
    return results


if __name__ == "__main__":
    main()
