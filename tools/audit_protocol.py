"""Protocol audit: does a checkpoint's evaluation give every (text, video) pair the same score
whatever the order, batching and sharding of the evaluation? (docs/evaluation.md "Is a text-conditioned
number real?")

A score may depend only on its text and its video (docs/design.md §4). The audit evaluates the
checkpoint with ``main_task_retrieval.py --do_eval`` — the code path of a user's evaluation —
several times, changing only what must not matter:

- ``reference``: the flags as given;
- ``permuted``: texts and videos in an order permuted by ``--order_seed`` (the evaluation's
  ``--eval_order_seed``: the parsed test split is reordered before anything is encoded);
- two other batchings: ``--batch_size_val`` (encoding batches; the block of the paired_block
  protocol) and ``--eval_chunk`` (pairs fused at once), from ``--alt_batch_sizes`` / ``--alt_chunks``;
- with ``--torchrun N``: the reference flags under torchrun with N processes (rows sharded).

Each run's sim_matrix.npy is aligned to the reference by ids (sim_rows.json: video id and
caption, a repeated (video, caption) matched by occurrence; sim_cols.json: video id), as are
re-ranked pairs (rerank_pairs.npz). The audit reports the largest score change, where it
happened, and the spread of t2v / v2t R@1 over the runs, and writes audit.json.

Exit status: 0 every score within the tolerance (``--tolerance``, default scaled with the
evaluation's precision and the score magnitude: max(1e-4, 4 u max|score|), u the unit roundoff
of fp32 / TF32 / fp16 / bf16; docs/training.md); 1 a score changed by more,
or the runs scored different pairs; 2 bad arguments; 3 an evaluation failed.

    python -m tools.audit_protocol --audit_dir audits/tg -- --init_model ckpts/tg/pytorch_model.bin.4 \\
        --data_path data/msrvtt --features_path data/msrvtt/videos --audio_path data/msrvtt/audio \\
        --text_gate --text_query --query_gate [--eval_protocol paired_block] [--torchrun 2 ...]

Every flag the audit does not know goes to main_task_retrieval.py unchanged (``--`` is optional).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch

import main_task_retrieval
from atomic_io import write_json

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Tolerance (docs/training.md, "Audit tolerance"): a score may move by
#     tolerance = max(TOLERANCE_FLOOR, TOLERANCE_FACTOR * u * S)
# where S is the largest |score| of the reference run and u the unit roundoff of the lowest
# precision the features behind a score were computed in (the similarity itself is exact fp32):
# other chunk shapes pick other kernels, whose results differ by a few roundings of that
# precision, scaled by the score's magnitude. --tolerance fixes it instead.
TOLERANCE_FLOOR = 1e-4
TOLERANCE_FACTOR = 4.0
UNIT_ROUNDOFF = {"fp32": 2.0 ** -24, "tf32": 2.0 ** -11, "fp16": 2.0 ** -11, "bf16": 2.0 ** -8}
DEFAULT_ALT_BATCH_SIZES = (7, 3)
DEFAULT_ALT_CHUNKS = ("7x5", "33x64")
AUDIT_FILE = "audit.json"
EXIT_PASS, EXIT_FAIL, EXIT_USAGE, EXIT_EVAL_FAILED = 0, 1, 2, 3
FORBIDDEN_FLAGS = ("--output_dir", "--do_train", "--eval_order_seed", "--resume_model")
LOG_TAIL_CHARS = 3000


@dataclass
class Variant:
    """One evaluation of the audit.

    Args:
        name: sub-directory and label; flags: appended to the reference flags (the last
            occurrence of a flag wins); processes: >1 runs under torchrun.
        order, batch_size_val, eval_chunk: what this run changes, for the report.
    """

    name: str
    flags: list = field(default_factory=list)
    processes: int = 1
    order: str = "file"
    batch_size_val: int = 0
    eval_chunk: str = "default"


@dataclass
class Comparison:
    """One run against the reference: the largest |score change| (with where it happened),
    and the pairs the two runs disagree on (empty when they scored the same pairs)."""

    max_abs_diff: Optional[float]
    where: Optional[dict]
    rerank_max_abs_diff: Optional[float] = None
    problem: Optional[str] = None


def parse_chunk(text: str) -> tuple[int, int]:
    try:
        texts, videos = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--alt_chunks takes TEXTSxVIDEOS, e.g. 7x5; got {text!r}") from None
    if texts < 1 or videos < 1:
        raise argparse.ArgumentTypeError(f"--alt_chunks sizes must be >= 1, got {text!r}")
    return texts, videos


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--audit_dir", required=True, help="where the evaluations and audit.json go")
    p.add_argument("--tolerance", type=float, default=None,
                   help="largest |score change| that passes (default: scaled with the precision and the score "
                        f"magnitude, max({TOLERANCE_FLOOR:g}, {TOLERANCE_FACTOR:g} x unit roundoff x max |score|))")
    p.add_argument("--order_seed", type=int, default=1, help="seed of the permuted evaluation order")
    p.add_argument("--alt_batch_sizes", type=int, nargs=2, default=list(DEFAULT_ALT_BATCH_SIZES), metavar="B",
                   help="--batch_size_val of the two re-batched evaluations")
    p.add_argument("--alt_chunks", type=parse_chunk, nargs=2, default=[parse_chunk(c) for c in DEFAULT_ALT_CHUNKS],
                   metavar="TxV", help="--eval_chunk (texts x videos per fusion chunk) of the two re-batched "
                                       "evaluations")
    p.add_argument("--torchrun", type=int, default=0, metavar="N",
                   help="also evaluate under torchrun with N processes (0: no; CPU or N GPUs)")
    return p


def split_arguments(argv: Sequence[str]) -> tuple[argparse.Namespace, list, argparse.Namespace]:
    """(audit args, evaluation flags, the evaluation flags as main_task_retrieval parses them)."""
    parser = build_parser()
    audit, rest = parser.parse_known_args(argv)
    rest = [a for a in rest if a != "--"]
    bad = [a for a in rest if a.split("=")[0] in FORBIDDEN_FLAGS]
    if bad:
        parser.error(f"{bad}: the audit chooses these itself (evaluations go to --audit_dir)")
    if "--do_eval" not in rest:
        rest = ["--do_eval", *rest]
    eval_args = main_task_retrieval.build_parser().parse_args([*rest, "--output_dir", audit.audit_dir])
    if not eval_args.init_model:
        parser.error("pass the checkpoint to audit as --init_model (with the flags of its run)")
    if (audit.tolerance is not None and audit.tolerance < 0) or audit.torchrun < 0 or audit.torchrun == 1:
        parser.error("--tolerance must be >= 0 and --torchrun 0 (off) or >= 2")
    if eval_args.batch_size_val in audit.alt_batch_sizes or len(set(audit.alt_batch_sizes)) < 2:
        parser.error(f"--alt_batch_sizes {audit.alt_batch_sizes} must be two values other than the "
                     f"evaluation's --batch_size_val {eval_args.batch_size_val}")
    if min(audit.alt_batch_sizes) < 1:
        parser.error("--alt_batch_sizes must be >= 1")
    return audit, rest, eval_args


def variants(audit: argparse.Namespace, eval_args: argparse.Namespace) -> list:
    chunk = "default" if eval_args.eval_chunk is None else "x".join(map(str, eval_args.eval_chunk))
    base = dict(batch_size_val=eval_args.batch_size_val, eval_chunk=chunk)
    out = [Variant("reference", **base),
           Variant(f"permuted_seed{audit.order_seed}", ["--eval_order_seed", str(audit.order_seed)],
                   order=f"permuted (seed {audit.order_seed})", **base)]
    for size, (texts, videos) in zip(audit.alt_batch_sizes, audit.alt_chunks):
        out.append(Variant(f"batch{size}_chunk{texts}x{videos}",
                           ["--batch_size_val", str(size), "--eval_chunk", str(texts), str(videos)],
                           batch_size_val=size, eval_chunk=f"{texts}x{videos}"))
    if audit.torchrun:
        out.append(Variant(f"torchrun{audit.torchrun}", processes=audit.torchrun, **base))
    return out


def run_variant(variant: Variant, flags: list, out_dir: str) -> None:
    """Evaluate into ``out_dir``: in this process, or under torchrun (log in out_dir/torchrun.log)."""
    argv = [*flags, *variant.flags, "--output_dir", out_dir]
    if variant.processes == 1:
        main_task_retrieval.main(argv)
        return
    os.makedirs(out_dir, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
               str(variant.processes), os.path.join(ROOT, "main_task_retrieval.py"), *argv]
    log_path = os.path.join(out_dir, "torchrun.log")
    with open(log_path, "w") as log:
        done = subprocess.run(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    if done.returncode:
        with open(log_path) as log:
            tail = log.read()[-LOG_TAIL_CHARS:]
        raise RuntimeError(f"torchrun evaluation failed (exit {done.returncode}), log {log_path}:\n{tail}")


# ----------------------------------------------------------------------------- alignment

@dataclass
class EvalOutputs:
    """What the audit reads from an evaluation directory."""

    metrics: dict
    sim: np.ndarray
    row_keys: list
    col_keys: list
    rerank: Optional[dict]


def row_keys(rows: list) -> list:
    """(video id, caption, occurrence) per row: a caption repeated for the same video is told
    apart by its occurrence number (repeats are the same text, so any matching of them is exact)."""
    seen = collections.Counter()
    keys = []
    for row in rows:
        base = (row["video_id"], row["caption"])
        keys.append((*base, seen[base]))
        seen[base] += 1
    return keys


def read_outputs(run_dir: str) -> EvalOutputs:
    def load(name):
        with open(os.path.join(run_dir, name)) as f:
            return json.load(f)
    rerank_path = os.path.join(run_dir, "rerank_pairs.npz")
    rerank = None
    if os.path.isfile(rerank_path):
        with np.load(rerank_path) as pairs:
            rerank = {k: pairs[k] for k in ("pair_text", "pair_video", "pair_scores")}
    return EvalOutputs(load("metrics.json"), np.load(os.path.join(run_dir, "sim_matrix.npy")),
                       row_keys(load("sim_rows.json")), list(load("sim_cols.json")), rerank)


def alignment(reference: list, other: list) -> Optional[np.ndarray]:
    """Positions in ``other`` of each key of ``reference``; None if the key sets differ."""
    position = {key: i for i, key in enumerate(other)}
    if len(position) != len(other) or set(position) != set(reference):
        return None
    return np.array([position[key] for key in reference], dtype=np.int64)


def rerank_pair_scores(outputs: EvalOutputs) -> dict:
    pairs = outputs.rerank
    return {(outputs.row_keys[t], outputs.col_keys[v]): float(s)
            for t, v, s in zip(pairs["pair_text"], pairs["pair_video"], pairs["pair_scores"])}


def compare(reference: EvalOutputs, other: EvalOutputs) -> Comparison:
    rows, cols = alignment(reference.row_keys, other.row_keys), alignment(reference.col_keys, other.col_keys)
    if rows is None or cols is None:
        return Comparison(None, None, problem="the runs scored different texts or videos (sim_rows/sim_cols "
                                              "differ beyond their order)")
    diff = np.abs(other.sim[rows][:, cols].astype(np.float64) - reference.sim.astype(np.float64))
    i, j = np.unravel_index(int(np.argmax(diff)), diff.shape) if diff.size else (0, 0)
    where = None if not diff.size else {"caption": reference.row_keys[i][1], "text_video": reference.row_keys[i][0],
                                        "video": reference.col_keys[j],
                                        "reference_score": float(reference.sim[i, j]),
                                        "score": float(other.sim[rows[i], cols[j]])}
    result = Comparison(float(diff.max()) if diff.size else 0.0, where)
    if (reference.rerank is None) != (other.rerank is None):
        result.problem = "only one of the runs re-ranked"
    elif reference.rerank is not None:
        first, second = rerank_pair_scores(reference), rerank_pair_scores(other)
        if first.keys() != second.keys():
            result.problem = (f"the re-ranking shortlists differ ({len(first.keys() ^ second.keys())} pairs in "
                              "only one run)")
        else:
            result.rerank_max_abs_diff = max((abs(first[k] - second[k]) for k in first), default=0.0)
    return result


# ----------------------------------------------------------------------------- report

def recall(metrics: dict, name: str) -> Optional[float]:
    return metrics.get("plain", {}).get(name)


def compute_precision(eval_args: argparse.Namespace, cuda_available: bool) -> str:
    """The lowest precision behind the evaluation's scores: --precision, or TF32 for fp32 work on a
    GPU with --tf32 (the default), else IEEE fp32."""
    if eval_args.precision != "fp32":
        return eval_args.precision
    on_gpu = eval_args.device == "cuda" or (eval_args.device == "auto" and cuda_available)
    return "tf32" if on_gpu and eval_args.tf32 else "fp32"


def scaled_tolerance(precision: str, score_magnitude: float) -> dict:
    """The tolerance rule (module constants) for a run's precision and largest |score|."""
    value = max(TOLERANCE_FLOOR, TOLERANCE_FACTOR * UNIT_ROUNDOFF[precision] * score_magnitude)
    return {"tolerance": value, "precision": precision, "unit_roundoff": UNIT_ROUNDOFF[precision],
            "score_magnitude": score_magnitude, "factor": TOLERANCE_FACTOR, "floor": TOLERANCE_FLOOR}


