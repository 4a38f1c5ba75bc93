"""Scoring speed on the CPU (docs/design.md §10), checked against what the machine can do.

Measures, on this machine:
- the memory read bandwidth (best streaming reduction over a 1 GiB tensor) and the fp32
  matrix-product rate (best of a few large products);
- text-agnostic scoring over 1k / 10k / 100k cached videos (random fused features, the
  feature-major ``VideoIndex``): per-query latency one text at a time against the memory
  floor (index bytes / bandwidth), and 1,000 texts at once against the matmul rate; fp16
  storage is offered only if every score stays within 1e-3 of fp32;
- text-guided scoring at real width (D=512, F=12, Q=12, 4 layers, random weights): pairs/s
  of ``AVIGATE.score`` and its matmul FLOP rate, against two naive scorers:
  "naive": the public implementation's structure made honest: each (text block, video block)
  is fused from the raw per-video inputs (``fuse_reference`` on gathered pairs), so the K/V
  projections of the audio, the means and the gates' video terms are recomputed per pair;
  "naive+audio": additionally re-runs the audio path after the cached AST tokens (final
  LayerNorm, projection, resampler) for every text, as the public similarity function does;
- text-guided 1k texts x 1k videos at real width: full scoring (every pair fused) against
  shortlist re-ranking at K = 50 (modules/rerank.py: stage 1 agnostic view over every pair,
  stage 2 the union of each text's and each video's top-50 fused): pairs fused and seconds,
  the pair fusion timed on a sample and extrapolated (``--rerank_sample`` pairs).

Prints a markdown table and the targets. Usage:
    python -m bench.score_bench [--quick] [--threads N]
On a machine whose cores other processes also use, --threads 1 gives stable numbers: a
second thread then mostly waits at the barriers of every parallel operation.
"""
from __future__ import annotations

import argparse
import platform
import time

import torch

from modules.ast import ASTConfig
from modules.clip import CLIPConfig
from modules.fusion import FusionConfig
from modules.modeling import AVIGATE, AVIGATEConfig, TextFeatures, VideoFeatures
from modules.resampler import ResamplerConfig
from modules.rerank import score_pair_list, shortlists
from modules.similarity import VideoIndex, pair_scores, video_index

D, F, Q, LAYERS = 512, 12, 12, 4
LOGIT_SCALE = torch.tensor(4.6052)  # log(100): CLIP's trained value, the clamp
FP16_TOLERANCE = 1e-3
FP16_CHECK_QUERIES = 100
BANDWIDTH_BYTES = 1 << 30
BUILD_CHUNK = 8192  # videos per step when generating an index
TARGETS = {"latency": 1.5, "batched": 1.5, "speedup": 50.0, "flop_share": 0.40}


def best_seconds(fn, repeats: int) -> float:
    """Fastest of ``repeats`` timed runs after one warm-up (the machine is shared: noise only adds)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def memory_bandwidth(repeats: int) -> float:
    """Read bandwidth in bytes/s: best streaming reduction (sum, dot) over a 1 GiB tensor."""
    x = torch.rand(BANDWIDTH_BYTES // 4)
    seconds = min(best_seconds(lambda: x.sum(), repeats), best_seconds(lambda: torch.dot(x, x), repeats))
    return x.numel() * 4 / seconds


def matmul_rate(repeats: int) -> float:
    """fp32 matrix-product rate in FLOP/s: best over square and scoring-shaped products."""
    best = 0.0
    for m, k, n in [(2048, 2048, 2048), (4096, 512, 4096), (1000, D, 8192)]:
        a, b = torch.randn(m, k), torch.randn(k, n)
        best = max(best, 2 * m * k * n / best_seconds(lambda: a @ b, repeats))
    return best


def random_index(num_videos: int, dtype: torch.dtype, seed: int = 0) -> VideoIndex:
    """A VideoIndex of random fused videos with 1..F valid frames, built chunk by chunk."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, F + 1, (num_videos,), generator=g)
    mask = torch.arange(F)[None, :] < lengths[:, None]
    vectors = torch.empty(D, num_videos * (1 + F), dtype=dtype)
    for start in range(0, num_videos, BUILD_CHUNK):
        stop = min(start + BUILD_CHUNK, num_videos)
        rows = video_index(torch.randn(stop - start, F, D, generator=g), mask[start:stop])
        vectors[:, start * (1 + F):stop * (1 + F)] = rows.reshape(-1, D).T
    return VideoIndex(vectors, mask)


