"""Does text guidance earn its place? The study of issue 9 (docs/synthetic_benchmark.md, "Text guidance study: design").

The design below was fixed and committed before any text-guided model was evaluated on the
benchmark; it must not be changed to favour a method.

Benchmark: the synthetic benchmark (synthetic/) at its default size, data seed 0: 540 test
clips queried by 1,620 captions in three subsets (synthetic/design.py): (a) ``sound``, captions
that describe the sound (720); (b) ``visual_informative``, captions of solo clips that describe
only the visuals while a distinctive sound is audible (360); (c) ``visual_noise``, captions of
noise clips (540). Training: the demo's recipe (synthetic/demo.py DemoConfig: tiny towers, 3 epochs,
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
  Reported as well (issue 17's diagnostics, in the code before the first run on the new recipe):
  the paired differences DIFFERENCES with their paired-bootstrap SE on every subset; per row the
  linear probes of the sound (tools/probe_sound.py), the last-layer gate AUC informative vs noise
  clips (test split, and per epoch on the validation clips); for ROBUSTNESS_ROWS the t2v R@1 under
  --audio_perturb silence / noise / swap; and issue 17's targets checked on the seed means.
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

    python -m bench.text_guidance                      # the study (results in bench/results/)
    python -m bench.text_guidance --quick              # a small smoke run (not a result)
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

import main_task_retrieval
import util
from atomic_io import write_json, write_text
from dataloaders.base import collate_items
from dataloaders.registry import build_eval_datasets
from evaluation import encode_dataset, rerank_split, score_split
from metrics import metrics_report, text_to_video_ranks
from modules.tokenization_clip import ClipTokenizer
from synthetic import demo, demo_results
from tools import robustness_table
from tools.packed_results import pack_bits, read_npz, unpack_bits, write_npz

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SEEDS = (0, 1, 2)
RERANK_KS = (5, 10, 20, 50)
FINETUNE_EPOCHS = 1
BOOTSTRAP = 1000
BOOTSTRAP_SEED = 0
GOAL_POINTS = 3.0
GOAL_STANDARD_ERRORS = 2.0
TEXT_FLAGS = demo.TEXT_GUIDED_FLAGS
KINDS = ("sound", "visual_informative", "visual_noise")
# Amendment (issue 17): sound captions also split by their clip's category. A twin's sound
# caption fits three identical-looking videos (only the sound tells them apart; a model that
# ignores audio is capped at 33%); a solo's names visuals that already identify the clip.
SOUND_SPLITS = demo_results.SOUND_SPLITS
SUBSETS = ("all", *KINDS, *SOUND_SPLITS)
SUBSET_LABELS = {"all": "all", "sound": "sound", "visual_informative": "visual, informative audio",
                 "visual_noise": "visual, noise", "sound_twin": "sound, twins", "sound_solo": "sound, solo"}
# Amendment (issue 17): the paired differences whose power the study reports (paired-bootstrap
# SE, target <= 1 point on every subset), the robustness rows and the probed representations.
DIFFERENCES = (("zero_audio", "visual_only"), ("ungated", "zero_audio"), ("avigate", "zero_audio"),
               ("avigate", "ungated"), ("avigate", "visual_only"), ("category_audio", "zero_audio"),
               ("avigate", "category_audio"))
ROBUSTNESS_ROWS = ("ungated", "avigate")
PERTURBATIONS = demo.PERTURBATIONS
PROBE_COLUMNS = demo.PROBE_COLUMNS
TARGET_ZERO_AUDIO = 50.0
TARGET_MAX_SE = 1.0
TARGET_SEED_STD = 1.5
TARGET_PROBE_CAPTION = 80.0
TARGET_PROBE_VIDEO = 60.0
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
            control); synthetic/demo.py audio_cache.
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
    category [Nv] (str), split [Nt] (str: "sound_twin" / "sound_solo" for sound captions, the
    kind otherwise)."""

    caption_video: np.ndarray
    kind: np.ndarray
    category: np.ndarray
    split: np.ndarray

    def selects(self, subset: str) -> np.ndarray:
        """bool [Nt]: the captions of a subset of SUBSETS."""
        if subset == "all":
            return np.ones(self.kind.shape, dtype=bool)
        return (self.split if subset in SOUND_SPLITS else self.kind) == subset

    @property
    def informative_video(self) -> np.ndarray:
        """bool [Nv]: clips with a distinctive sound (twins and solos)."""
        return self.category != "noise"


