"""Does text guidance earn its place? The study of issue 9 (docs/synthetic_benchmark.md, "Text guidance study: design").

The design below was fixed and committed before any text-guided model was evaluated on the
benchmark; it must not be changed to favour a method.

Benchmark: the synthetic benchmark (synthetic/) at its default size, data seed 0: 540 test
clips queried by 1,620 captions in three subsets (synthetic/design.py): (a) ``sound``, captions
that describe the sound (720); (b) ``visual_informative``, captions of solo clips that describe
only the visuals while a distinctive sound is audible (360); (c) ``visual_noise``, captions of
noise clips (540). Training: the demo's recipe (bench/demo.py DemoConfig: tiny towers, 3 epochs,
global batch 32, two gloo ranks), on the benchmark's 540 training clips x 3 renders.

Rows, each trained with seeds 0, 1, 2:
- ``visual_only`` (--no_audio); ``avigate`` (gated fusion, adaptive margin);
- ``tg_scratch``: text-guided from scratch, today's method: --text_gate --text_query
  --query_gate with the earlier random start of the text terms (--text_init normal), one stage;
- ``tg_residual_frozen``: the residual start (docs/design.md §4a) warm-started from the ``avigate``
  checkpoint of the same seed, --freeze_agnostic, FINETUNE_EPOCHS epochs;
- ``tg_residual_all``: the same warm start, every parameter trains, FINETUNE_EPOCHS epochs.
- ``avigate_continued`` (control, added after a smoke run on the --quick data, before any run
  on the benchmark): the same warm start and FINETUNE_EPOCHS epochs WITHOUT text flags, so a
  warm-started row's gain over ``avigate`` can be told apart from the effect of training longer.
- Amendment (issue 17, committed before any run on the new recipe, docs/synthetic_recipe.md):
  the recipe becomes the released-shaped one (pre-trained CLIP stand-in, the released values,
  --lr chosen on the validation split, each row's best validation epoch), and three rows are
  added: ``zero_audio`` (the fusion fed all-zero audio: the baseline that isolates sound),
  ``ungated`` (--gate none: the paper's "+Audio") and ``category_audio`` (AVIGATE on
  category-exemplar audio: how much of audio's gain is the category bit). The sound-caption
  subset is also to be reported split into twin and solo sound captions.
Ablations: the best text-guided variant (highest mean overall t2v R@1 in full scoring) is
re-run with each text flag alone (--text_gate / --text_query / --query_gate; --query_gate
implies the injection), otherwise unchanged, seeds 0, 1, 2.

Evaluation (in-process, one encoding per row): every row scores all pairs; text-guided rows
are also re-ranked at K in RERANK_KS (modules/rerank.py). Reported per row: t2v / v2t R@1/5/10
overall (metrics.py, released convention) and per subset (t2v: each caption's rank among all
videos; v2t: a video's best caption of the subset among all captions, its own other captions
not counted), as mean +- std over the seeds, each seed with a 95% bootstrap interval over
queries (BOOTSTRAP resamples); pairs fused and evaluation seconds; the mean |gate| per layer by
caption kind (text-guided: each caption's gates on its own video; AVIGATE: each video's gates,
by clip category), and on solo clips the paired contrast |g_att| under the sound caption minus
under the visual captions.

The goal test: a text-guided variant "beats AVIGATE on a subset" when its seed-mean t2v R@1
exceeds AVIGATE's by >= 3 points AND by more than 2 standard errors, the standard error being
the standard deviation of the seed-mean difference over paired bootstrap resamples of the
queries (the same resampled queries for both rows and every seed). The seed-to-seed spread is
reported beside it. Warm-started rows are tested against ``avigate_continued`` as well (the
same test), which isolates the text guidance from the extra epoch.

    python bench/text_guidance.py                      # the study (results in bench/results/)
    python bench/text_guidance.py --quick              # a small smoke run (not a result)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from typing import Optional, Sequence

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run as a script: make the repository importable
    sys.path.insert(0, ROOT)

import main_task_retrieval  # noqa: E402
import util  # noqa: E402
from atomic_io import write_json, write_text  # noqa: E402
from bench import demo  # noqa: E402
from dataloaders.base import collate_items  # noqa: E402
from dataloaders.registry import build_eval_datasets  # noqa: E402
from evaluation import encode_dataset, rerank_split, score_split  # noqa: E402
from metrics import metrics_report, text_to_video_ranks  # noqa: E402
from modules.tokenization_clip import ClipTokenizer  # noqa: E402
from tools.packed_results import pack_bits, read_npz, unpack_bits, write_npz  # noqa: E402

SEEDS = (0, 1, 2)
RERANK_KS = (5, 10, 20, 50)
FINETUNE_EPOCHS = 1
BOOTSTRAP = 1000
BOOTSTRAP_SEED = 0
GOAL_POINTS = 3.0
GOAL_STANDARD_ERRORS = 2.0
TEXT_FLAGS = ("--text_gate", "--text_query", "--query_gate")
KINDS = ("sound", "visual_informative", "visual_noise")
CATEGORIES = ("twin", "solo", "noise")
RECALLS = (1, 5, 10)
HITS = "t2v_hits_R@1"  # per-query t2v hits at R@1 (paired goal test), stored bit-packed
RESULTS_DIR = os.path.join(ROOT, "bench", "results")


@dataclass(frozen=True)
class StudyRow:
    """One row of the study.

    Args:
        name, label: key and table label.
        flags: main_task_retrieval.py flags on top of the demo recipe.
        audio: "none" (visual-only), "real" (the AST token cache), "zero" (all-zero tokens: the
            control that isolates sound) or "category" (category-exemplar tokens: the shortcut
            control); bench/demo.py audio_cache.
        warm_start: name of the row (same seed) whose checkpoint initializes this one.
        epochs: training epochs (None = the recipe's).
    """

    name: str
    label: str
    flags: tuple = ()
    audio: str = "real"
    warm_start: Optional[str] = None
    epochs: Optional[int] = None

    @property
    def text_guided(self) -> bool:
        return any(flag in TEXT_FLAGS for flag in self.flags)


ROWS = (
    StudyRow("visual_only", "visual-only (--no_audio)", ("--no_audio",), audio="none"),
    StudyRow("zero_audio", "fusion, zeroed audio (control)", audio="zero"),
    StudyRow("ungated", "+audio, ungated (--gate none)", ("--gate", "none")),
    StudyRow("avigate", "AVIGATE"),
    StudyRow("category_audio", "AVIGATE, category-exemplar audio (shortcut control)", audio="category"),
    StudyRow("tg_scratch", "text-guided from scratch (--text_init normal)", TEXT_FLAGS + ("--text_init", "normal")),
    StudyRow("tg_residual_frozen", "residual text-guided, frozen agnostic (from AVIGATE)",
             TEXT_FLAGS + ("--freeze_agnostic",), warm_start="avigate", epochs=FINETUNE_EPOCHS),
    StudyRow("tg_residual_all", "residual text-guided, all trainable (from AVIGATE)", TEXT_FLAGS,
             warm_start="avigate", epochs=FINETUNE_EPOCHS),
    StudyRow("avigate_continued", "control: AVIGATE trained one more epoch (from AVIGATE)",
             warm_start="avigate", epochs=FINETUNE_EPOCHS),
)
ROW_BY_NAME = {row.name: row for row in ROWS}


def ablations(best: StudyRow) -> list[StudyRow]:
    """The best variant with each text flag alone (its other flags and training unchanged)."""
    others = tuple(f for f in best.flags if f not in TEXT_FLAGS)
    return [replace(best, name=f"{best.name}__{flag[2:]}_only", label=f"{best.label}, {flag} only",
                    flags=(flag, *others)) for flag in TEXT_FLAGS]


# ----------------------------------------------------------------------------- training

def train_args(cfg: demo.DemoConfig, paths: demo.Paths, row: StudyRow, seed: int, run_dir: str,
               runs: dict) -> list:
    """main_task_retrieval.py flags of one training run: the demo's (no test: evaluated in-process)."""
    warm_start = demo.selected_checkpoint(runs[(row.warm_start, seed)]) if row.warm_start else None
    return demo.train_command(cfg, paths, row, seed, run_dir, warm_start)


def train_row(cfg, paths, row: StudyRow, seed: int, runs: dict) -> float:
    run_dir = os.path.join(paths.runs, f"{row.name}_seed{seed}")
    seconds = demo.cached_run(f"train {row.name} (seed {seed})", run_dir,
                              train_args(cfg, paths, row, seed, run_dir, runs), cfg)
    runs[(row.name, seed)] = run_dir
    return seconds


# ----------------------------------------------------------------------------- evaluation

def eval_args(cfg, paths, row: StudyRow, checkpoint: str, out_dir: str) -> list:
    return ["--do_eval", *demo.common_flags(cfg, paths), *demo.audio_flags(row, paths), *row.flags,
            "--init_model", checkpoint, "--output_dir", out_dir]


@dataclass
class Query:
    """What subset analysis needs of the test split: caption_video [Nt], kind [Nt] (str),
    category [Nv] (str)."""

    caption_video: np.ndarray
    kind: np.ndarray
    category: np.ndarray


def split_queries(split, metadata: dict) -> Query:
    kind_of = {(c["video_id"], c["caption"]): c["kind"] for c in metadata["test_captions"]}
    kinds = np.array([kind_of[(split.video_ids[v], c)] for c, v in zip(split.captions, split.caption_video)])
    categories = np.array([metadata["videos"][v]["category"] for v in split.video_ids])
    return Query(np.asarray(split.caption_video), kinds, categories)


def v2t_subset_ranks(sim: np.ndarray, query: Query, kind: Optional[str]) -> np.ndarray:
    """1-based rank of each video's best caption of ``kind`` (None: any) among all captions,
    its own other captions not counted, ties pessimistic; videos without such a caption are
    left out. sim [Nt, Nv] (the v2t ranking) -> ranks [Nv']."""
    ranks = []
    for v in range(sim.shape[1]):
        own = query.caption_video == v
        positives = own if kind is None else own & (query.kind == kind)
        if not positives.any():
            continue
        column = sim[:, v]
        best = column[positives].max()
        ranks.append(1 + int(((column >= best) & ~own).sum()))
    return np.asarray(ranks)


def bootstrap_recall(hits: np.ndarray, rng: np.random.Generator) -> list:
    """95% percentile interval of the mean of boolean hits [n] over BOOTSTRAP resamples."""
    if hits.size == 0:
        return [None, None]
    means = hits[rng.integers(0, hits.size, (BOOTSTRAP, hits.size))].mean(1) * 100
    return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def subset_report(t2v: np.ndarray, v2t: np.ndarray, query: Query) -> dict:
    """Per subset (and "all"): t2v and v2t R@1/5/10 with bootstrap intervals, and the raw t2v
    hit vectors at R@1 (kept for the paired goal test)."""
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    t2v_ranks = text_to_video_ranks(torch.as_tensor(t2v), torch.as_tensor(query.caption_video)).numpy()
    out = {}
    for kind in (None, *KINDS):
        name = kind or "all"
        selected = np.ones_like(t2v_ranks, dtype=bool) if kind is None else query.kind == kind
        entry = {"num_texts": int(selected.sum())}
        v_ranks = v2t_subset_ranks(v2t, query, kind)
        entry["num_videos"] = int(v_ranks.size)
        for k in RECALLS:
            t_hits, v_hits = t2v_ranks[selected] <= k, v_ranks <= k
            entry[f"t2v_R@{k}"] = float(100 * t_hits.mean())
            entry[f"t2v_R@{k}_ci95"] = bootstrap_recall(t_hits, rng)
            entry[f"v2t_R@{k}"] = float(100 * v_hits.mean()) if v_hits.size else None
            entry[f"v2t_R@{k}_ci95"] = bootstrap_recall(v_hits, rng)
        entry[HITS] = (t2v_ranks[selected] <= 1).astype(int).tolist()
        out[name] = entry
    return out


def gate_report(scored, query: Query) -> dict:
    """Mean |gate| per layer: by caption kind (text-guided, own-caption gates) or by clip
    category (text-agnostic, per-video gates); plus the solo-clip paired contrast."""
    if scored.own_caption_gates:
        out = {"by_caption_kind": {name: {kind: np.abs(g[query.kind == kind]).mean(0).tolist() for kind in KINDS}
                                   for name, g in scored.own_caption_gates.items()}}
        att = np.abs(scored.own_caption_gates.get("att"))
        if att is not None:
            diffs = []
            for v in np.flatnonzero(query.category == "solo"):
                own = query.caption_video == v
                sound, visual = own & (query.kind == "sound"), own & (query.kind == "visual_informative")
                if sound.any() and visual.any():
                    diffs.append(att[sound, -1].mean() - att[visual, -1].mean())
            diffs = np.asarray(diffs)
            rng = np.random.default_rng(BOOTSTRAP_SEED)
            boot = diffs[rng.integers(0, diffs.size, (BOOTSTRAP, diffs.size))].mean(1)
            out["solo_att_last_sound_minus_visual"] = {
                "mean": float(diffs.mean()), "ci95": [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))],
                "num_videos": int(diffs.size)}
        return out
    if scored.video_gates:
        return {"by_clip_category": {name: {c: np.abs(g[query.category == c]).mean(0).tolist() for c in CATEGORIES}
                                     for name, g in scored.video_gates.items()}}
    return {}