def reference_magnitude(outputs) -> float:
    """Largest |score| of a run (the plain matrix and any re-ranked pair scores)."""
    values = [float(np.abs(outputs.sim).max())] if outputs.sim.size else [0.0]
    if outputs.rerank is not None and len(outputs.rerank["pair_scores"]):
        values.append(float(np.abs(outputs.rerank["pair_scores"]).max()))
    return max(values)


def summarize(audit: argparse.Namespace, checkpoint: str, done: list, precision: str = "fp32") -> dict:
    """The audit's verdict from [(Variant, EvalOutputs, Comparison or None)] (reference first)."""
    reference = done[0][1]
    largest, worst_run = 0.0, None
    problems = []
    for variant, _, comparison in done[1:]:
        if comparison.problem:
            problems.append(f"{variant.name}: {comparison.problem}")
        for value in (comparison.max_abs_diff, comparison.rerank_max_abs_diff):
            if value is not None and value >= largest:
                largest, worst_run = value, variant.name
    spreads = {}
    for name in ("t2v_R@1", "v2t_R@1"):
        values = [recall(outputs.metrics, name) for _, outputs, _ in done]
        values = [v for v in values if v is not None]
        spreads[name] = max(values) - min(values) if values else None
    rule = ({"tolerance": audit.tolerance, "given": True} if audit.tolerance is not None
            else scaled_tolerance(precision, reference_magnitude(reference)))
    passed = not problems and largest <= rule["tolerance"]
    return {"checkpoint": checkpoint, "protocol": reference.metrics.get("protocol"),
            "LEAKING": reference.metrics.get("LEAKING"), "tolerance": rule["tolerance"], "tolerance_rule": rule,
            "largest_score_change": largest, "largest_in": worst_run, "R@1_spread": spreads,
            "problems": problems, "passed": passed,
            "runs": [{**asdict(variant), "t2v_R@1": recall(outputs.metrics, "t2v_R@1"),
                      "v2t_R@1": recall(outputs.metrics, "v2t_R@1"),
                      **({} if comparison is None else {"comparison": asdict(comparison)})}
                     for variant, outputs, comparison in done]}