def split_queries(split, metadata: dict) -> Query:
    kind_of = {(c["video_id"], c["caption"]): c["kind"] for c in metadata["test_captions"]}
    kinds = np.array([kind_of[(split.video_ids[v], c)] for c, v in zip(split.captions, split.caption_video)])
    categories = np.array([metadata["videos"][v]["category"] for v in split.video_ids])
    caption_video = np.asarray(split.caption_video)
    return Query(caption_video, kinds, categories,
                 demo_results.sound_splits(kinds, caption_video, metadata, list(split.video_ids)))


def v2t_subset_ranks(sim: np.ndarray, query: Query, selected: np.ndarray) -> np.ndarray:
    """1-based rank of each video's best caption among ``selected`` (bool [Nt]) among all
    captions, its own other captions not counted, ties pessimistic; videos without such a
    caption are left out. sim [Nt, Nv] (the v2t ranking) -> ranks [Nv']."""
    ranks = []
    for v in range(sim.shape[1]):
        own = query.caption_video == v
        positives = own & selected
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
    for name in SUBSETS:
        selected = query.selects(name)
        entry = {"num_texts": int(selected.sum())}
        v_ranks = v2t_subset_ranks(v2t, query, selected)
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
        if "att" in scored.own_caption_gates:
            att = np.abs(scored.own_caption_gates["att"])
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


def gate_separation(scored, query: Query) -> Optional[dict]:
    """How well the last layer's |g_att| tells clips with a distinctive sound (twins, solos)
    from noise clips: AUC (informative = positive) and the mean gap. Per video: its gate
    (text-agnostic) or the mean over its own captions' gates (text-guided). None without g_att."""
    if "att" in scored.video_gates:
        per_video = np.abs(scored.video_gates["att"][:, -1])
    elif "att" in scored.own_caption_gates:
        own = np.abs(scored.own_caption_gates["att"][:, -1])
        per_video = np.array([own[query.caption_video == v].mean() for v in range(query.category.size)])
    else:
        return None
    return demo_results.gate_separation(per_video, query.informative_video)


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
    separation = gate_separation(scored, query)
    if separation is not None:
        out["gate_separation"] = separation
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


def cached_evaluation(cfg, paths, row: StudyRow, seed: int, run_dir: str, query_of, threads: int) -> tuple:
    """evaluate_row, kept in ``<run_dir>/study_eval/evaluation.json`` and reused while the
    checkpoint, the row's flags, the inputs and the protocol constants are the same (an
    interrupted or extended study re-evaluates nothing); returns (result, seconds it took)."""
    out_dir = os.path.join(run_dir, "study_eval")
    path = os.path.join(out_dir, "evaluation.json")
    spec = {"checkpoint": demo.selected_checkpoint(run_dir), "flags": list(row.flags), "audio": row.audio,
            "inputs": demo.run_inputs(cfg), "rerank_ks": list(RERANK_KS), "bootstrap": BOOTSTRAP,
            "bootstrap_seed": BOOTSTRAP_SEED, "subsets": list(SUBSETS)}
    seconds = demo.cached_stage(
        f"evaluate {row.name} (seed {seed})", out_dir, spec,
        lambda: write_json(path, evaluate_row(cfg, paths, row, run_dir, query_of, threads), default=float))
    return demo_results.read_json(path), seconds


def row_diagnostics(cfg, paths, row: StudyRow, seed: int, run_dir: str) -> dict:
    """Amendment (issue 17): the linear probes of the sound (tools/probe_sound.py) on the test
    split, the last-layer gate AUC per epoch on the validation clips (written by training), and
    for ROBUSTNESS_ROWS the t2v R@1 and mean last-layer |g_att| under every --audio_perturb."""
    checkpoint = demo.selected_checkpoint(run_dir)
    probe_dir = os.path.join(run_dir, "probe")
    demo.cached_stage(f"probe {row.name} (seed {seed})", probe_dir,
                      {"checkpoint": checkpoint, "inputs": demo.run_inputs(cfg)},
                      lambda: demo.write_probe(row, paths, checkpoint, probe_dir))
    out = {"probe": demo.probe_summary(demo_results.read_json(os.path.join(probe_dir, demo.PROBE_FILE))),
           "gates_per_epoch": demo.gates_per_epoch(run_dir)}
    if row.name in ROBUSTNESS_ROWS:
        dirs = []
        for kind in ("none", *PERTURBATIONS):
            out_dir = os.path.join(run_dir, f"audio_{kind}")
            extra = [] if kind == "none" else ["--audio_perturb", kind]
            demo.cached_run(f"evaluate {row.name} (seed {seed}, audio {kind})", out_dir,
                            demo.eval_command(cfg, paths, row, checkpoint, out_dir, extra, seed), cfg,
                            in_process=True)
            dirs.append(out_dir)
        out["robustness"] = {kind: {"t2v_R@1": r["t2v_R@1"], "gate": r["gate"]}
                             for kind, r in robustness_table.collect(row.label, dirs).items()}
    return out


