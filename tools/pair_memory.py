"""Memory of text-guided pair fusion in training, measured (issue 10, deliverable 3).

What is measured: the peak memory of one training pass (forward + backward) through the real
pair path, ``ContrastiveObjective._pair_rows`` (pair context, chunk loop with checkpointed
``AVIGATE.score_grid`` chunks when ``pairs_per_chunk`` > 0, rows of scores), followed by a
cross-entropy over the rows, for Bl local texts x Bg videos = P pairs. The inputs (text
embeddings [Bl, D], frame embeddings [Bg, F, D], resampled audio [Bg, Q, D]) are leaves
that require gradients, standing in for the encoders' outputs; the fusion and the resampler
have the real width (D = 512, F = 12, Q = 12, L = 4 by default) and random weights. Bg is
fixed and Bl varies, so the per-video part (the pair context: K/V of every layer, gate terms)
is constant and everything that grows with P is per-pair cost.

How (``PeakMeter``): on the CPU, torch.profiler with ``profile_memory`` records every
allocation and free of the CPU allocator; the running sum over time, started at zero when the
pass starts, has its maximum at the pass's peak: the CPU analogue of CUDA's
``max_memory_allocated`` (bytes of live tensors, without allocator caching or fragmentation).
On CUDA the meter reads ``torch.cuda.max_memory_allocated`` directly. A second, independent
count, ``saved``: the bytes of the distinct storages autograd saves for backward during the
forward pass (saved-tensor hooks; tensors saved inside a checkpointed chunk are dropped by the
checkpoint and not counted), which is the part of the peak that the chunking removes.

Bytes per pair: the least-squares slope of the peak over P (3+ values of Bl at fixed Bg),
with its uncertainty = the largest deviation of a two-point slope from it; the intercept is
the fixed part (the pair context and its gradients). With chunking, two slopes: over P at a
fixed chunk (what still grows with every pair: its scores and per-pair bookkeeping) and over
the chunk size at fixed P (the working set of one chunk, forward + recomputation + backward).
Memory of a rank then is intercept + per_pair * P (all at once) or intercept + per_pair_chunked
* P + per_chunk_pair * C. Evaluation (``--parts eval``): the peak of ``AVIGATE.score`` without
autograd over one chunk of P pairs, whose slope is the working set per pair of an
``--eval_chunk`` (and sets ``modules.memory_plan.DEFAULT_EVAL_PAIRS_PER_CHUNK``). Prints markdown
tables; ``--json`` writes every number.

Usage:
    python -m tools.pair_memory                 # D=512, F=12, Q=12, L=4 (a few minutes)
    python -m tools.pair_memory --tiny          # seconds (CI: tests/test_benches.py)
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from atomic_io import write_json
import util
from modules.ast import ASTConfig
from modules.clip import CLIPConfig
from modules.fusion import FusionConfig
from modules.modeling import AVIGATE, AVIGATEConfig, TextFeatures, VideoFeatures
from modules.objective import ContrastiveObjective, ObjectiveConfig
from modules.resampler import ResamplerConfig

GUIDED_FLAGS = dict(text_gate=True, text_query=True, query_gate=True)
MIB = 1 << 20


@dataclass
class Sizes:
    """What one measurement covers.

    Args:
        width: D; frames: F; queries: Q; layers: fusion blocks L.
        videos: Bg, the gathered videos every local text is fused with.
        texts: the values of Bl (local texts) the slope is fitted over.
        chunk: pairs per checkpointed chunk for the slope over P.
        chunks: chunk sizes of the slope over the chunk (at texts[1] texts).
        encoder_batches: local batches of the per-video encoder measurement (``--parts encoders``).
    """

    width: int = 512
    frames: int = 12
    queries: int = 12
    layers: int = 4
    videos: int = 32
    texts: tuple = (2, 4, 8)
    chunk: int = 32
    chunks: tuple = (16, 32, 64)
    encoder_batches: tuple = (1, 2, 3)


TINY = Sizes(width=64, frames=4, queries=4, layers=2, videos=8, texts=(1, 2, 4), chunk=4, chunks=(4, 8, 16))


def pair_model(sizes: Sizes) -> AVIGATE:
    """Fusion (text-guided: gate, query, query gate) and resampler at the given width with
    random weights; the towers are minimal (the pair path never runs them)."""
    d = sizes.width
    clip = CLIPConfig(embed_dim=d, image_resolution=32, vision_layers=1, vision_width=64, vision_patch_size=16,
                      context_length=32, vocab_size=49408, transformer_width=64, transformer_heads=1,
                      transformer_layers=1)
    cfg = AVIGATEConfig(clip=clip, ast=ASTConfig.tiny(),
                        resampler=ResamplerConfig(width=d, num_queries=sizes.queries, layers=1),
                        fusion=FusionConfig(width=d, layers=sizes.layers, max_frames=sizes.frames, **GUIDED_FLAGS))
    return AVIGATE(cfg)


class PeakMeter:
    """Peak bytes of live tensors allocated inside the ``with`` block, above its start (see the
    module docstring). ``peak`` is set on exit."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak = 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        else:
            self._profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                                    profile_memory=True)
            self._profiler.__enter__()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._start
            return False
        self._profiler.__exit__(*exc)
        events = sorted((e.start_ns(), e.nbytes()) for e in self._profiler.profiler.kineto_results.events()
                        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
        level = peak = 0
        for _, nbytes in events:
            level += nbytes
            peak = max(peak, level)
        self.peak = peak
        return False


class SavedBytes:
    """Bytes of the distinct storages autograd saves for backward inside the ``with`` block,
    leaving out those that existed before it (``existing``: parameters and inputs).

    Args:
        existing: tensors whose storages are not counted.
    """

    def __init__(self, existing: list[torch.Tensor]):
        self.existing = {t.untyped_storage().data_ptr() for t in existing}
        self.storages: dict[int, int] = {}

    def _pack(self, tensor: torch.Tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self.existing:
            self.storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    def __enter__(self):
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)
        return False

    @property
    def total(self) -> int:
        return sum(self.storages.values())


def measure(model: AVIGATE, sizes: Sizes, texts: int, pairs_per_chunk: int, precision: str,
            device: torch.device) -> dict:
    """Peak and saved bytes of one forward + backward of ``texts`` x ``sizes.videos`` pairs."""
    objective = ContrastiveObjective(model, ObjectiveConfig(pairs_per_chunk=pairs_per_chunk))
    g = torch.Generator().manual_seed(texts)
    d, f, q, nv = sizes.width, sizes.frames, sizes.queries, sizes.videos

    def leaf(*shape):
        return torch.randn(*shape, generator=g).to(device).requires_grad_()

    text, frames, audio = leaf(texts, d), leaf(nv, f, d), leaf(nv, q, d)
    mask = torch.ones(nv, f, dtype=torch.bool, device=device)
    targets = torch.arange(texts, device=device)
    saved = SavedBytes([*model.parameters(), text, frames, audio, mask])
    start = time.perf_counter()
    with PeakMeter(device) as meter:
        with util.autocast(device, precision), saved:
            rows, _ = objective._pair_rows(text, frames, mask, audio, mask)
        F.cross_entropy(rows.float(), targets).backward()
        del rows
    seconds = time.perf_counter() - start
    assert text.grad is not None and frames.grad is not None
    return {"texts": texts, "videos": nv, "pairs": texts * nv, "pairs_per_chunk": pairs_per_chunk,
            "precision": precision, "peak_bytes": meter.peak, "saved_bytes": saved.total, "seconds": seconds}


def measure_eval(model: AVIGATE, sizes: Sizes, texts: int, precision: str, device: torch.device) -> dict:
    """Peak bytes of scoring ``texts`` x ``sizes.videos`` pairs in one chunk, as evaluation does
    (``AVIGATE.score``, no autograd): the working set of an ``--eval_chunk`` of that many pairs."""
    g = torch.Generator().manual_seed(texts)
    d, f, q, nv = sizes.width, sizes.frames, sizes.queries, sizes.videos
    text = TextFeatures(torch.randn(texts, d, generator=g).to(device))
    video = VideoFeatures(torch.randn(nv, f, d, generator=g).to(device), torch.ones(nv, f, dtype=torch.bool, device=device),
                          torch.randn(nv, q, d, generator=g).to(device))
    model.eval()
    start = time.perf_counter()
    with PeakMeter(device) as meter, torch.no_grad(), util.autocast(device, precision):
        scores = model.score(text, video, chunk=(texts, nv))
    assert scores.shape == (texts, nv)
    return {"texts": texts, "videos": nv, "pairs": texts * nv, "precision": precision, "peak_bytes": meter.peak,
            "seconds": time.perf_counter() - start}


def encoder_model(sizes: Sizes) -> AVIGATE:
    """The released towers (CLIP ViT-B/32, the 768x12 AST) with the fusion and resampler at
    ``sizes``; random weights."""
    cfg = AVIGATEConfig(clip=CLIPConfig(), ast=ASTConfig(),
                        resampler=ResamplerConfig(width=sizes.width, num_queries=sizes.queries, layers=sizes.layers),
                        fusion=FusionConfig(width=sizes.width, layers=sizes.layers, max_frames=sizes.frames))
    return AVIGATE(cfg)


def measure_encoders(model: AVIGATE, batch: int, precision: str, device: torch.device) -> dict:
    """Peak bytes of one forward + backward of the text-agnostic objective on ``batch`` (text,
    video) pairs with cached AST tokens: what every rank spends per local video beyond the pair
    fusion (CLIP on F frames and on the text, audio projection and resampler, fusion of the
    video). Weights, gradients and optimizer states are not included (see ``static_bytes``): the
    gradients are allocated by a warm-up pass before the measured one, which then only
    accumulates into them."""
    cfg = model.cfg
    g = torch.Generator().manual_seed(batch)
    f, res = cfg.fusion.max_frames, cfg.clip.image_resolution
    ids = torch.randint(1, 49406, (batch, 32), generator=g)
    inputs = {"text_ids": ids, "text_mask": torch.ones_like(ids),
              "frames": torch.randn(batch, f, 3, res, res, generator=g),
              "frame_mask": torch.ones(batch, f, dtype=torch.long),
              "audio": torch.randn(batch, cfg.ast.num_output_tokens, cfg.ast.embed_dim, generator=g).half()}
    inputs = {k: v.to(device) for k, v in inputs.items()}
    objective = ContrastiveObjective(model, ObjectiveConfig())

    def step():
        with util.autocast(device, precision):
            loss = objective(**inputs).loss
        loss.backward()

    if any(p.grad is None for p in model.parameters() if p.requires_grad):
        step()  # allocates every gradient
    model.zero_grad(set_to_none=False)
    start = time.perf_counter()
    with PeakMeter(device) as meter:
        step()
    return {"videos": batch, "precision": precision, "peak_bytes": meter.peak, "seconds": time.perf_counter() - start}


def static_bytes(model: AVIGATE) -> dict:
    """Weights (fp32, frozen included), gradients and BertAdam's two moments of the trainable
    parameters, in bytes (freezing as ``build_optimizer`` does)."""
    from modules.optimization import freeze_parameters
    freeze_parameters(model, freeze_layer_num=0)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"parameters": total, "trainable": trainable, "weights": 4 * total, "gradients": 4 * trainable,
            "optimizer": 8 * trainable, "total": 4 * total + 12 * trainable}