def _num(value: Optional[float], fmt: str) -> str:
    return "–" if value is None else format(value, fmt)


def report_lines(summary: dict) -> list:
    lines = [f"Protocol audit of {summary['checkpoint']} (eval protocol: {summary['protocol']})", "",
             "| run | order | batch_size_val | eval_chunk | processes | max abs score change | t2v R@1 | v2t R@1 |",
             "|---|---|---|---|---|---|---|---|"]
    for run in summary["runs"]:
        comparison = run.get("comparison")
        change = "(reference)" if comparison is None else _num(comparison["max_abs_diff"], ".2e")
        if comparison and comparison.get("rerank_max_abs_diff") is not None:
            change += f" (re-ranked pairs {comparison['rerank_max_abs_diff']:.2e})"
        lines.append(f"| {run['name']} | {run['order']} | {run['batch_size_val']} | {run['eval_chunk']} | "
                     f"{run['processes']} | {change} | {_num(run['t2v_R@1'], '.2f')} | {_num(run['v2t_R@1'], '.2f')} |")
    lines.append("")
    worst = next((r["comparison"]["where"] for r in summary["runs"]
                  if r["name"] == summary["largest_in"] and r.get("comparison")), None)
    rule = summary["tolerance_rule"]
    basis = ("given" if rule.get("given") else
             f"max({rule['floor']:g}, {rule['factor']:g} x {rule['precision']} unit roundoff {rule['unit_roundoff']:.2e} "
             f"x max |score| {rule['score_magnitude']:.3g})")
    lines.append(f"Largest score change: {summary['largest_score_change']:.3e} (tolerance {summary['tolerance']:.3g}: "
                 f"{basis})" + (f" in {summary['largest_in']}" if summary["largest_in"] else ""))
    if worst:
        lines.append(f"  at text \"{worst['caption']}\" (video {worst['text_video']}) x video {worst['video']}: "
                     f"{worst['reference_score']:.6f} -> {worst['score']:.6f}")
    spread = summary["R@1_spread"]
    lines.append(f"R@1 spread over the runs: t2v {_num(spread['t2v_R@1'], '.2f')}, "
                 f"v2t {_num(spread['v2t_R@1'], '.2f')} points")
    lines += [f"PROBLEM: {p}" for p in summary["problems"]]
    if summary["LEAKING"]:
        lines.append(summary["LEAKING"])
    verdict = ("PASS: every score depends only on its (text, video) pair" if summary["passed"] else
               "FAIL: scores depend on the order, batching or sharding of the evaluation; numbers from "
               "this protocol are not retrieval results")
    return lines + [verdict]


