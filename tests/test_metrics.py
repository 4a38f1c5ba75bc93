"""Retrieval metrics on hand-worked matrices, against a brute-force reference, and DSL."""
import math

import numpy as np
import pytest
import torch

import metrics
from metrics import dual_softmax, retrieval_metrics, retrieval_metrics_with_dsl


def _expected(t2v_ranks, v2t_ranks):
    """Metric dict computed by hand-readable formulas from 1-based rank lists."""
    out = {}
    for prefix, ranks in (("t2v", t2v_ranks), ("v2t", v2t_ranks)):
        ranks = np.asarray(ranks, dtype=float)
        for k in (1, 5, 10):
            out[f"{prefix}_R@{k}"] = 100.0 * np.mean(ranks <= k)
        out[f"{prefix}_MdR"] = float(np.median(ranks))
        out[f"{prefix}_MnR"] = float(np.mean(ranks))
    out["RSum"] = sum(out[f"{p}_R@{k}"] for p in ("t2v", "v2t") for k in (1, 5, 10))
    return out


def _assert_metrics(got, want):
    assert set(got) == set(want)
    for key in want:
        assert got[key] == pytest.approx(want[key]), key


def test_identity_matrix_is_perfect():
    got = retrieval_metrics(np.eye(7), np.arange(7))
    _assert_metrics(got, _expected([1] * 7, [1] * 7))
    assert got["RSum"] == pytest.approx(600.0)


def test_hand_worked_ranks_without_ties():
    # t2v: text0's video (0.9) is top; text1's video (0.3) is beaten by 0.8; text2's by 0.75.
    # v2t: column 0 = [0.9, 0.8, 0.1] -> text0 first; column 1 = [0.1, 0.3, 0.75] -> text1
    # behind text2 (rank 2); column 2 = [0.5, 0.2, 0.7] -> text2 first.
    sim = np.array([[0.9, 0.1, 0.5],
                    [0.8, 0.3, 0.2],
                    [0.1, 0.75, 0.7]])
    got = retrieval_metrics(sim, [0, 1, 2])
    _assert_metrics(got, _expected([1, 2, 2], [1, 2, 1]))
    assert got["t2v_R@1"] == pytest.approx(100 / 3)
    assert got["t2v_MnR"] == pytest.approx(5 / 3)


def test_ties_rank_pessimistically():
    # t2v: text0's 1 ties column 1 -> rank 2; text1's 2 ties column 2 -> rank 2;
    #      text2's 1 ties both other columns -> rank 3.
    # v2t: column 0 = [1, 0, 1]: text0's 1 ties text2 -> rank 2; column 1 = [1, 2, 1]:
    #      text1 alone on top -> rank 1; column 2 = [0, 2, 1]: text1 ahead of text2 -> rank 2.
    sim = torch.tensor([[1.0, 1.0, 0.0],
                        [0.0, 2.0, 2.0],
                        [1.0, 1.0, 1.0]])
    got = retrieval_metrics(sim, torch.tensor([0, 1, 2]))
    _assert_metrics(got, _expected([2, 2, 3], [2, 1, 2]))
    assert got["t2v_R@1"] == 0.0
    assert got["v2t_MnR"] == pytest.approx(5 / 3)


def test_constant_matrix_gets_worst_ranks():
    got = retrieval_metrics(np.zeros((4, 4)), np.arange(4))
    _assert_metrics(got, _expected([4] * 4, [4] * 4))


def test_multi_sentence_vatex_style():
    # Texts 0-2 describe video 0, texts 3-4 video 1.
    # t2v: t0 0.2 < 0.8 -> 2; t1 -> 1; t2 0.4 < 0.6 -> 2; t3 0.6 > 0.3 -> 1; t4 0.6 < 0.7 -> 2.
    # v2t: column 0 = [0.2, 0.9, 0.4, 0.3, 0.7]: best caption t1 (0.9) is top -> rank 1.
    #      column 1 = [0.8, 0.1, 0.6, 0.6, 0.6]: best captions t3 = t4 = 0.6 (a tie between
    #      the video's own captions does not count); t0 (0.8) is ahead and t2 (0.6, not a
    #      caption of video 1) ties -> rank 1 + 2 = 3.
    sim = np.array([[0.2, 0.8],
                    [0.9, 0.1],
                    [0.4, 0.6],
                    [0.3, 0.6],
                    [0.7, 0.6]])
    got = retrieval_metrics(sim, [0, 0, 0, 1, 1])
    _assert_metrics(got, _expected([2, 1, 2, 1, 2], [1, 3]))
    assert got["RSum"] == pytest.approx(40 + 100 + 100 + 50 + 100 + 100)


def test_recall_cutoffs_and_median():
    # Column 0 scores highest in every row and column j sits at rank j + 1, so text i whose
    # video is column r_i - 1 has t2v rank r_i. Every column is constant over texts, so each
    # video ties all 12 texts: v2t rank 12 (pessimistic).
    num = 12
    true_ranks = np.array([3, 1, 12, 5, 6, 2, 11, 10, 4, 9, 7, 8])
    sim = np.tile(-np.arange(num, dtype=float), (num, 1))
    got = retrieval_metrics(sim, true_ranks - 1)
    _assert_metrics(got, _expected(true_ranks, [num] * num))
    assert got["t2v_R@5"] == pytest.approx(100 * 5 / 12)
    assert got["t2v_R@10"] == pytest.approx(100 * 10 / 12)
    assert got["t2v_MdR"] == pytest.approx(6.5)


