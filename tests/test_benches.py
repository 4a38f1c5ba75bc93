"""tools/pair_memory.py and tools/gpu_check.py run in CI at tiny sizes on the CPU, so they
cannot rot; the pair-memory measurement's method is checked against what chunking must do."""
from __future__ import annotations

import json
import math

import torch

from tools import gpu_check, pair_memory, precision_agreement


def test_pair_memory_tiny_measures_what_chunking_removes():
    results = pair_memory.run(pair_memory.TINY, ["fp32"], torch.device("cpu"))["fp32"]
    full, chunked = results["all_at_once"], results["chunked_per_pair"]
    assert full["slope"] > 0 and full["uncertainty"] < full["slope"]
    # Checkpointed chunks keep only the scores of every pair alive: measured 86 vs 1.6 KiB per
    # pair at these sizes; at least a 4x reduction is required.
    assert chunked["slope"] < full["slope"] / 4
    assert results["chunked_saved"]["slope"] < results["all_at_once_saved"]["slope"] / 4
    for m in results["measurements"]:
        assert m["peak_bytes"] > 0 and m["saved_bytes"] > 0
    # Scoring keeps no activations for backward: less per pair than training all at once.
    assert 0 < results["eval"]["slope"] < full["slope"]
    pairs = 2 * max(m["pairs"] for m in results["measurements"])
    assert pair_memory.rank_memory(results, pairs, 0) > pair_memory.rank_memory(results, pairs, pair_memory.TINY.chunk)


def test_fit_recovers_a_line_and_its_spread():
    exact = pair_memory.fit([1, 2, 4], [10, 12, 16])
    assert math.isclose(exact["slope"], 2.0) and math.isclose(exact["intercept"], 8.0) and exact["uncertainty"] < 1e-9
    noisy = pair_memory.fit([1, 2, 4], [10, 13, 16])
    assert 0 < noisy["uncertainty"] < 1.5


def test_gpu_check_finds_and_reads_the_cuda_tests():
    assert any(path.endswith("test_cuda.py") for path in gpu_check.cuda_test_files())
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    skipped = "9 skipped in 3.10s"
    assert gpu_check.pytest_summary(0, f"...\n{skipped}\n", "", cpu) == {
        "ok": True, "counts": {"skipped": 9}, "summary": skipped}
    assert not gpu_check.pytest_summary(0, skipped, "", cuda)["ok"]  # on a GPU nothing may skip
    assert gpu_check.pytest_summary(0, "9 passed in 30.2s", "", cuda)["ok"]
    assert not gpu_check.pytest_summary(1, "1 failed, 8 passed in 31.0s", "", cuda)["ok"]


def test_gpu_check_tiny_on_cpu_runs_every_row(tmp_path, capsys):
    """Every row at test sizes; the pytest row is left out (--no_tests: collecting the suite in
    a subprocess costs more than the rest), its parts are tested above."""
    out = tmp_path / "gpu_check.json"
    results = gpu_check.main(["--device", "cpu", "--tiny", "--no_tests", "--json", str(out)])
    table = capsys.readouterr().out
    assert {r["model"] for r in results["precision"]} == {"agnostic", "text-guided"}
    for r in results["precision"]:
        assert 0 <= r["max_abs_diff_per_s"] < 0.05 and 0 <= r["top1_agreement"] <= 1
    assert len(results["train"]) == 5
    for r in results["train"]:
        assert "error" not in r and r["seconds"] > 0 and r["peak_bytes"] > 0, r
    guided = [r for r in results["evaluation"] if r["model"] == "text-guided"]
    full = next(r for r in guided if r["what"].startswith("full"))
    rerank = next(r for r in guided if r["what"].startswith("--rerank_topk"))
    assert full["pairs_fused"] == gpu_check.TINY.eval_items ** 2 and 0 < rerank["pairs_fused"] < full["pairs_fused"]
    assert all(r["clips_per_s"] > 0 for r in results["ast"])
    assert table.count("\n| ") >= 1 + 2 + 5 + len(results["evaluation"]) + len(results["ast"])
    assert json.loads(out.read_text())["tiny"] is True


def test_precision_agreement_runs_and_reports_both_models(capsys):
    results = precision_agreement.main(["--steps", "2", "--pairs", "2", "--batches", "1"])
    assert [r["model"] for r in results] == ["agnostic", "text-guided"]
    for r in results:
        assert len(r["losses"]["fp32"]) == len(r["losses"]["bf16"]) == 2
        assert all(math.isfinite(x) for x in r["losses"]["fp32"] + r["losses"]["bf16"])
        assert r["max_abs_loss_diff"] < 0.1 and 0 < r["weight_drift"] < 1  # same init, same batches
        assert len(r["evaluation"]) == 4
    assert "| text-guided |" in capsys.readouterr().out
