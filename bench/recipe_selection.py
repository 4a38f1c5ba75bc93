"""The free choices of the synthetic benchmark's recipe, made by one rule on the VALIDATION split.

The recipe (synthetic/demo.py DemoConfig) takes the released values wherever the tiny scale allows
(docs/synthetic_recipe.md). Two choices have no released value that fits a 2-core
CPU run of a few hundred steps: the new modules' learning rate (released: 1e-4 for 5 epochs of
~7,000 steps; here an epoch is ~125 steps) and the number of epochs. This script makes them by a
rule fixed before it ran, applied to every row alike and never to the test split:

- candidates: --lr in LR_GRID (CLIP always at lr x coef_lr 1e-3, the released ratio); EPOCHS
  epochs, every row keeping its best validation epoch (--val_csv: per-row model selection);
- the rows that decide: the method-neutral trio ``zero_audio`` (fusion, zeroed audio),
  ``ungated`` (fusion, real audio, no gates) and ``avigate`` (gated), seed 0, on the demo's data
  and validation split (training clips held out by synthetic/make_val_split.py);
- the rule: the learning rate with the highest MEAN over the trio of the best-epoch validation
  t2v R@1; ties go to the smaller rate. Every other row of the demo and the study uses it.

No test-split evaluation runs here (training runs use --skip_test).

    python -m bench.recipe_selection --out_dir demo_out      # shares the demo's cached stages
"""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import replace
from typing import Optional, Sequence

import atomic_io
from synthetic import demo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

LR_GRID = (1e-4, 1e-3)  # the released rate and the previous demo recipe's
EPOCHS = 5
DECIDING_ROWS = ("zero_audio", "ungated", "avigate")
SEED = 0
RESULTS = os.path.join(ROOT, "bench", "results", "recipe_selection.json")


def validation_curve(run_dir: str) -> list:
    """Validation t2v R@1 of every epoch of a training run (train_metrics.jsonl)."""
    curve = []
    with open(os.path.join(run_dir, "train_metrics.jsonl")) as handle:
        for line in handle:
            record = json.loads(line)
            if record.get("event") == "validation":
                curve.append(record["metrics"]["plain"]["t2v_R@1"])
    if not curve:
        raise RuntimeError(f"{run_dir}/train_metrics.jsonl has no validation record: was --val_csv given?")
    return curve


def choose(curves: dict) -> dict:
    """The rule: {lr: {row: curve}} -> chosen lr and the mean best-epoch validation R@1 per lr."""
    means = {lr: sum(max(curve) for curve in rows.values()) / len(rows) for lr, rows in curves.items()}
    best = max(sorted(means), key=lambda lr: (means[lr], -lr))
    return {"lr": best, "mean_best_validation_t2v_R@1": {f"{lr:g}": m for lr, m in means.items()}}


def run_selection(out_dir: str, lrs: Sequence[float] = LR_GRID, epochs: int = EPOCHS) -> dict:
    base = replace(demo.DemoConfig(out_dir=out_dir), epochs=epochs, rows=DECIDING_ROWS)
    paths = demo.Paths(os.path.abspath(out_dir))
    os.makedirs(paths.out_dir, exist_ok=True)
    demo.prepare_inputs(base, paths)
    curves = {}
    for lr in lrs:
        cfg = replace(base, lr=lr)
        for name in DECIDING_ROWS:
            row = demo.ROW_BY_NAME[name]
            run_dir = os.path.join(paths.out_dir, "recipe_selection", f"lr{lr:g}", name)
            demo.cached_run(f"recipe selection: {name} at --lr {lr:g}", run_dir,
                            demo.train_command(cfg, paths, row, SEED, run_dir), cfg)
            curves.setdefault(lr, {})[name] = validation_curve(run_dir)
    decision = choose(curves)
    return {"rule": __doc__.split("\n\n")[2], "lr_grid": list(lrs), "epochs": epochs, "seed": SEED,
            "deciding_rows": list(DECIDING_ROWS), "validation_t2v_R@1_per_epoch": {f"{lr:g}": c for lr, c in curves.items()},
            **decision}


def markdown(result: dict) -> str:
    lines = ["# Recipe selection (validation split only)", "", result["rule"], "",
             "| --lr | " + " | ".join(result["deciding_rows"]) + " | mean of best epochs |", "|---|" + "---|" * (len(result["deciding_rows"]) + 1)]
    for lr, rows in result["validation_t2v_R@1_per_epoch"].items():
        cells = [" / ".join(f"{v:.1f}" for v in rows[name]) for name in result["deciding_rows"]]
        lines.append(f"| {lr} | " + " | ".join(cells) + f" | {result['mean_best_validation_t2v_R@1'][lr]:.1f} |")
    lines += ["", f"Chosen: --lr {result['lr']:g} (validation t2v R@1 per epoch, epochs 1..{result['epochs']})."]
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out_dir", default="demo_out", help="the demo's output folder (stages are shared)")
    parser.add_argument("--results", default=RESULTS, help="JSON to write (a .md page beside it)")
    args = parser.parse_args(argv)
    result = run_selection(args.out_dir)
    atomic_io.write_json(args.results, result, indent=1)
    atomic_io.write_text(os.path.splitext(args.results)[0] + ".md", markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