def evaluate_row(cfg, paths, row: StudyRow, run_dir: str, query_of, threads: int) -> dict:
    """Encode the test split once with the row's checkpoint, score every pair (and re-rank at
    every K for text-guided rows); metrics, subsets, gates and seconds."""
    torch.set_num_threads(threads)
    util.setup_logging(None, util.DistInfo())
    args = main_task_retrieval.build_parser().parse_args(
        eval_args(cfg, paths, row, demo.selected_checkpoint(run_dir), os.path.join(run_dir, "study_eval")))
    info = util.DistInfo()
    util.seed_everything(args.seed)
    model = main_task_retrieval.build_model(args, info.device).eval()
    data = build_eval_datasets(main_task_retrieval.data_config(args, model.cfg.clip.image_resolution, args.test_csv),
                               ClipTokenizer())
    query = query_of(data.split)
    common = dict(batch_size=args.batch_size_val, workers=0, collate_fn=collate_items, info=info, precision="fp32")
    start = time.time()
    texts = encode_dataset(model, data.texts, "text", desc="texts", **common)
    videos = encode_dataset(model, data.videos, "video", desc="videos", **common)
    out = {"encode_seconds": time.time() - start, "num_texts": len(texts), "num_videos": len(videos)}
    start = time.time()
    scored = score_split(model, texts, videos, query.caption_video, info)
    out["full"] = {"seconds": time.time() - start, "pairs_fused": len(texts) * len(videos) if row.text_guided else 0,
                   "metrics": metrics_report(scored.sim, query.caption_video),
                   "subsets": subset_report(scored.sim, scored.sim, query)}
    out["gates"] = gate_report(scored, query)
    if row.text_guided:
        stage1 = model.agnostic_scores(texts, videos).scores.numpy()
        out["stage1"] = {"metrics": metrics_report(stage1, query.caption_video),
                         "subsets": subset_report(stage1, stage1, query)}
        for k in RERANK_KS:
            start = time.time()
            reranked = rerank_split(model, texts, videos, data.split, info, k)
            seconds = time.time() - start
            r = reranked.reranked
            out[f"rerank_{k}"] = {"seconds": seconds, "pairs_fused": int(r.pair_text.shape[0]),
                                  "metrics": metrics_report(r.t2v, query.caption_video, v2t_sim=r.v2t),
                                  "subsets": subset_report(r.t2v, r.v2t, query)}
    return out


