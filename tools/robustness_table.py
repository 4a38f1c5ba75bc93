"""The audio-robustness table from evaluations run with ``--audio_perturb``.

Each evaluation directory records its perturbation in metrics.json; this tool groups the
directories of one model, and prints per model the t2v R@1 under each perturbation, its
change from the unperturbed evaluation, and the mean |g_att| of the last fusion layer
(gates.json: each video's gate for a text-agnostic model; for a text-guided model the gates
of every caption on its own video). Models without gates show "–".

    python -m tools.robustness_table \\
        --run "visual-only" out/vis_none out/vis_silence out/vis_noise out/vis_swap \\
        --run "AVIGATE" out/avi_none out/avi_silence out/avi_noise out/avi_swap
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence

import numpy as np

KINDS = ("none", "silence", "noise", "swap")
GATE = "att"


def read_json(path: str):
    with open(path) as f:
        return json.load(f)


def last_layer_abs_gate(gates: Optional[dict], name: str = GATE) -> Optional[float]:
    """Mean |g| of the last layer over the videos (text-agnostic) or the own-caption pairs
    (text-guided) of a gates.json; None without that gate."""
    if gates is None or name not in gates.get("gate_names", []):
        return None
    if gates["text_guided"]:
        values = [c[name][-1] for v in gates["videos"] for c in v["own_captions"]]
    else:
        values = [v["gates"][name][-1] for v in gates["videos"]]
    return float(np.mean(np.abs(values))) if values else None


def read_run(run_dir: str) -> tuple[str, dict]:
    """(perturbation kind, {"t2v_R@1", "gate", "settings"}) of one evaluation directory."""
    path = os.path.join(run_dir, "metrics.json")
    if not os.path.isfile(path):
        raise SystemExit(f"{path} not found: is {run_dir} an evaluation output directory?")
    metrics = read_json(path)
    perturbation = metrics.get("audio_perturbation", {"kind": "none"})
    gates_path = os.path.join(run_dir, "gates.json")
    gates = read_json(gates_path) if os.path.isfile(gates_path) else None
    return perturbation["kind"], {"t2v_R@1": metrics["plain"]["t2v_R@1"], "gate": last_layer_abs_gate(gates),
                                  "settings": perturbation}


def collect(label: str, run_dirs: Sequence[str]) -> dict:
    """kind -> result of one model's evaluations; each kind at most once."""
    runs: dict = {}
    for run_dir in run_dirs:
        kind, result = read_run(run_dir)
        if kind in runs:
            raise SystemExit(f"{label}: two evaluations with --audio_perturb {kind} ({run_dir} and an earlier one)")
        runs[kind] = result
    if "none" not in runs:
        raise SystemExit(f"{label}: no unperturbed evaluation (--audio_perturb none) to measure drops from")
    return runs


def _fmt(value: Optional[float], spec: str) -> str:
    return "–" if value is None else format(value, spec)


def table(models: list) -> list:
    """Markdown lines: one row per (label, runs)."""
    kinds = [k for k in KINDS if any(k in runs for _, runs in models)]
    head = ["model", *[f"t2v R@1 {k}" + ("" if k == "none" else " (change)") for k in kinds],
            f"mean abs g_{GATE}, last layer ({' / '.join(kinds)})"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, runs in models:
        base = runs["none"]["t2v_R@1"]
        cells = [label]
        for kind in kinds:
            if kind not in runs:
                cells.append("–")
            elif kind == "none":
                cells.append(f"{base:.1f}")
            else:
                value = runs[kind]["t2v_R@1"]
                cells.append(f"{value:.1f} ({value - base:+.1f})")
        cells.append(" / ".join(_fmt(runs.get(k, {}).get("gate"), ".3f") for k in kinds))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def settings_line(models: list) -> str:
    """The perturbation settings of the noise and swap columns (all models must share them)."""
    found = {}
    for _, runs in models:
        for kind in ("noise", "swap"):
            if kind in runs:
                setting = {k: v for k, v in runs[kind]["settings"].items() if k in ("noise_rms", "seed")}
                found.setdefault(kind, set()).add(json.dumps(setting, sort_keys=True))
    mixed = [k for k, v in found.items() if len(v) > 1]
    if mixed:
        raise SystemExit(f"the models' {mixed} evaluations used different settings: {found}")
    return "; ".join(f"{kind}: {next(iter(v))}" for kind, v in found.items())


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--run", nargs="+", action="append", required=True, metavar=("LABEL", "DIR"),
                        help="a model's label and its evaluation directories (one per perturbation)")
    parser.add_argument("--output", default=None, help="Markdown file (default: print)")
    args = parser.parse_args(argv)
    bad = [r[0] for r in args.run if len(r) < 2]
    if bad:
        parser.error(f"--run {bad[0]!r} lists no evaluation directory")
    models = [(label, collect(label, dirs)) for label, *dirs in args.run]
    lines = table(models)
    settings = settings_line(models)
    page = "\n".join(lines + ([f"\nSettings: {settings}"] if settings else [])) + "\n"
    if args.output:
        with open(args.output, "w") as f:
            f.write(page)
    else:
        sys.stdout.write(page)
    return 0


if __name__ == "__main__":
    sys.exit(main())