def fit(xs: list[float], ys: list[float]) -> dict:
    """Least-squares line y = a + b x with b's uncertainty: the largest deviation of a slope
    between two measured points from b."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    pair_slopes = [(ys[j] - ys[i]) / (xs[j] - xs[i]) for i in range(n) for j in range(i + 1, n) if xs[j] != xs[i]]
    return {"slope": b, "intercept": my - b * mx, "uncertainty": max(abs(s - b) for s in pair_slopes)}


def run(sizes: Sizes, precisions: list[str], device: torch.device, parts: tuple = ("train", "eval")) -> dict:
    """Every measurement and the fitted bytes per pair, per precision: "train" (forward +
    backward, all at once and chunked) and "eval" (scoring without autograd)."""
    torch.manual_seed(0)
    model = pair_model(sizes).to(device)
    encoders = None
    if "encoders" in parts:
        encoders = encoder_model(sizes).to(device)
    results = {}
    for precision in precisions:
        results[precision] = {}
        if encoders is not None:
            results[precision]["static"] = static_bytes(encoders)
            for key, checkpointed in (("encoders", False), ("encoders_checkpointed", True)):
                encoders.set_grad_checkpointing(checkpointed)
                runs = [measure_encoders(encoders, b, precision, device) for b in sizes.encoder_batches]
                results[precision][key] = fit([m["videos"] for m in runs], [m["peak_bytes"] for m in runs])
                results[precision][f"{key}_measurements"] = runs
        if "eval" in parts:
            scored = [measure_eval(model, sizes, bl, precision, device) for bl in sizes.texts]
            results[precision]["eval"] = fit([m["pairs"] for m in scored], [m["peak_bytes"] for m in scored])
            results[precision]["eval_measurements"] = scored
        if "train" not in parts:
            continue
        full = [measure(model, sizes, bl, 0, precision, device) for bl in sizes.texts]
        chunked = [measure(model, sizes, bl, sizes.chunk, precision, device) for bl in sizes.texts]
        fixed_texts = sizes.texts[1]
        by_chunk = [measure(model, sizes, fixed_texts, c, precision, device) for c in sizes.chunks]
        pairs = [m["pairs"] for m in full]
        results[precision].update({
            "all_at_once": fit(pairs, [m["peak_bytes"] for m in full]),
            "all_at_once_saved": fit(pairs, [m["saved_bytes"] for m in full]),
            "chunked_per_pair": fit(pairs, [m["peak_bytes"] for m in chunked]),
            "chunked_saved": fit(pairs, [m["saved_bytes"] for m in chunked]),
            "per_chunk_pair": fit(list(sizes.chunks), [m["peak_bytes"] for m in by_chunk]),
            "measurements": full + chunked + by_chunk,
        })
    return results


def rank_memory(fits: dict, pairs: int, chunk: int) -> float:
    """Bytes of the pair fusion of a rank fusing ``pairs`` pairs in chunks of ``chunk`` (0 = all)."""
    if not chunk or chunk >= pairs:
        f = fits["all_at_once"]
        return f["intercept"] + f["slope"] * pairs
    per_pair, per_chunk = fits["chunked_per_pair"], fits["per_chunk_pair"]
    return per_chunk["intercept"] + per_pair["slope"] * pairs + per_chunk["slope"] * chunk


def report(sizes: Sizes, results: dict, device: torch.device) -> str:
    lines = [f"pair memory, D={sizes.width} F={sizes.frames} Q={sizes.queries} L={sizes.layers}, "
             f"{sizes.videos} videos x {list(sizes.texts)} texts, device {device} ({platform.processor() or platform.machine()}), "
             f"torch {torch.__version__}", ""]

    def kib(f):
        return f"{f['slope'] / 1024:.1f} ± {f['uncertainty'] / 1024:.1f} KiB"

    train = {p: r for p, r in results.items() if "all_at_once" in r}
    if train:
        lines += ["| precision | all at once: peak / pair | saved / pair | chunked (C fixed): peak / pair | "
                  "per chunk pair | fixed part |", "|---|---|---|---|---|---|"]
        for precision, r in train.items():
            lines.append(f"| {precision} | {kib(r['all_at_once'])} | {kib(r['all_at_once_saved'])} | "
                         f"{kib(r['chunked_per_pair'])} | {kib(r['per_chunk_pair'])} | "
                         f"{r['all_at_once']['intercept'] / MIB:.1f} MiB |")
        lines += ["", "| precision | pairs | chunk | peak MiB | saved MiB | seconds |", "|---|---|---|---|---|---|"]
        for precision, r in train.items():
            for m in r["measurements"]:
                lines.append(f"| {precision} | {m['pairs']} | {m['pairs_per_chunk'] or 'all'} | "
                             f"{m['peak_bytes'] / MIB:.1f} | {m['saved_bytes'] / MIB:.1f} | {m['seconds']:.1f} |")
    encoders = {p: r for p, r in results.items() if "encoders" in r}
    if encoders:
        lines += ["", "| precision | encoders per local video (ViT-B/32, 12 frames, text, resampler) | fixed part | "
                  "weights + grads + Adam (trainable / all parameters) |", "|---|---|---|---|"]
        for precision, r in encoders.items():
            st = r["static"]
            for key, label in (("encoders", ""), ("encoders_checkpointed", " (--grad_checkpointing)")):
                if key in r:
                    lines.append(f"| {precision}{label} | {r[key]['slope'] / MIB:.1f} ± {r[key]['uncertainty'] / MIB:.1f} "
                                 f"MiB | {r[key]['intercept'] / MIB:.0f} MiB | {st['total'] / MIB:.0f} MiB "
                                 f"({st['trainable'] / 1e6:.1f}M / {st['parameters'] / 1e6:.1f}M) |")
    evals = {p: r for p, r in results.items() if "eval" in r}
    if evals:
        lines += ["", "| precision | evaluation (no autograd): peak / pair in one chunk | fixed part | peak MiB per pairs |",
                  "|---|---|---|---|"]
        for precision, r in evals.items():
            points = ", ".join(f"{m['pairs']}: {m['peak_bytes'] / MIB:.1f}" for m in r["eval_measurements"])
            lines.append(f"| {precision} | {kib(r['eval'])} | {r['eval']['intercept'] / MIB:.1f} MiB | {points} |")
    return "\n".join(lines)


# Memory a GPU of each nominal size reports (torch.cuda total_memory, GiB): RTX 4090 / A10-class,
# A100 40GB, A100 / H100 80GB, H200 141GB.
GPU_GIB = {"24 GB": 23.6, "40 GB": 39.4, "80 GB": 79.2, "141 GB": 139.8}
# An estimate fits when it stays below this share of the GPU: the rest is the CUDA context,
# cuBLAS / NCCL workspaces and allocator fragmentation, which live-tensor counts do not see.
FIT_SHARE = 0.85
GLOBAL_BATCH, PLAN_GPUS, PLAN_CHUNKS = 128, (4, 8), (0, 1024, 256)


def smallest_gpu(total_bytes: float) -> str:
    """The smallest GPU_GIB size the estimate fits (below FIT_SHARE of it), as ">= size"."""
    fits = [name for name, size in GPU_GIB.items() if total_bytes / (1 << 30) <= FIT_SHARE * size]
    return f">= {fits[0]}" if fits else "none"


def planning_table(results: dict) -> str:
    """Per-rank memory of the released load (global batch 128 on 4 or 8 GPUs) for the
    text-agnostic model and the text-guided one fusing all pairs, and the smallest GPU it fits,
    from merged train + encoders + eval results."""
    gib = float(1 << 30)
    lines = ["| GPUs | model, pairs / rank | precision | --train_pairs_per_chunk | pair fusion | rank total | "
             "fits | rank total, --grad_checkpointing | fits |", "|---|---|---|---|---|---|---|---|---|"]
    for gpus in PLAN_GPUS:
        local = GLOBAL_BATCH // gpus
        pairs = local * GLOBAL_BATCH
        for precision, r in results.items():
            for chunk in (None, *PLAN_CHUNKS):
                fusion = 0.0 if chunk is None else rank_memory(r, pairs, chunk)
                cells = [f"{fusion / gib:.1f} GiB" if chunk is not None else "-"]
                for checkpointed in (False, True):
                    enc = r["encoders_checkpointed" if checkpointed else "encoders"]
                    total = r["static"]["total"] + enc["intercept"] + enc["slope"] * local + fusion
                    cells += [f"{total / gib:.1f} GiB", smallest_gpu(total)]
                model = "agnostic" if chunk is None else f"text-guided, {local} x {GLOBAL_BATCH} = {pairs}"
                setting = "-" if chunk is None else (chunk or "all")
                lines.append(f"| {gpus} | {model} | {precision} | {setting} | " + " | ".join(cells) + " |")
    lines += ["", "| evaluation 1k x 1k | precision | chunk | working set | with the weights |", "|---|---|---|---|---|"]
    for precision, r in results.items():
        chunk = 2048
        work = r["eval"]["intercept"] + r["eval"]["slope"] * chunk
        lines.append(f"| text-guided, 10^6 pairs | {precision} | {chunk} pairs | {work / gib:.2f} GiB | "
                     f"{(work + r['static']['weights']) / gib:.2f} GiB |")
    return "\n".join(lines)


def merge(paths: list[str]) -> dict:
    """Results of several --json files, per precision (later files add their parts)."""
    merged: dict = {}
    for path in paths:
        with open(path) as f:
            for precision, r in json.load(f)["results"].items():
                merged.setdefault(precision, {}).update(r)
    return merged


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="test sizes (width 64, 2 layers): seconds, for CI")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=list(util.PRECISIONS))
    p.add_argument("--videos", type=int, default=None, help="Bg (default 32)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--parts", nargs="+", default=["train", "eval"], choices=["train", "eval", "encoders"],
                   help="pair fusion in training (forward + backward) and/or evaluation (scoring); "
                        "encoders: per-video memory of the released towers (ViT-B/32, cached AST tokens)")
    p.add_argument("--json", default=None, help="write every number here")
    p.add_argument("--table", nargs="+", default=None, metavar="JSON",
                   help="print the per-rank planning table from earlier --json files (train, eval, encoders)")
    args = p.parse_args(argv)
    if args.table:
        print(planning_table(merge(args.table)))
        return {}
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = TINY if args.tiny else Sizes()
    if args.videos:
        sizes = Sizes(**{**vars(sizes), "videos": args.videos})
    device = torch.device(args.device)
    util.setup_precision(device, "fp32", tf32=True) if device.type == "cuda" else None
    results = run(sizes, args.precisions, device, tuple(args.parts))
    print(report(sizes, results, device))
    if set(args.parts) == {"train", "eval", "encoders"}:
        print("\n" + planning_table(results))
    if args.json:
        write_json(args.json, {"sizes": vars(sizes), "device": str(device), "torch": torch.__version__,
                               "results": results}, indent=1, default=None)
    return results


if __name__ == "__main__":
    main()