# ----------------------------------------------------------------------------- aggregation

def recall_keys() -> list:
    return [f"{d}_R@{k}" for d in ("t2v", "v2t") for k in RECALLS]


def aggregate(per_seed: dict, protocol: str) -> dict:
    """Mean and std over seeds of every subset recall of one protocol ("full", "rerank_20", ...)."""
    seeds = sorted(per_seed)
    out = {}
    for subset in ("all", *KINDS):
        entry = {}
        for key in recall_keys():
            values = [per_seed[s][protocol]["subsets"][subset][key] for s in seeds]
            if any(v is None for v in values):
                continue
            entry[key] = {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
                          "per_seed": values}
        out[subset] = entry
    overall = [per_seed[s][protocol]["metrics"]["plain"] for s in seeds]
    out["metrics_released"] = {k: {"mean": float(np.mean([m[k] for m in overall])),
                                   "std": float(np.std([m[k] for m in overall], ddof=1)) if len(overall) > 1 else 0.0}
                               for k in recall_keys()}
    out["seconds"] = float(np.mean([per_seed[s][protocol]["seconds"] for s in seeds]))
    out["pairs_fused"] = per_seed[seeds[0]][protocol]["pairs_fused"]
    return out


def goal_test(rows: dict, candidate: str, reference: str = "avigate", protocol: str = "full") -> dict:
    """Per subset: seed-mean t2v R@1 difference (candidate - reference), its paired-bootstrap
    standard error, the per-seed differences and whether the goal is met."""
    seeds = sorted(set(rows[candidate]) & set(rows[reference]))
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    out = {}
    for subset in ("all", *KINDS):
        a = np.array([rows[candidate][s][protocol]["subsets"][subset][HITS] for s in seeds], dtype=float)
        b = np.array([rows[reference][s]["full"]["subsets"][subset][HITS] for s in seeds], dtype=float)
        diff = 100 * (a - b)                                       # [seeds, queries]
        boot = diff[:, rng.integers(0, diff.shape[1], (BOOTSTRAP, diff.shape[1]))].mean(-1).mean(0)
        d, se = float(diff.mean()), float(boot.std(ddof=1))
        out[subset] = {"difference": d, "standard_error": se, "per_seed": diff.mean(1).tolist(),
                       "met": bool(d >= GOAL_POINTS and d > GOAL_STANDARD_ERRORS * se)}
    return out