# ----------------------------------------------------------------------------- aggregation

def recall_keys() -> list:
    return [f"{d}_R@{k}" for d in ("t2v", "v2t") for k in RECALLS]


def subsets_of(per_seed: dict, protocol: str = "full") -> list:
    """The subsets a row's results carry, in order (results written before the twin / solo
    split carry "all" and KINDS only)."""
    first = per_seed[min(per_seed)]
    return list(first[protocol]["subsets"])


def mean_std(values: list) -> dict:
    return {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
            "per_seed": values}


def aggregate(per_seed: dict, protocol: str) -> dict:
    """Mean and std over seeds of every subset recall of one protocol ("full", "rerank_20", ...)."""
    seeds = sorted(per_seed)
    out = {}
    for subset in subsets_of(per_seed, protocol):
        entry = {}
        for key in recall_keys():
            values = [per_seed[s][protocol]["subsets"][subset][key] for s in seeds]
            if any(v is None for v in values):
                continue
            entry[key] = mean_std(values)
        out[subset] = entry
    overall = [per_seed[s][protocol]["metrics"]["plain"] for s in seeds]
    out["metrics_released"] = {k: {"mean": float(np.mean([m[k] for m in overall])),
                                   "std": float(np.std([m[k] for m in overall], ddof=1)) if len(overall) > 1 else 0.0}
                               for k in recall_keys()}
    out["seconds"] = float(np.mean([per_seed[s][protocol]["seconds"] for s in seeds]))
    out["pairs_fused"] = per_seed[seeds[0]][protocol]["pairs_fused"]
    return out


def paired_difference(rows: dict, candidate: str, reference: str, protocol: str = "full") -> dict:
    """Per subset: seed-mean t2v R@1 difference (candidate - reference, the reference always
    fully scored), its paired-bootstrap standard error (the same resampled queries for both
    rows and every seed) and the per-seed differences."""
    seeds = sorted(set(rows[candidate]) & set(rows[reference]))
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    out = {}
    for subset in subsets_of(rows[candidate], protocol):
        a = np.array([rows[candidate][s][protocol]["subsets"][subset][HITS] for s in seeds], dtype=float)
        b = np.array([rows[reference][s]["full"]["subsets"][subset][HITS] for s in seeds], dtype=float)
        diff = 100 * (a - b)                                       # [seeds, queries]
        boot = diff[:, rng.integers(0, diff.shape[1], (BOOTSTRAP, diff.shape[1]))].mean(-1).mean(0)
        out[subset] = {"difference": float(diff.mean()), "standard_error": float(boot.std(ddof=1)),
                       "per_seed": diff.mean(1).tolist()}
    return out


def goal_test(rows: dict, candidate: str, reference: str = "avigate", protocol: str = "full") -> dict:
    """paired_difference with the goal verdict per subset: >= GOAL_POINTS and > 2 SE."""
    out = paired_difference(rows, candidate, reference, protocol)
    for entry in out.values():
        d, se = entry["difference"], entry["standard_error"]
        entry["met"] = bool(d >= GOAL_POINTS and d > GOAL_STANDARD_ERRORS * se)
    return out


def seed_means(per_seed: dict, pick) -> Optional[dict]:
    """Mean and std over seeds of ``pick(seed_result)`` (a number, or a dict of numbers); None
    when no seed has it."""
    values = [pick(per_seed[s]) for s in sorted(per_seed)]
    values = [v for v in values if v is not None]
    if not values:
        return None
    if isinstance(values[0], dict):
        keys = [k for k in values[0] if all(v.get(k) is not None for v in values)]
        return {k: mean_std([v[k] for v in values]) for k in keys}
    return mean_std(values)