def bench_agnostic(num_videos: int, num_queries: int, bandwidth: float, repeats: int) -> dict:
    """Single-text latency and batched rate of text-agnostic scoring, fp32 and fp16 storage."""
    index = random_index(num_videos, torch.float32)
    texts = torch.randn(num_queries, D)
    one = texts[:1]
    latency = best_seconds(lambda: index.scores(one, LOGIT_SCALE, 1.0), repeats)
    index_bytes = index.vectors.numel() * index.vectors.element_size()
    batched = best_seconds(lambda: index.scores(texts, LOGIT_SCALE, 1.0), max(2, repeats // 3))
    reference = index.scores(texts, LOGIT_SCALE, 1.0)
    half = VideoIndex(index.vectors.half(), index.frame_mask)
    del index
    half_latency = best_seconds(lambda: half.scores(one, LOGIT_SCALE, 1.0), repeats)
    check = slice(0, FP16_CHECK_QUERIES)  # CPU fp16 products are slow: check a subset of texts
    half_error = (half.scores(texts[check], LOGIT_SCALE, 1.0) - reference[check]).abs().max().item()
    flops = 2 * num_queries * num_videos * (1 + F) * D
    return {"videos": num_videos, "latency": latency, "floor": index_bytes / bandwidth,
            "batched_s": batched, "queries": num_queries, "batched_rate": flops / batched,
            "half_latency": half_latency, "half_error": half_error}


def text_guided_model(**flags) -> AVIGATE:
    """Real-width fusion and resampler with random weights; the towers are small (unused here)."""
    clip = CLIPConfig(embed_dim=D, image_resolution=32, vision_layers=1, vision_width=64, vision_patch_size=8,
                      context_length=77, vocab_size=49408, transformer_width=D, transformer_heads=D // 64,
                      transformer_layers=1)
    cfg = AVIGATEConfig(clip=clip, ast=ASTConfig(depth=1), resampler=ResamplerConfig(width=D, num_queries=Q),
                        fusion=FusionConfig(width=D, layers=LAYERS, max_frames=F, **flags))
    return AVIGATE(cfg).eval()


def pair_flops(model: AVIGATE) -> int:
    """Matrix-product FLOPs of fusing one pair on the fast path (per-pair work only)."""
    cfg = model.cfg.fusion
    total = 0
    for layer, block in enumerate(model.fusion.blocks):
        cross = 4 * F * D * D + 4 * F * Q * D  # query and output projections, attention
        if layer == 0 and not cfg.injects_text:
            cross = 0  # the layer-0 cross-attention is per video
        gates = 0 if layer == 0 else len(block.gates) * D * D  # W_x mean_f x for each gate
        ffn = 2 * 2 * F * D * int(cfg.mlp_ratio * D)
        self_attn = 8 * F * D * D + 4 * F * F * D
        total += cross + gates + 2 * ffn + self_attn
    return total


def naive_scores(model: AVIGATE, text: torch.Tensor, videos: VideoFeatures, tokens: torch.Tensor,
                 text_block: int, video_block: int, audio_per_text: bool) -> torch.Tensor:
    """Public-style scoring made honest (see the module docstring); [Nt, Nv]."""
    nt, nv = text.shape[0], len(videos)
    out = torch.zeros(nt, nv)
    for t0 in range(0, nt, text_block):
        t1 = min(t0 + text_block, nt)
        for v0 in range(0, nv, video_block):
            v1 = min(v0 + video_block, nv)
            audio = model.resampled_audio(tokens[v0:v1]) if audio_per_text else videos.audio[v0:v1]
            ti = torch.arange(t0, t1).repeat_interleave(v1 - v0)
            vi = torch.arange(v1 - v0).repeat(t1 - t0)
            fused = model.fusion.fuse_reference(videos.frames[v0:v1][vi], videos.frame_mask[v0:v1][vi],
                                                audio[vi], text[ti]).fused
            scores = pair_scores(text[ti], fused, videos.frame_mask[v0:v1][vi], model.logit_scale, 1.0)
            out[t0:t1, v0:v1] = scores.view(t1 - t0, v1 - v0)
    return out


def bench_text_guided(flags: dict, num_texts: int, num_videos: int, naive_texts: int, audio_texts: int) -> dict:
    """pairs/s of the fast path and of the two naive scorers, and agreement with the naive one."""
    torch.manual_seed(0)
    model = text_guided_model(**flags)
    ast_tokens = torch.randn(num_videos, model.cfg.ast.num_output_tokens, model.cfg.ast.embed_dim)
    lengths = torch.randint(1, F + 1, (num_videos,))
    mask = torch.arange(F)[None, :] < lengths[:, None]
    with torch.no_grad():
        videos = VideoFeatures(torch.randn(num_videos, F, D) * mask[..., None], mask,
                               model.resampled_audio(ast_tokens))
        texts = TextFeatures(torch.randn(num_texts, D))
        tc, vc = model.pair_chunks(num_texts, num_videos)
        fast_s = best_seconds(lambda: model.score(texts, videos), repeats=2)
        fast = model.score(texts, videos)
        naive = naive_scores(model, texts.text[:naive_texts], videos, ast_tokens, tc, vc, audio_per_text=False)
        naive_s = best_seconds(lambda: naive_scores(model, texts.text[:naive_texts], videos, ast_tokens, tc, vc,
                                                    audio_per_text=False), repeats=1)
        audio_s = best_seconds(lambda: naive_scores(model, texts.text[:audio_texts], videos, ast_tokens, 1, vc,
                                                    audio_per_text=True), repeats=1)
    rate = num_texts * num_videos / fast_s
    return {"flags": "+".join(k for k, v in flags.items() if v), "pairs": num_texts * num_videos,
            "chunk": (tc, vc), "rate": rate, "flop_rate": rate * pair_flops(model),
            "naive_rate": naive_texts * num_videos / naive_s, "audio_rate": audio_texts * num_videos / audio_s,
            "agreement": (naive - fast[:naive_texts]).abs().max().item()}


def bench_rerank(num_texts: int, num_videos: int, k: int, sample_pairs: int) -> dict:
    """Full text-guided scoring of num_texts x num_videos vs re-ranking at ``k``, at real width.

    Random weights and features: the shortlists of a random model overlap little, so the
    union of the text and video lists is near its maximum k (Nt + Nv); a trained model's
    mutual top-k lists overlap more (fewer pairs). Pair fusion is timed on ``sample_pairs``
    pairs (full: a block of texts x all videos; re-ranking: the first pairs of the sorted
    union) and extrapolated; stage 1 and the shortlists are timed in full.
    """
    torch.manual_seed(0)
    model = text_guided_model(text_gate=True, text_query=True, query_gate=True)
    lengths = torch.randint(1, F + 1, (num_videos,))
    mask = torch.arange(F)[None, :] < lengths[:, None]
    with torch.no_grad():
        frames = torch.randn(num_videos, F, D) * mask[..., None]
        tokens = (model.cfg.ast.num_output_tokens, model.cfg.ast.embed_dim)
        audio = torch.cat([model.resampled_audio(torch.randn(min(50, num_videos - s), *tokens))
                           for s in range(0, num_videos, 50)])  # in chunks: 1,213 x 768 tokens per video
        fused = model.fusion.agnostic(frames, mask, audio)
        videos = VideoFeatures(frames, mask, audio, video_index(fused.fused, mask), fused.gates)
        texts = TextFeatures(torch.randn(num_texts, D))
        sample_texts = max(1, sample_pairs // num_videos)
        full_sample = best_seconds(lambda: model.score(texts.select(torch.arange(sample_texts)), videos), repeats=1)
        full_s = full_sample * num_texts / sample_texts
        start = time.perf_counter()
        stage1 = model.agnostic_scores(texts, videos).scores
        lists = shortlists(stage1, k)
        stage1_s = time.perf_counter() - start
        pairs = lists.pair_text.shape[0]
        n = min(sample_pairs, pairs)
        fuse_sample = best_seconds(lambda: score_pair_list(model, texts, videos, lists.pair_text[:n],
                                                           lists.pair_video[:n]), repeats=1)
    rerank_s = stage1_s + fuse_sample * pairs / n
    return {"texts": num_texts, "videos": num_videos, "k": k, "full_pairs": num_texts * num_videos,
            "full_s": full_s, "rerank_pairs": pairs, "stage1_s": stage1_s, "rerank_s": rerank_s,
            "full_rate": sample_texts * num_videos / full_sample, "rerank_rate": n / fuse_sample}


def report_rerank(r: dict) -> None:
    print(f"\n| text-guided {r['texts']:,} x {r['videos']:,} (D=512, F=12, Q=12, L=4) | pairs fused | pairs/s "
          f"| seconds (extrapolated) |")
    print("|---|---|---|---|")
    print(f"| full scoring | {r['full_pairs']:,} | {r['full_rate']:.0f} | {r['full_s']:.0f} |")
    print(f"| re-ranked, K = {r['k']} (stage 1 {r['stage1_s']:.2f} s) | {r['rerank_pairs']:,} "
          f"({r['rerank_pairs'] / r['full_pairs']:.1%}) | {r['rerank_rate']:.0f} | {r['rerank_s']:.0f} |")
    print(f"\nRe-ranking at K = {r['k']}: {r['full_s'] / r['rerank_s']:.1f}x faster than full scoring "
          f"(target >= 15x), {r['full_pairs'] / r['rerank_pairs']:.1f}x fewer pairs")


def report(machine: dict, agnostic: list[dict], guided: list[dict]) -> None:
    bw, mm = machine["bandwidth"], machine["matmul"]
    print(f"\nMachine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; read bandwidth {bw / 1e9:.1f} GB/s, "
          f"fp32 matmul {mm / 1e9:.1f} GFLOP/s\n")
    print("| text-agnostic, videos | 1 query fp32 (ms) | memory floor (ms) | ratio | 1 query fp16 (ms) "
          "| fp16 max abs err | batched queries | batched GFLOP/s | matmul / batched |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in agnostic:
        ok16 = "ok" if r["half_error"] <= FP16_TOLERANCE else "REJECTED"
        print(f"| {r['videos']:,} | {r['latency'] * 1e3:.2f} | {r['floor'] * 1e3:.2f} | "
              f"{r['latency'] / r['floor']:.2f} | {r['half_latency'] * 1e3:.2f} | {r['half_error']:.1e} ({ok16}) | "
              f"{r['queries']} | {r['batched_rate'] / 1e9:.1f} | {mm / r['batched_rate']:.2f} |")
    print("\n| text-guided (D=512, F=12, Q=12, L=4) | pairs | chunk (texts x videos) | pairs/s | GFLOP/s "
          "| FLOP share of matmul | naive pairs/s | speed-up | naive+audio pairs/s | speed-up | max abs diff |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in guided:
        print(f"| {r['flags']} | {r['pairs']} | {r['chunk'][0]} x {r['chunk'][1]} | {r['rate']:.1f} | "
              f"{r['flop_rate'] / 1e9:.1f} | {r['flop_rate'] / mm:.0%} | {r['naive_rate']:.1f} | "
              f"{r['rate'] / r['naive_rate']:.2f}x | {r['audio_rate']:.2f} | {r['rate'] / r['audio_rate']:.1f}x | "
              f"{r['agreement']:.1e} |")
    largest = agnostic[-1]
    print("\nTargets:")
    checks = [
        (f"single-query latency / memory floor at {largest['videos']:,} videos",
         largest["latency"] / largest["floor"], "<=", TARGETS["latency"]),
        (f"matmul rate / batched scoring rate at {largest['videos']:,} videos",
         mm / largest["batched_rate"], "<=", TARGETS["batched"]),
        ("text-guided speed-up vs naive", min(r["rate"] / r["naive_rate"] for r in guided), ">=", TARGETS["speedup"]),
        ("text-guided speed-up vs naive+audio", min(r["rate"] / r["audio_rate"] for r in guided), ">=",
         TARGETS["speedup"]),
        ("text-guided FLOP rate / matmul rate", min(r["flop_rate"] for r in guided) / mm, ">=",
         TARGETS["flop_share"]),
    ]
    for name, value, op, target in checks:
        met = value <= target if op == "<=" else value >= target
        print(f"- {name}: {value:.2f} (target {op} {target}) {'MET' if met else 'MISSED'}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes: a sanity run of a minute or two")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--rerank_only", action="store_true", help="only the 1k x 1k full vs re-ranked comparison")
    parser.add_argument("--rerank_sample", type=int, default=4000, help="pairs timed per fusion (extrapolated)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = 3 if args.quick else 7
    size = 200 if args.quick else 1000
    rerank = bench_rerank(size, size, 50, args.rerank_sample // (4 if args.quick else 1))
    if args.rerank_only:
        report_rerank(rerank)
        return
    machine = {"bandwidth": memory_bandwidth(repeats), "matmul": matmul_rate(repeats)}
    sizes = [1_000, 10_000] if args.quick else [1_000, 10_000, 100_000]
    queries = 200 if args.quick else 1000
    agnostic = [bench_agnostic(n, queries, machine["bandwidth"], repeats) for n in sizes]
    shape = dict(num_texts=8, num_videos=16, naive_texts=4, audio_texts=1) if args.quick else \
        dict(num_texts=32, num_videos=64, naive_texts=8, audio_texts=2)
    guided = [bench_text_guided(flags, **shape) for flags in
              (dict(text_gate=True, text_query=True, query_gate=True), dict(text_gate=True))]
    # The machine may be shared: the reference rate is the best seen before and after.
    machine["matmul"] = max(machine["matmul"], matmul_rate(repeats))
    report(machine, agnostic, guided)
    report_rerank(rerank)


if __name__ == "__main__":
    main()
