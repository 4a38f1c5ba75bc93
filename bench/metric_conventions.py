"""How far the two multi-sentence metric conventions of metrics.py lie apart (docs/fidelity.md "Fidelity
to the released code").

Random VATEX-like score matrices: Nv videos with C captions each,

    sim[i, v] = signal x [caption i describes v] + shared x z[video of i, v] + noise[i, v]

(z, noise standard normal): ``shared`` is a term all captions of one video share, as real
captions of one video resemble each other, so a video that is close to another one is close
to all its captions. Swept over signal strengths (weak = poor model, strong = good model);
for each, prints the "released" (CLIP4Clip / AVIGATE) and "per_caption" numbers and their
difference for v2t R@1/5/10, v2t MnR and t2v MdR (the t2v recalls and MnR are the same in
both conventions).

Usage:
    python -m bench.metric_conventions [--videos 1500] [--captions 10] [--shared 1.0]
        [--seeds 3]
"""
from __future__ import annotations

import argparse

import numpy as np

from metrics import retrieval_metrics

KEYS = ("v2t_R@1", "v2t_R@5", "v2t_R@10", "v2t_MnR", "t2v_MdR")
SIGNALS = (0.5, 1.0, 2.0, 3.0, 4.0, 6.0)


def random_matrix(rng: np.random.Generator, num_videos: int, captions: int, signal: float,
                  shared: float):
    """(sim [Nv * C, Nv] float32, index [Nv * C]) with captions in shuffled row order."""
    index = rng.permutation(np.repeat(np.arange(num_videos), captions))
    sim = rng.standard_normal((len(index), num_videos), dtype=np.float32)
    sim += shared * rng.standard_normal((num_videos, num_videos), dtype=np.float32)[index]
    sim[np.arange(len(index)), index] += signal
    return sim, index


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=int, default=1500, help="videos Nv (VATEX test: 1500)")
    parser.add_argument("--captions", type=int, default=10, help="captions per video (VATEX: 10)")
    parser.add_argument("--shared", type=float, default=1.0,
                        help="strength of the score term shared by the captions of a video")
    parser.add_argument("--seeds", type=int, default=3, help="random matrices per signal strength")
    args = parser.parse_args()
    print(f"Nv = {args.videos}, {args.captions} captions per video, shared {args.shared}, "
          f"{args.seeds} seeds per row; released / per_caption / released - per_caption "
          f"(the seed with the largest |difference|)")
    print("| signal | " + " | ".join(KEYS) + " |")
    print("|---" * (len(KEYS) + 1) + "|")
    largest = {key: 0.0 for key in KEYS}
    for signal in SIGNALS:
        cells = {key: [] for key in KEYS}
        for seed in range(args.seeds):
            sim, index = random_matrix(np.random.default_rng(seed), args.videos, args.captions, signal,
                                       args.shared)
            released = retrieval_metrics(sim, index, convention="released")
            per_caption = retrieval_metrics(sim, index, convention="per_caption")
            for key in KEYS:
                cells[key].append((released[key], per_caption[key]))
        row = []
        for key in KEYS:
            worst = max(cells[key], key=lambda pair: abs(pair[0] - pair[1]))
            largest[key] = max(largest[key], abs(worst[0] - worst[1]))
            row.append(f"{worst[0]:.2f} / {worst[1]:.2f} / {worst[0] - worst[1]:+.2f}")
        print(f"| {signal} | " + " | ".join(row) + " |")
    print("largest |difference|: " + ", ".join(f"{key} {value:.2f}" for key, value in largest.items()))


if __name__ == "__main__":
    main()