def diagnostics_summary(per_seed: dict) -> dict:
    """Seed means of the amendment's diagnostics (probes, gate AUC, robustness) when present."""
    first = per_seed[min(per_seed)]
    out = {}
    if "probe" in first:
        out["probe"] = seed_means(per_seed, lambda e: e["probe"])
    if "gate_separation" in first:
        out["gate_separation"] = seed_means(per_seed, lambda e: e.get("gate_separation"))
    if first.get("gates_per_epoch"):
        out["gates_per_epoch_auc"] = {s: per_seed[s]["gates_per_epoch"] for s in sorted(per_seed)}
    if "robustness" in first:
        out["robustness"] = {kind: seed_means(per_seed, lambda e, k=kind: e["robustness"].get(k))
                             for kind in ("none", *PERTURBATIONS)}
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
                                            for key in ("t2v_R@1", "t2v_R@5", "t2v_R@10")}
                                   for subset in subsets_of(per_seed, "stage1")}
                continue
            entry[protocol] = aggregate(per_seed, protocol)
        if spec.text_guided and "avigate" in rows:
            entry["goal_vs_avigate"] = goal_test(rows, name)
        if spec.text_guided and spec.warm_start and "avigate_continued" in rows:
            entry["goal_vs_avigate_continued"] = goal_test(rows, name, reference="avigate_continued")
        entry["gates"] = {s: per_seed[s]["gates"] for s in sorted(per_seed)}
        entry.update(diagnostics_summary(per_seed))
        summary[name] = entry
    return summary


def differences(rows: dict) -> dict:
    """The DIFFERENCES between rows that ran, each per subset with its paired-bootstrap SE."""
    return {f"{a} - {b}": paired_difference(rows, a, b) for a, b in DIFFERENCES if a in rows and b in rows}


def targets(results: dict) -> dict:
    """Issue 17's targets on the study's 3-seed means (those whose rows ran), as demo.target
    checks; the gain and gate targets are the demo's."""
    rows, diffs, out = results["summary"], results.get("differences", {}), {}

    def r1(name: str, subset: str = "all") -> Optional[float]:
        return rows[name]["full"][subset]["t2v_R@1"]["mean"] if name in rows else None

    if "zero_audio" in rows:
        out["zero_audio_overall"] = demo.target(r1("zero_audio"), TARGET_ZERO_AUDIO,
                                                "zero-audio control, t2v R@1 overall")
    if "ungated - zero_audio" in diffs:
        out["ungated_gain_sound_twins"] = demo.target(diffs["ungated - zero_audio"]["sound_twin"]["difference"],
                                                      demo.TARGET_GAIN_INFORMATIVE,
                                                      "ungated minus zero-audio, t2v R@1, twins' sound captions")
    main = [d for name, d in diffs.items() if name in ("ungated - zero_audio", "avigate - zero_audio",
                                                      "avigate - ungated", "avigate - visual_only")]
    if main:
        out["max_paired_se"] = demo.target(max(e["standard_error"] for d in main for e in d.values()),
                                           TARGET_MAX_SE, "largest paired-bootstrap SE of the main differences, "
                                           "any subset", at_most=True)
    out["max_seed_std_overall"] = demo.target(max(e["full"]["all"]["t2v_R@1"]["std"] for e in rows.values()),
                                              TARGET_SEED_STD, "largest seed std of overall t2v R@1", at_most=True)
    if rows.get("avigate", {}).get("gate_separation"):
        out["avigate_gate_auc"] = demo.target(rows["avigate"]["gate_separation"]["last_layer_auc"]["mean"],
                                              demo.TARGET_GATE_AUC, "AVIGATE's last-layer |g_att| AUC, informative "
                                              "vs noise test clips")
    probed = [e["probe"] for e in rows.values() if e.get("probe")]
    if probed:
        out["min_probe_caption"] = demo.target(min(p["caption_embedding"]["mean"] for p in probed),
                                               TARGET_PROBE_CAPTION, "named-sound probe of the caption embeddings")
        audio = [rows[n]["probe"]["video_embedding"]["mean"] for n in ("ungated", "avigate") if n in rows]
        if audio:
            out["min_probe_video_embedding_audio_rows"] = demo.target(
                min(audio), TARGET_PROBE_VIDEO, "sound-event probe of the audio rows' video embedding")
    return out


# ----------------------------------------------------------------------------- report

def fmt(stat: Optional[dict]) -> str:
    return "–" if not stat else f"{stat['mean']:.1f} ± {stat['std']:.1f}"


def difference_cells(entries: dict, subsets: list, verdict: bool) -> str:
    return " | ".join(f"{entries[s]['difference']:+.1f} ± {entries[s]['standard_error']:.1f}"
                      + (" MET" if verdict and entries[s]["met"] else "") for s in subsets)