def study_results(rows: dict, row_specs: dict, seconds: dict) -> dict:
    summary = {}
    for name, per_seed in rows.items():
        spec = row_specs[name]
        protocols = ["full"] + ([f"rerank_{k}" for k in RERANK_KS] + ["stage1"] if spec.text_guided else [])
        entry = {"label": spec.label, "flags": list(spec.flags), "warm_start": spec.warm_start,
                 "epochs": spec.epochs, "text_guided": spec.text_guided}
        for protocol in protocols:
            if protocol == "stage1":
                seeds = sorted(per_seed)
                entry["stage1"] = {subset: {key: float(np.mean([per_seed[s]["stage1"]["subsets"][subset][key] for s in seeds]))
                                            for key in ("t2v_R@1", "t2v_R@5", "t2v_R@10")} for subset in ("all", *KINDS)}
                continue
            entry[protocol] = aggregate(per_seed, protocol)
        if spec.text_guided and "avigate" in rows:
            entry["goal_vs_avigate"] = goal_test(rows, name)
        if spec.text_guided and spec.warm_start and "avigate_continued" in rows:
            entry["goal_vs_avigate_continued"] = goal_test(rows, name, reference="avigate_continued")
        entry["gates"] = {s: per_seed[s]["gates"] for s in sorted(per_seed)}
        summary[name] = entry
    return summary