def _brute_force_ranks(sim, index):
    """Reference ranks by explicit loops, ties pessimistic, v2t at the best caption."""
    num_texts, num_videos = sim.shape
    t2v = []
    for i in range(num_texts):
        positive = sim[i, index[i]]
        t2v.append(1 + sum(1 for j in range(num_videos) if j != index[i] and sim[i, j] >= positive))
    v2t = []
    for j in range(num_videos):
        captions = [i for i in range(num_texts) if index[i] == j]
        best = max(sim[i, j] for i in captions)
        v2t.append(1 + sum(1 for k in range(num_texts) if k not in captions and sim[k, j] >= best))
    return t2v, v2t


@pytest.mark.parametrize("row_chunk", [3, metrics.ROW_CHUNK])
def test_matches_brute_force_with_ties_and_multi_sentence(monkeypatch, row_chunk):
    monkeypatch.setattr(metrics, "ROW_CHUNK", row_chunk)
    rng = np.random.default_rng(0)
    num_videos = 9
    index = np.concatenate([np.arange(num_videos), rng.integers(0, num_videos, size=14)])
    sim = rng.integers(0, 4, size=(len(index), num_videos)).astype(np.float32)  # many ties
    got = retrieval_metrics(sim, index)
    _assert_metrics(got, _expected(*_brute_force_ranks(sim, index)))
    _assert_metrics(retrieval_metrics(torch.from_numpy(sim), torch.from_numpy(index)), got)


@pytest.mark.parametrize("sim, index, message", [
    (np.zeros(3), [0, 1, 2], "Nt, Nv"),
    (np.zeros((3, 3)), [0, 1], "shape"),
    (np.zeros((3, 3)), [0, 1, 3], r"\[0, 3\)"),
    (np.zeros((3, 3)), [0, -1, 2], r"\[0, 3\)"),
    (np.zeros((3, 3)), [0.0, 1.0, 2.0], "integers"),
    (np.zeros((3, 3)), [0, 0, 2], "no caption"),
    (np.array([[0.0, np.nan], [0.0, 0.0]]), [0, 1], "NaN or inf"),
    (np.array([[0.0, np.inf], [0.0, 0.0]]), [0, 1], "NaN or inf"),
])
def test_invalid_inputs_raise_clear_errors(sim, index, message):
    with pytest.raises(ValueError, match=message):
        retrieval_metrics(sim, index)


def test_huge_finite_scores_are_accepted():
    # The sum of these entries overflows; the exact elementwise check must still accept them.
    sim = np.full((3, 3), 3e38, dtype=np.float32)
    np.fill_diagonal(sim, 3.3e38)
    _assert_metrics(retrieval_metrics(sim, np.arange(3)), _expected([1] * 3, [1] * 3))


def test_dual_softmax_hand_worked():
    # dim=0: column 0 softmax over texts of [1, 0] = [e / (e + 1), 1 / (e + 1)], column 1 of
    # [0, 0] = [1/2, 1/2]; the result multiplies elementwise by sim.
    sim = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    e = math.e
    want = torch.tensor([[e / (e + 1), 0.0], [0.0, 0.0]])
    torch.testing.assert_close(dual_softmax(sim, 1.0, dim=0), want)
    # dim=1 is the same computation on the transpose.
    torch.testing.assert_close(dual_softmax(sim, 1.0, dim=1), want.t())
    # Temperature divides the softmax logits.
    sim = torch.randn(5, 4)
    torch.testing.assert_close(dual_softmax(sim, 0.5, dim=0), sim * torch.softmax(sim / 0.5, dim=0))


def test_dsl_demotes_a_hub_video():
    # Video 1 scores 0.6 for every text, beating texts 0 and 2's own videos (0.5): plain t2v
    # R@1 = 1/3. DSL's softmax over texts spreads the hub's column evenly (0.6 * 1/3 = 0.2)
    # while columns 0 and 2 concentrate on their own texts (0.5 * ~0.94 = ~0.47).
    sim = np.array([[0.5, 0.6, 0.1],
                    [0.1, 0.6, 0.2],
                    [0.2, 0.6, 0.5]])
    both = retrieval_metrics_with_dsl(sim, [0, 1, 2], temperature=0.1)
    assert set(both) == {"plain", "dsl"}
    _assert_metrics(both["plain"], retrieval_metrics(sim, [0, 1, 2]))
    assert both["plain"]["t2v_R@1"] == pytest.approx(100 / 3)
    assert both["dsl"]["t2v_R@1"] == pytest.approx(100.0)
    assert set(both["dsl"]) == set(both["plain"])


def test_dsl_rejects_non_positive_temperature():
    with pytest.raises(ValueError, match="temperature"):
        dual_softmax(np.eye(2), 0.0)
