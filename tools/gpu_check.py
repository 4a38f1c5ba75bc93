"""One GPU, at most 8 minutes, one table (issue 10, deliverable 6).

Run on a machine with one CUDA GPU:

    python -m tools.gpu_check                  # real sizes (ViT-B/32, 768x12 AST, D=512)
    python -m tools.gpu_check --json gpu.json  # also every number as JSON

It prints one markdown table:
1. the test subset marked ``cuda`` (``pytest -m cuda``: host syncs of a step counted with
   ``torch.cuda.set_sync_debug_mode``, exact fp32 scores under bf16 autocast with TF32 on,
   CPU/GPU agreement, chunk-bounded pair memory, a bf16 run through ``main``);
2. bf16 vs fp32 evaluation agreement at the real width (D=512, F=12, Q=12, L=4; random
   weights): max |score difference| in units of s = exp(logit_scale), ties, top-1 agreement;
3. training step time and peak memory (``torch.cuda.max_memory_allocated``) at the released
   per-GPU load: local batch 32 videos (12 frames, cached AST tokens) and 32 texts; the
   text-guided model fuses every local text with the 128 videos of the global batch, which
   are simulated on the one GPU by gathers that return 4 copies of the local batch (the
   compute and memory of a rank of 4; the loss value itself is meaningless);
4. 1k x 1k evaluation time from encoded features: text-agnostic scoring, text-guided full
   scoring (10^6 fused pairs) and ``--rerank_topk 50`` (modules/rerank.py), plus encoding;
5. the AST trunk's clips/s (real 768x12 AST, random weights) against feeding cached tokens.

On a CPU it runs the same code at tiny sizes (``--device cpu --tiny``; tests/test_benches.py
runs it in CI so it cannot rot); the numbers then only show that every row works.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import platform
import re
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
import torch

import training
from atomic_io import write_json
import util
from dataloaders import video as video_io
from metrics import retrieval_metrics
from modules import loss as loss_module
from modules.ast import AST, ASTConfig
from modules.clip import CLIPConfig
from modules.fusion import FusionConfig
from modules.modeling import AVIGATE, AVIGATEConfig, TextFeatures, VideoFeatures
from modules.objective import ContrastiveObjective, ObjectiveConfig
from modules.optimization import OptimConfig, build_optimizer, build_scheduler
from modules.rerank import score_pair_list, shortlists
from modules.resampler import ResamplerConfig
from tools.pair_memory import PeakMeter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

GUIDED = dict(text_gate=True, text_query=True, query_gate=True)
GIB = 1 << 30
START_TOKEN, END_TOKEN = 49406, 49407
TINY_AST_FRAMES = 96


@dataclass
class CheckSizes:
    """Sizes of every row.

    Args:
        tiny: test-sized towers (CLIPConfig.tiny, ASTConfig.tiny) instead of ViT-B/32 and AST.
        width, frames, queries, layers: D, F, Q and the fusion / resampler depth.
        local_batch: videos and texts per GPU; world: ranks simulated (gathered = local x world).
        text_len: tokens per text (--max_words).
        agreement_items: texts = videos of the bf16/fp32 agreement check.
        eval_items: texts = videos of the evaluation timing (1k x 1k).
        rerank_topk: K of the re-ranking row.
        train_chunk: --train_pairs_per_chunk of the chunked text-guided row.
        steps: timed training steps (after one warm-up step).
        ast_batch: clips per AST forward.
    """

    tiny: bool = False
    width: int = 512
    frames: int = 12
    queries: int = 12
    layers: int = 4
    local_batch: int = 32
    world: int = 4
    text_len: int = 32
    agreement_items: int = 256
    eval_items: int = 1000
    rerank_topk: int = 50
    train_chunk: int = 1024
    steps: int = 3
    ast_batch: int = 32


TINY = CheckSizes(tiny=True, width=64, frames=4, queries=4, layers=2, local_batch=4, world=2, text_len=8,
                  agreement_items=16, eval_items=24, rerank_topk=4, train_chunk=8, steps=1, ast_batch=2)


def ast_config(sizes: CheckSizes) -> ASTConfig:
    """The released 768x12 AST, or a tiny one over a short spectrogram (109 tokens)."""
    return replace(ASTConfig.tiny(), target_frames=TINY_AST_FRAMES) if sizes.tiny else ASTConfig()


def model_config(sizes: CheckSizes, text_guided: bool) -> AVIGATEConfig:
    """ViT-B/32 + 768x12 AST (or the tiny towers) with the fusion and resampler at ``sizes``."""
    clip = CLIPConfig.tiny() if sizes.tiny else CLIPConfig()
    ast = ast_config(sizes)
    return AVIGATEConfig(clip=clip, ast=ast,
                         resampler=ResamplerConfig(width=sizes.width, num_queries=sizes.queries, layers=sizes.layers),
                         fusion=FusionConfig(width=sizes.width, layers=sizes.layers, max_frames=sizes.frames,
                                             **(GUIDED if text_guided else {})))


def build_model(sizes: CheckSizes, text_guided: bool, device: torch.device) -> AVIGATE:
    """Random weights; the text terms start non-zero (a trained text-guided model's state)."""
    torch.manual_seed(0)
    model = AVIGATE(model_config(sizes, text_guided))
    with torch.no_grad():
        for block in model.fusion.blocks:
            for gate in block.gates.values():
                if gate.fc1_text is not None:
                    gate.fc1_text.weight.normal_(std=0.02)
                gate.fc2.weight.normal_(std=0.02)
    return model.to(device)


def text_batch(cfg: AVIGATEConfig, n: int, length: int, device: torch.device, seed: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, START_TOKEN, (n, length), generator=g)
    ids[:, 0], ids[:, -1] = START_TOKEN, END_TOKEN
    return ids.to(device), torch.ones_like(ids)


def loader_frames(pixels: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
    """uint8 frames [B, F, 3, S, S] in the form the training loader hands to
    ``dataloaders.base.video_inputs``: uint8 where the inputs are normalized on the device
    (``dataloaders.video.normalize_frames``), else CLIP-normalized fp32 with padded frames 0."""
    if hasattr(video_io, "normalize_frames"):
        return pixels
    mean = torch.tensor(video_io.CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(video_io.CLIP_STD).view(3, 1, 1)
    images = (pixels.float() / video_io.PIXEL_MAX - mean) / std
    return images * frame_mask.bool()[..., None, None, None]


def video_batch(cfg: AVIGATEConfig, n: int, device: torch.device, seed: int, loader: bool = False) -> dict:
    """Frames [n, F, 3, H, W] (CLIP-normalized; ``loader``: as the training loader gives them),
    mask (the last video has 2 padded frames), cached AST tokens (fp16)."""
    g = torch.Generator().manual_seed(seed)
    res, f = cfg.clip.image_resolution, cfg.fusion.max_frames
    mask = torch.ones(n, f, dtype=torch.long)
    mask[-1, f - 2:] = 0
    pixels = torch.randint(0, 256, (n, f, 3, res, res), generator=g, dtype=torch.uint8)
    frames = loader_frames(pixels, mask)
    if not loader and frames.dtype == torch.uint8:
        frames = video_io.normalize_frames(frames, mask, torch.device("cpu"))
    return {"frames": frames.to(device), "frame_mask": mask.to(device),
            "audio_tokens": torch.randn(n, cfg.ast.num_output_tokens, cfg.ast.embed_dim,
                                        generator=g).half().to(device)}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable, device: torch.device, repeats: int = 1) -> tuple[float, object]:
    """Mean seconds of ``repeats`` calls (device work included) and the last result."""
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        out = fn()
    sync(device)
    return (time.perf_counter() - start) / repeats, out


def peak_bytes(fn: Callable, device: torch.device) -> tuple[int, object]:
    with PeakMeter(device) as meter:
        out = fn()
    return meter.peak, out


@contextlib.contextmanager
def simulated_world(world: int):
    """Gathers that return ``world`` copies of the local tensor (backward: the sum over copies),
    so one device computes what a rank of ``world`` computes."""
    saved = (loss_module._distributed_world_size, loss_module._gather_into, loss_module._reduce_scatter_into)

    def gather(out, x, *args, **kwargs):
        out.copy_(x.repeat(world, *([1] * (x.dim() - 1))))

    def reduce_scatter(out, grad, *args, **kwargs):
        out.copy_(grad.view(world, *out.shape).sum(0))

    loss_module._distributed_world_size = lambda: world
    loss_module._gather_into, loss_module._reduce_scatter_into = gather, reduce_scatter
    try:
        yield
    finally:
        loss_module._distributed_world_size, loss_module._gather_into, loss_module._reduce_scatter_into = saved


# ----- rows -------------------------------------------------------------------------------
def cuda_test_files() -> list[str]:
    """Test files that mark tests ``cuda`` (collecting only these keeps the row fast)."""
    tests = os.path.join(ROOT, "tests")
    files = []
    for name in sorted(os.listdir(tests)):
        if name.startswith("test_") and name.endswith(".py"):
            with open(os.path.join(tests, name)) as f:
                if "mark.cuda" in f.read():
                    files.append(os.path.join(tests, name))
    return files


def cuda_tests(device: torch.device) -> dict:
    """``pytest -m cuda`` over the files that have such tests, in a subprocess: its summary."""
    cmd = [sys.executable, "-m", "pytest", *cuda_test_files(), "-m", "cuda", "-q", "-p", "no:cacheprovider",
           "-o", "addopts=", "-rfE"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    return pytest_summary(result.returncode, result.stdout, result.stderr, device)


def pytest_summary(returncode: int, stdout: str, stderr: str, device: torch.device) -> dict:
    """pytest's last line -> counts; OK when nothing failed and, on a GPU, something passed
    and nothing skipped."""
    tail = stdout.strip().splitlines()[-1] if stdout.strip() else stderr[-300:]
    counts = {kind: int(n) for n, kind in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", tail)}
    ok = returncode in (0, 5) and not counts.get("failed") and not counts.get("error") and not counts.get("errors")
    if device.type == "cuda":
        ok = ok and counts.get("passed", 0) > 0 and not counts.get("skipped")
    return {"ok": ok, "counts": counts, "summary": tail}


@torch.no_grad()
def encode(model: AVIGATE, sizes: CheckSizes, n: int, precision: str, device: torch.device,
           batch: int = 64) -> tuple[TextFeatures, VideoFeatures]:
    """n texts and n videos encoded as evaluation does (autocast encoders, fp32 features)."""
    model.eval()
    texts, videos = [], []
    for start in range(0, n, batch):
        m = min(batch, n - start)
        ids, mask = text_batch(model.cfg, m, sizes.text_len, device, seed=start)
        v = video_batch(model.cfg, m, device, seed=start)
        with util.autocast(device, precision):
            texts.append(model.encode_text(ids, mask).to(dtype=torch.float32))
            videos.append(model.encode_video(v["frames"], v["frame_mask"], v["audio_tokens"]).to(dtype=torch.float32))
    return TextFeatures.cat(texts), VideoFeatures.cat(videos)


def _ties(scores: torch.Tensor) -> int:
    ordered = scores.sort(dim=1).values
    return int((ordered[:, 1:] == ordered[:, :-1]).sum())


def precision_agreement(sizes: CheckSizes, device: torch.device) -> list[dict]:
    """bf16 vs fp32 evaluation (encoders, fusion; scores always fp32) of the same random model."""
    rows = []
    for text_guided in (False, True):
        model = build_model(sizes, text_guided, device)
        with torch.no_grad():
            model.logit_scale.fill_(float(np.log(100.0)))  # a trained model's s: the largest scores
        scores = {}
        for precision in ("fp32", "bf16"):
            text, video = encode(model, sizes, sizes.agreement_items, precision, device)
            with torch.no_grad(), util.autocast(device, precision):
                scores[precision] = model.score(text, video).float().cpu()
        diff = (scores["bf16"] - scores["fp32"]).abs().max().item()
        top1 = (scores["bf16"].argmax(1) == scores["fp32"].argmax(1)).float().mean().item()
        gt = np.arange(sizes.agreement_items)
        r1 = {p: retrieval_metrics(s.numpy(), gt)["t2v_R@1"] for p, s in scores.items()}
        rows.append({"model": "text-guided" if text_guided else "agnostic", "max_abs_diff_per_s": diff / 100.0,
                     "ties_fp32": _ties(scores["fp32"]), "ties_bf16": _ties(scores["bf16"]),
                     "top1_agreement": top1, "t2v_R@1_fp32": r1["fp32"], "t2v_R@1_bf16": r1["bf16"]})
        del model
    return rows


def train_step_row(sizes: CheckSizes, text_guided: bool, precision: str, chunk: int, device: torch.device) -> dict:
    """Seconds per optimizer step and peak bytes of a step at the per-GPU load."""
    model = build_model(sizes, text_guided, device)
    objective = ContrastiveObjective(model, ObjectiveConfig(pairs_per_chunk=chunk))
    optimizer = build_optimizer(model, OptimConfig())
    trainer = training.Trainer(objective, optimizer, build_scheduler(optimizer, 100, 0.1),
                               torch.amp.GradScaler(device.type, enabled=precision == "fp16"),
                               util.DistInfo(device=device), precision)
    ids, mask = text_batch(model.cfg, sizes.local_batch, sizes.text_len, device, seed=1)
    batch = {"text_ids": ids, "text_mask": mask, **video_batch(model.cfg, sizes.local_batch, device, seed=1, loader=True)}
    row = {"model": "text-guided" if text_guided else "agnostic", "precision": precision,
           "pairs": sizes.local_batch * sizes.local_batch * sizes.world if text_guided else 0,
           "pairs_per_chunk": chunk}
    try:
        with simulated_world(sizes.world):
            if device.type == "cuda":
                training.train_step(trainer, [batch])  # warm-up: optimizer state, kernels, allocator
                torch.cuda.reset_peak_memory_stats(device)
                seconds, _ = timed(lambda: training.train_step(trainer, [batch]), device, sizes.steps)
                row["peak_bytes"] = torch.cuda.max_memory_allocated(device)
            else:  # the CPU's allocation count (tools/pair_memory.PeakMeter) doubles as the warm-up
                row["peak_bytes"], _ = peak_bytes(lambda: training.train_step(trainer, [batch]), device)
                seconds, _ = timed(lambda: training.train_step(trainer, [batch]), device, sizes.steps)
        row["seconds"] = seconds
    except torch.OutOfMemoryError as err:
        row["error"] = f"out of memory: {str(err).splitlines()[0][:160]}"
    del trainer, objective, model, optimizer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def evaluation_rows(sizes: CheckSizes, device: torch.device) -> list[dict]:
    """Encoding and scoring times of an eval_items x eval_items split."""
    n, rows = sizes.eval_items, []
    for text_guided in (False, True):
        model = build_model(sizes, text_guided, device).eval()
        label = "text-guided" if text_guided else "agnostic"
        encode_s, (text, video) = timed(lambda: encode(model, sizes, n, "bf16", device), device)
        rows.append({"what": f"encode {n} texts + {n} videos (bf16, cached AST tokens)", "model": label,
                     "seconds": encode_s})
        with torch.no_grad(), util.autocast(device, "bf16"):
            if not text_guided:
                s, _ = timed(lambda: model.score(text, video), device)
                rows.append({"what": f"score {n} x {n}", "model": label, "seconds": s, "pairs_fused": 0})
                continue
            s, _ = timed(lambda: model.agnostic_scores(text, video), device)
            rows.append({"what": f"stage 1 (agnostic view) {n} x {n}", "model": label, "seconds": s})
            s, _ = timed(lambda: model.score(text, video), device)
            rows.append({"what": f"full text-guided {n} x {n}", "model": label, "seconds": s, "pairs_fused": n * n})

            def rerank():
                lists = shortlists(model.agnostic_scores(text, video).scores.cpu(), sizes.rerank_topk)
                score_pair_list(model, text, video, lists.pair_text, lists.pair_video)
                return lists
            s, lists = timed(rerank, device)
            rows.append({"what": f"--rerank_topk {sizes.rerank_topk} (stage 1 + 2)", "model": label, "seconds": s,
                         "pairs_fused": int(lists.pair_text.shape[0])})
        del model
    return rows


@torch.no_grad()
def ast_rows(sizes: CheckSizes, device: torch.device) -> list[dict]:
    """Clips/s of the frozen AST trunk on fbanks vs moving cached fp16 tokens to the device."""
    cfg = ast_config(sizes)
    ast = AST(cfg).to(device).eval()
    fbank = torch.randn(sizes.ast_batch, cfg.target_frames, cfg.num_mel_bins, device=device)
    rows = []
    for precision in ("fp32", "bf16"):
        with util.autocast(device, precision):
            ast.tokens(fbank)
            s, _ = timed(lambda: ast.tokens(fbank), device, 2)
        rows.append({"what": f"AST trunk ({cfg.embed_dim}x{cfg.depth}) on fbanks, {precision}",
                     "clips_per_s": sizes.ast_batch / s})
    host = torch.randn(sizes.ast_batch, cfg.num_output_tokens, cfg.embed_dim).half()
    if device.type == "cuda":
        host = host.pin_memory()
    s, _ = timed(lambda: host.to(device, non_blocking=True), device, 5)
    rows.append({"what": "cached AST tokens (fp16) host -> device", "clips_per_s": sizes.ast_batch / s})
    return rows


# ----- the table --------------------------------------------------------------------------
def _gib(n) -> str:
    return f"{n / GIB:.2f} GiB" if n is not None else "-"


def table(results: dict) -> str:
    lines = [f"GPU check: {results['device']}, torch {results['torch']}, {results['seconds']:.0f} s"
             + ("  [tiny sizes: the numbers only show that every row runs]" if results["tiny"] else ""), "",
             "| check | setting | result |", "|---|---|---|"]
    t = results["cuda_tests"]
    lines.append(f"| tests marked cuda | pytest -m cuda | {'OK' if t['ok'] else 'FAILED'}: {t['summary']} |")
    for r in results["precision"]:
        lines.append(f"| bf16 vs fp32 evaluation | {r['model']}, random weights, s = 100 | max abs diff "
                     f"{r['max_abs_diff_per_s']:.4f} s; ties fp32 {r['ties_fp32']} / bf16 {r['ties_bf16']}; "
                     f"top-1 agreement {100 * r['top1_agreement']:.1f}%; R@1 {r['t2v_R@1_fp32']:.1f} / "
                     f"{r['t2v_R@1_bf16']:.1f} |")
    for r in results["train"]:
        pairs = f", {r['pairs']} pairs, chunk {r['pairs_per_chunk'] or 'all'}" if r["pairs"] else ""
        result = r.get("error") or f"{1000 * r['seconds']:.0f} ms/step, peak {_gib(r['peak_bytes'])}"
        lines.append(f"| training step | {r['model']}, {r['precision']}{pairs} | {result} |")
    for r in results["evaluation"]:
        fused = f", {r['pairs_fused']} pairs fused" if r.get("pairs_fused") else ""
        lines.append(f"| evaluation | {r['model']}: {r['what']} | {r['seconds']:.2f} s{fused} |")
    for r in results["ast"]:
        lines.append(f"| audio | {r['what']} | {r['clips_per_s']:.0f} clips/s |")
    return "\n".join(lines)


def run(sizes: CheckSizes, device: torch.device, with_tests: bool = True) -> dict:
    start = time.perf_counter()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")
    results = {"device": f"{device} ({name})", "torch": torch.__version__, "tiny": sizes.tiny}
    results["cuda_tests"] = cuda_tests(device) if with_tests else {"ok": True, "counts": {}, "summary": "not run"}
    util.setup_precision(device, "bf16", tf32=True)
    results["precision"] = precision_agreement(sizes, device)
    results["train"] = [train_step_row(sizes, guided, precision, chunk, device)
                        for guided, precision, chunk in ((False, "bf16", 0), (False, "fp32", 0),
                                                         (True, "bf16", 0), (True, "bf16", sizes.train_chunk),
                                                         (True, "fp32", sizes.train_chunk))]
    results["evaluation"] = evaluation_rows(sizes, device)
    results["ast"] = ast_rows(sizes, device)
    results["seconds"] = time.perf_counter() - start
    return results


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (the check) or cpu (with --tiny: CI)")
    p.add_argument("--tiny", action="store_true", help="test sizes: every row in seconds on a CPU")
    p.add_argument("--no_tests", action="store_true", help="skip the pytest -m cuda row")
    p.add_argument("--json", default=None, help="also write every number here")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here; on a CPU run `--device cpu --tiny`")
    sizes = TINY if args.tiny else CheckSizes()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        results = run(sizes, device, with_tests=not args.no_tests)
    print(table(results))
    if args.json:
        write_json(args.json, results, indent=1)
    return results


if __name__ == "__main__":
    main()