def goal_lines(rows: dict, key: str, subsets: list) -> list:
    """Markdown table of one goal test (``key`` of the summary) for the rows that have it."""
    lines = ["| row | " + " | ".join(SUBSET_LABELS[s] for s in subsets) + " |", "|---" * (len(subsets) + 1) + "|"]
    for e in rows.values():
        if key in e:
            lines.append(f"| {e['label']} | {difference_cells(e[key], subsets, True)} |")
    return lines


def diagnostics_lines(results: dict, subsets: list) -> list:
    """The amendment's sections (issue 17): paired differences, probes, gate separation,
    robustness and targets; nothing for results written before it."""
    rows, lines = results["summary"], []
    if results.get("differences"):
        lines += ["", "## Paired differences (t2v R@1 points, seed mean ± paired-bootstrap SE)", "",
                  "| difference | " + " | ".join(SUBSET_LABELS[s] for s in subsets) + " |",
                  "|---" * (len(subsets) + 1) + "|"]
        lines += [f"| {name} | {difference_cells(d, subsets, False)} |" for name, d in results["differences"].items()]
    probed = {n: e for n, e in rows.items() if e.get("probe")}
    if probed:
        lines += ["", "## Linear probes of the sound (accuracy %, mean ± std over seeds; chance 14%)", "",
                  "Sound event of the test split's informative clips from each stage; named sound from the "
                  "sound captions' embeddings (tools/probe_sound.py).", "",
                  "| row | " + " | ".join(PROBE_COLUMNS) + " |", "|---" * (len(PROBE_COLUMNS) + 1) + "|"]
        for e in probed.values():
            lines.append(f"| {e['label']} | " + " | ".join(fmt(e["probe"].get(c)) for c in PROBE_COLUMNS) + " |")
    gated = {n: e for n, e in rows.items() if e.get("gate_separation")}
    if gated:
        lines += ["", "## Gates: last-layer |g_att|, informative vs noise test clips (mean ± std over seeds)", "",
                  "| row | AUC | gap (informative − noise) | AUC per epoch on validation clips (seed 0: before, "
                  "after each epoch) |", "|---|---|---|---|"]
        for e in gated.values():
            sep = e["gate_separation"]
            per_epoch = e.get("gates_per_epoch_auc", {})
            first = per_epoch[min(per_epoch)] if per_epoch else None
            epochs = " / ".join(f"{a:.2f}" for a in first) if first else "–"
            gap = sep["last_layer_gap"]
            lines.append(f"| {e['label']} | {sep['last_layer_auc']['mean']:.2f} ± {sep['last_layer_auc']['std']:.2f} | "
                         f"{gap['mean']:.3f} ± {gap['std']:.3f} | {epochs} |")
    robust = {n: e for n, e in rows.items() if e.get("robustness")}
    if robust:
        kinds = ("none", *PERTURBATIONS)
        lines += ["", "## Robustness: t2v R@1 and mean last-layer |g_att| under --audio_perturb (mean over seeds)",
                  "", "| row | " + " | ".join(kinds) + " |", "|---" * (len(kinds) + 1) + "|"]
        for e in robust.values():
            cells = []
            for kind in kinds:
                r = e["robustness"][kind]
                gate = f", g {r['gate']['mean']:.3f}" if r and "gate" in r else ""
                cells.append(f"{fmt(r['t2v_R@1'])}{gate}" if r else "–")
            lines.append(f"| {e['label']} | " + " | ".join(cells) + " |")
    if results.get("targets"):
        lines += ["", "## Targets (issue 17)", "", "| target | value | goal | met |", "|---|---|---|---|"]
        for name, t in results["targets"].items():
            value = "–" if t["value"] is None else f"{t['value']:.2f}"
            lines.append(f"| {name} | {value} | {t['comparison']} {t['target']} | {'yes' if t['met'] else 'NO'} |")
    return lines