# ----------------------------------------------------------------------------- report

def fmt(stat: Optional[dict]) -> str:
    return "–" if not stat else f"{stat['mean']:.1f} ± {stat['std']:.1f}"


def goal_lines(rows: dict, key: str) -> list:
    """Markdown table of one goal test (``key`` of the summary) for the rows that have it."""
    lines = ["| row | all | sound | visual, informative audio | visual, noise |", "|---|---|---|---|---|"]
    for e in rows.values():
        if key in e:
            g = e[key]
            lines.append(f"| {e['label']} | " + " | ".join(
                f"{g[s]['difference']:+.1f} ± {g[s]['standard_error']:.1f}{' MET' if g[s]['met'] else ''}"
                for s in ("all", *KINDS)) + " |")
    return lines


def markdown(results: dict) -> str:
    rows = results["summary"]
    lines = ["# Text guidance study", "", f"Command: `{results['command']}`; seeds {results['seeds']}; "
             f"{results['num_texts']} test captions, {results['num_videos']} test videos.", "",
             "## Full scoring: t2v R@1 by caption subset (mean ± std over seeds)", "",
             "| row | all R@1 | R@5 | R@10 | v2t R@1 | sound R@1 | visual, informative audio R@1 | visual, noise R@1 |",
             "|---|---|---|---|---|---|---|---|"]
    for name, e in rows.items():
        f = e["full"]
        lines.append(f"| {e['label']} | {fmt(f['all'].get('t2v_R@1'))} | {fmt(f['all'].get('t2v_R@5'))} | "
                     f"{fmt(f['all'].get('t2v_R@10'))} | {fmt(f['all'].get('v2t_R@1'))} | "
                     + " | ".join(fmt(f[k].get("t2v_R@1")) for k in KINDS) + " |")
    lines += ["", "## Per seed: t2v R@1 with its 95% bootstrap interval over queries (full scoring)", "",
              "| row | seed | all | sound | visual, informative audio | visual, noise |", "|---|---|---|---|---|---|"]
    for name, e in rows.items():
        for seed, ev in sorted(results["per_seed"].get(name, {}).items(), key=lambda kv: int(kv[0])):
            sub = ev["full"]["subsets"]
            lines.append(f"| {e['label']} | {seed} | " + " | ".join(
                f"{sub[k]['t2v_R@1']:.1f} [{sub[k]['t2v_R@1_ci95'][0]:.1f}, {sub[k]['t2v_R@1_ci95'][1]:.1f}]"
                for k in ("all", *KINDS)) + " |")
    lines += ["", "## Goal test vs AVIGATE (t2v R@1 difference, paired-bootstrap SE; met = ≥ 3 points and > 2 SE)", "",
              *goal_lines(rows, "goal_vs_avigate"), "",
              "Warm-started rows against the continued-training control (same warm start and epoch, no text):", "",
              *goal_lines(rows, "goal_vs_avigate_continued")]
    lines += ["", "## Re-ranking (t2v R@1 all captions; pairs fused per evaluation; seconds)", "",
              "| row | full | " + " | ".join(f"K={k}" for k in RERANK_KS) + " |", "|---|---|" + "---|" * len(RERANK_KS)]
    for name, e in rows.items():
        if not e["text_guided"]:
            continue
        cells = [f"{fmt(e['full']['all']['t2v_R@1'])} ({e['full']['pairs_fused']:,} pairs, {e['full']['seconds']:.0f} s)"]
        for k in RERANK_KS:
            r = e[f"rerank_{k}"]
            cells.append(f"{fmt(r['all']['t2v_R@1'])} ({r['pairs_fused']:,}, {r['seconds']:.1f} s)")
        lines.append(f"| {e['label']} | " + " | ".join(cells) + " |")
    lines += ["", "## Gates: mean |g_att| of the last layer (seed 0)", "",
              "| row | sound captions | visual captions, informative audio | visual captions, noise clips | "
              "solo clips: sound − visual caption |", "|---|---|---|---|---|"]
    for name, e in rows.items():
        g = e["gates"][min(e["gates"])]
        if "by_caption_kind" in g and "att" in g["by_caption_kind"]:
            att = g["by_caption_kind"]["att"]
            contrast = g.get("solo_att_last_sound_minus_visual")
            paired = (f"{contrast['mean']:+.3f} [{contrast['ci95'][0]:+.3f}, {contrast['ci95'][1]:+.3f}]"
                      if contrast else "–")
            lines.append(f"| {e['label']} | " + " | ".join(f"{att[k][-1]:.3f}" for k in KINDS) + f" | {paired} |")
        elif "by_clip_category" in g and "att" in g["by_clip_category"]:
            att = g["by_clip_category"]["att"]
            lines.append(f"| {e['label']} (per video: twin / solo / noise clips) | {att['twin'][-1]:.3f} / "
                         f"{att['solo'][-1]:.3f} / {att['noise'][-1]:.3f} | | | – |")
    lines += ["", f"Time: {results['wall_seconds']:.0f} s wall, {results['cpu_seconds']:.0f} CPU-seconds."]
    return "\n".join(lines) + "\n"