def main(argv: Optional[Sequence[str]] = None) -> int:
    audit, flags, eval_args = split_arguments(sys.argv[1:] if argv is None else list(argv))
    os.makedirs(audit.audit_dir, exist_ok=True)
    done = []
    for variant in variants(audit, eval_args):
        out_dir = os.path.join(audit.audit_dir, variant.name)
        print(f"[audit] {variant.name} -> {out_dir}", flush=True)
        try:
            run_variant(variant, flags, out_dir)
        except (Exception, SystemExit) as err:  # noqa: BLE001 - any failure (flag errors exit) ends the audit
            print(f"[audit] evaluation {variant.name} failed: {err}\n(see {os.path.join(out_dir, 'log.txt')})",
                  file=sys.stderr)
            return EXIT_EVAL_FAILED
        outputs = read_outputs(out_dir)
        done.append((variant, outputs, compare(done[0][1], outputs) if done else None))
    summary = summarize(audit, eval_args.init_model, done, compute_precision(eval_args, torch.cuda.is_available()))
    write_json(os.path.join(audit.audit_dir, AUDIT_FILE), summary)
    print("\n".join(report_lines(summary)), flush=True)
    return EXIT_PASS if summary["passed"] else EXIT_FAIL


if __name__ == "__main__":
    sys.exit(main())