def markdown(results: dict) -> str:
    rows = results["summary"]
    subsets = [k for k in next(iter(rows.values()))["full"] if k in SUBSET_LABELS]
    extra = [s for s in subsets if s in SOUND_SPLITS]
    lines = ["# Text guidance study", "", f"Command: `{results['command']}`; seeds {results['seeds']}; "
             f"{results['num_texts']} test captions, {results['num_videos']} test videos.", "",
             "## Full scoring: t2v R@1 by caption subset (mean ± std over seeds)", "",
             "| row | all R@1 | R@5 | R@10 | v2t R@1 | sound R@1 | visual, informative audio R@1 | visual, noise R@1 |"
             + "".join(f" {SUBSET_LABELS[s]} R@1 |" for s in extra),
             "|---|---|---|---|---|---|---|---|" + "---|" * len(extra)]
    for name, e in rows.items():
        f = e["full"]
        lines.append(f"| {e['label']} | {fmt(f['all'].get('t2v_R@1'))} | {fmt(f['all'].get('t2v_R@5'))} | "
                     f"{fmt(f['all'].get('t2v_R@10'))} | {fmt(f['all'].get('v2t_R@1'))} | "
                     + " | ".join(fmt(f[k].get("t2v_R@1")) for k in (*KINDS, *extra)) + " |")
    lines += ["", "## Per seed: t2v R@1 with its 95% bootstrap interval over queries (full scoring)", "",
              "| row | seed | " + " | ".join(SUBSET_LABELS[s] for s in subsets) + " |",
              "|---|---|" + "---|" * len(subsets)]
    for name, e in rows.items():
        for seed, ev in sorted(results["per_seed"].get(name, {}).items(), key=lambda kv: int(kv[0])):
            sub = ev["full"]["subsets"]
            lines.append(f"| {e['label']} | {seed} | " + " | ".join(
                f"{sub[k]['t2v_R@1']:.1f} [{sub[k]['t2v_R@1_ci95'][0]:.1f}, {sub[k]['t2v_R@1_ci95'][1]:.1f}]"
                for k in subsets) + " |")
    lines += ["", "## Goal test vs AVIGATE (t2v R@1 difference, paired-bootstrap SE; met = ≥ 3 points and > 2 SE)", "",
              *goal_lines(rows, "goal_vs_avigate", subsets), "",
              "Warm-started rows against the continued-training control (same warm start and epoch, no text):", "",
              *goal_lines(rows, "goal_vs_avigate_continued", subsets)]
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
    lines += diagnostics_lines(results, subsets)
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
    subsets = [k for k in ("all", *KINDS, *SOUND_SPLITS) if k in next(iter(rows.values()))["full"]]
    for i, (name, e) in enumerate(rows.items()):
        means = [e["full"][k]["t2v_R@1"]["mean"] for k in subsets]
        stds = [e["full"][k]["t2v_R@1"]["std"] for k in subsets]
        ax.bar(np.arange(len(subsets)) + i * width, means, width, yerr=stds, label=name, capsize=2)
    names = {"all": "all captions", "sound": "sound", "visual_informative": "visual (informative audio)",
             "visual_noise": "visual (noise clip)", "sound_twin": "sound (twins)", "sound_solo": "sound (solo)"}
    ax.set_xticks(np.arange(len(subsets)) + 0.4 - width / 2, [names[k] for k in subsets])
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
    write_json(f"{prefix}.json", compact, indent=None, default=float)  # one line: <= 1 MB with 12 rows
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
            evals.setdefault(row.name, {})[seed], seconds[f"evaluate {row.name} seed {seed}"] = cached_evaluation(
                cfg, paths, row, seed, runs[(row.name, seed)], query_of, args.threads)
            t = time.time()
            evals[row.name][seed].update(row_diagnostics(cfg, paths, row, seed, runs[(row.name, seed)]))
            seconds[f"diagnose {row.name} seed {seed}"] = time.time() - t

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
    results = {"command": " ".join(["python -m bench.text_guidance", *(sys.argv[1:] if argv is None else argv)]),
               "design": {"seeds": args.seeds, "rerank_ks": RERANK_KS, "finetune_epochs": FINETUNE_EPOCHS,
                          "bootstrap": BOOTSTRAP, "goal_points": GOAL_POINTS,
                          "goal_standard_errors": GOAL_STANDARD_ERRORS, "recipe": asdict(cfg)},
               "seeds": args.seeds, "num_texts": first["num_texts"], "num_videos": first["num_videos"],
               "best_variant": best, "summary": summary, "differences": differences(evals), "per_seed": evals,
               "seconds": seconds, "wall_seconds": time.time() - start,
               "cpu_seconds": demo.cpu_seconds() - start_cpu, "quick": args.quick}
    results["targets"] = targets(results)
    write_results(results, args.results)
    print(markdown(results))
    return results


if __name__ == "__main__":
    run_study()