def figures(results: dict, out_prefix: str) -> list:
    """The recall bars and the per-layer gates by caption kind; rows are named by run name
    (the tables give the long labels). Returns the written paths."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = results["summary"]
    written = []
    fig, ax = plt.subplots(figsize=(10, 5))
    width = 0.8 / max(len(rows), 1)
    subsets = ("all", *KINDS)
    for i, (name, e) in enumerate(rows.items()):
        means = [e["full"][k]["t2v_R@1"]["mean"] for k in subsets]
        stds = [e["full"][k]["t2v_R@1"]["std"] for k in subsets]
        ax.bar(np.arange(len(subsets)) + i * width, means, width, yerr=stds, label=name, capsize=2)
    ax.set_xticks(np.arange(len(subsets)) + 0.4 - width / 2,
                  ["all captions", "sound", "visual (informative audio)", "visual (noise clip)"])
    ax.set_ylabel("t2v R@1 (%), mean ± std over seeds")
    ax.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.1))
    fig.tight_layout()
    path = f"{out_prefix}_recall.png"
    fig.savefig(path, dpi=110)
    written.append(path)
    plt.close(fig)
    guided = {n: e for n, e in rows.items() if e["text_guided"]}
    if guided:
        cols = min(3, len(guided))
        grid_rows = -(-len(guided) // cols)
        fig, axes = plt.subplots(grid_rows, cols, figsize=(3.6 * cols, 2.8 * grid_rows), squeeze=False)
        for ax, (name, e) in zip(axes.flat, guided.items()):
            g = e["gates"][min(e["gates"])]["by_caption_kind"].get("att", {})
            for kind in KINDS:
                if kind in g:
                    ax.plot(range(1, len(g[kind]) + 1), g[kind], marker="o", label=kind)
            ax.set_title(name, fontsize=8)
            ax.set_xlabel("fusion layer")
            ax.set_xticks(range(1, 1 + max((len(v) for v in g.values()), default=1)))
            ax.set_ylabel("mean |g_att|, own caption", fontsize=8)
        for ax in list(axes.flat)[len(guided):]:
            ax.axis("off")
        axes[0][0].legend(fontsize=7)
        fig.tight_layout()
        path = f"{out_prefix}_gates.png"
        fig.savefig(path, dpi=110)
        written.append(path)
        plt.close(fig)
    return [os.path.relpath(p, ROOT) for p in written]


def write_results(results: dict, prefix: str) -> None:
    """Draw the figures, then write ``<prefix>.json`` (naming them), the per-query hits
    bit-packed in ``<prefix>_hits.npz`` (the JSON refers to them) and the ``<prefix>.md`` page."""
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    results["figures"] = figures(results, prefix)
    compact, hits = pack_bits(results, HITS)
    write_json(f"{prefix}.json", compact, indent=1, default=float)
    write_npz(f"{prefix}_hits.npz", hits)
    write_text(f"{prefix}.md", markdown(results))


def read_results(prefix: str) -> dict:
    """``<prefix>.json`` with its per-query hits back in place (from ``<prefix>_hits.npz``;
    results written before the hits moved there carry them inline)."""
    with open(f"{prefix}.json") as handle:
        results = json.load(handle)
    hits_path = f"{prefix}_hits.npz"
    return unpack_bits(results, read_npz(hits_path), HITS) if os.path.exists(hits_path) else results


def replot(prefix: str) -> None:
    """Redraw the figures and rewrite the Markdown page from ``<prefix>.json`` (no training)."""
    write_results(read_results(prefix), prefix)


# ----------------------------------------------------------------------------- entry point

def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out_dir", default="study_out", help="data, checkpoints, caches and runs")
    parser.add_argument("--results", default=os.path.join(RESULTS_DIR, "text_guidance"),
                        help="prefix of the .json / .md / .png results")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    parser.add_argument("--rows", nargs="+", default=[r.name for r in ROWS], choices=[r.name for r in ROWS])
    parser.add_argument("--no_ablations", action="store_true", help="skip the ablations of the best variant")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the in-process evaluation")
    parser.add_argument("--quick", action="store_true", help="a small smoke run (NOT a result)")
    parser.add_argument("--replot", action="store_true",
                        help="only redraw the figures and the .md page from the --results .json")
    return parser.parse_args(argv)


def study_config(args) -> demo.DemoConfig:
    if args.quick:
        return replace(demo.DemoConfig(out_dir=args.out_dir), **demo.QUICK)
    # The benchmark at its default size (synthetic/design.py), the demo's training recipe.
    return demo.DemoConfig(out_dir=args.out_dir, num_train_clips=540, num_test_clips=540)


def run_study(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    if args.replot:
        replot(args.results)
        return {}
    start, start_cpu = time.time(), demo.cpu_seconds()
    cfg = study_config(args)
    paths = demo.Paths(os.path.abspath(cfg.out_dir))
    os.makedirs(paths.out_dir, exist_ok=True)
    seconds = demo.prepare_inputs(replace(cfg, rows=tuple(r.name for r in ROWS if r.name in demo.ROW_BY_NAME)), paths)
    metadata = demo.demo_results.read_json(os.path.join(paths.data, "metadata.json"))
    runs, evals, specs = {}, {}, {}
    query_of = lambda split: split_queries(split, metadata)  # noqa: E731

    def do_row(row: StudyRow):
        specs[row.name] = row
        for seed in args.seeds:
            if row.warm_start and (row.warm_start, seed) not in runs:
                do_row(ROW_BY_NAME[row.warm_start])
            seconds[f"train {row.name} seed {seed}"] = train_row(cfg, paths, row, seed, runs)
            demo.log(f"evaluate {row.name} (seed {seed})")
            t = time.time()
            evals.setdefault(row.name, {})[seed] = evaluate_row(cfg, paths, row, runs[(row.name, seed)], query_of,
                                                                args.threads)
            seconds[f"evaluate {row.name} seed {seed}"] = time.time() - t

    for name in args.rows:
        if name not in evals:
            do_row(ROW_BY_NAME[name])
    summary = study_results(evals, specs, seconds)
    guided = [n for n in summary if summary[n]["text_guided"]]
    best = max(guided, key=lambda n: summary[n]["full"]["all"]["t2v_R@1"]["mean"]) if guided else None
    if best and not args.no_ablations:
        for row in ablations(specs[best]):
            do_row(row)
        summary = study_results(evals, specs, seconds)
    first = next(iter(evals.values()))[args.seeds[0]]
    results = {"command": " ".join(["python bench/text_guidance.py", *(sys.argv[1:] if argv is None else argv)]),
               "design": {"seeds": args.seeds, "rerank_ks": RERANK_KS, "finetune_epochs": FINETUNE_EPOCHS,
                          "bootstrap": BOOTSTRAP, "goal_points": GOAL_POINTS,
                          "goal_standard_errors": GOAL_STANDARD_ERRORS, "recipe": asdict(cfg)},
               "seeds": args.seeds, "num_texts": first["num_texts"], "num_videos": first["num_videos"],
               "best_variant": best, "summary": summary, "per_seed": evals,
               "seconds": seconds, "wall_seconds": time.time() - start,
               "cpu_seconds": demo.cpu_seconds() - start_cpu, "quick": args.quick}
    write_results(results, args.results)
    print(markdown(results))
    return results


if __name__ == "__main__":
    run_study()
