"""Size of the padded-frame rule's effect (docs/fidelity.md).

At the released width (D = 512, F = 12, Q = 12, 4 fusion layers, random weights with gates
moved off their near-zero init, CLIP-like frame statistics), scores every (text, video) pair
of videos with 7-10 of 12 real frames under ``--padding_rule masked`` and ``released`` (same
weights; the padded slots hold one fixed "blank frame" embedding, as CLIP's embedding of a
zero frame would be) and prints the largest and mean absolute score difference.

    python -m bench.fidelity [--videos 64 --texts 64 --seed 0]
"""
from __future__ import annotations

import argparse

import torch

from modules.fusion import FusionConfig, FusionTransformer
from modules.similarity import global_local_scores, video_index

D, F, Q, LAYERS = 512, 12, 12, 4
LOGIT_SCALE = torch.tensor(100.0).log()


def measure(num_videos: int, num_texts: int, seed: int) -> dict:
    torch.manual_seed(seed)
    masked = FusionTransformer(FusionConfig(width=D, layers=LAYERS, max_frames=F, fusion_residual=0.05))
    with torch.no_grad():
        for block in masked.blocks:
            for gate in block.gates.values():
                gate.fc2.weight.normal_(std=0.5)  # gates away from 0 so the fusion matters
    released = FusionTransformer(FusionConfig(width=D, layers=LAYERS, max_frames=F, fusion_residual=0.05,
                                              padding_rule="released"))
    released.load_state_dict(masked.state_dict())
    real = torch.randint(7, 11, (num_videos,))
    mask = torch.arange(F)[None] < real[:, None]
    frames = torch.randn(num_videos, F, D) * 0.5
    blank = torch.randn(D) * 0.5
    frames_released = torch.where(mask[..., None], frames, blank)
    frames_masked = frames * mask[..., None]
    audio, text = torch.randn(num_videos, Q, D), torch.randn(num_texts, D)
    with torch.no_grad():
        a = global_local_scores(text, masked(frames_masked, mask, audio).fused, mask, LOGIT_SCALE, 1.0)
        b = global_local_scores(text, released(frames_released, mask, audio).fused, mask, LOGIT_SCALE, 1.0)
    diff = (a - b).abs()
    return {"max_abs": diff.max().item(), "mean_abs": diff.mean().item(), "score_std": a.std().item()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=int, default=64)
    parser.add_argument("--texts", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    r = measure(args.videos, args.texts, args.seed)
    print(f"padding rule masked vs released, D={D}, F={F}, 7-10 real frames, fusion_residual 0.05: "
          f"max |score difference| {r['max_abs']:.3f}, mean {r['mean_abs']:.3f} (score std {r['score_std']:.2f})")


if __name__ == "__main__":
    main()
