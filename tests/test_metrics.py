"""Retrieval metrics on hand-worked matrices, against brute-force references (the per-caption
convention and an independent re-implementation of the released CLIP4Clip/AVIGATE formulas),
and DSL."""
import math

import numpy as np
import pytest
import torch

import metrics
from metrics import dual_softmax, metrics_report, retrieval_metrics

CONVENTIONS = ("released", "per_caption")


def _expected(t2v_ranks, v2t_ranks, t2v_median=None):
    """Metric dict computed by hand-readable formulas from 1-based rank lists; ``t2v_median``
    overrides the t2v median (the released lower median)."""
    out = {}
    for prefix, ranks in (("t2v", t2v_ranks), ("v2t", v2t_ranks)):
        ranks = np.asarray(ranks, dtype=float)
        for k in (1, 5, 10):
            out[f"{prefix}_R@{k}"] = 100.0 * np.mean(ranks <= k)
        out[f"{prefix}_MdR"] = float(np.median(ranks))
        out[f"{prefix}_MnR"] = float(np.mean(ranks))
    if t2v_median is not None:
        out["t2v_MdR"] = float(t2v_median)
    out["RSum"] = sum(out[f"{p}_R@{k}"] for p in ("t2v", "v2t") for k in (1, 5, 10))
    return out


def _assert_metrics(got, want):
    assert set(got) == set(want)
    for key in want:
        assert got[key] == pytest.approx(want[key]), key


def _dsl_reference(sim, index, temperature, convention):
    """DSL metrics written out: t2v ranks on the softmax over texts (dim 0), v2t on the softmax
    over videos (dim 1)."""
    t2v = retrieval_metrics(dual_softmax(sim, temperature, dim=0), index, convention=convention)
    v2t = retrieval_metrics(dual_softmax(sim, temperature, dim=1), index, convention=convention)
    out = {k: (t2v if k.startswith("t2v") else v2t)[k] for k in t2v if k != "RSum"}
    out["RSum"] = sum(v for k, v in out.items() if "R@" in k)
    return out


@pytest.mark.parametrize("convention", CONVENTIONS)
def test_identity_matrix_is_perfect(convention):
    got = retrieval_metrics(np.eye(7), np.arange(7), convention=convention)
    _assert_metrics(got, _expected([1] * 7, [1] * 7))
    assert got["RSum"] == pytest.approx(600.0)


@pytest.mark.parametrize("convention", CONVENTIONS)
def test_hand_worked_ranks_without_ties(convention):
    # t2v: text0's video (0.9) is top; text1's video (0.3) is beaten by 0.8; text2's by 0.75.
    # v2t: column 0 = [0.9, 0.8, 0.1] -> text0 first; column 1 = [0.1, 0.3, 0.75] -> text1
    # behind text2 (rank 2); column 2 = [0.5, 0.2, 0.7] -> text2 first.
    sim = np.array([[0.9, 0.1, 0.5],
                    [0.8, 0.3, 0.2],
                    [0.1, 0.75, 0.7]])
    got = retrieval_metrics(sim, [0, 1, 2], convention=convention)
    _assert_metrics(got, _expected([1, 2, 2], [1, 2, 1]))
    assert got["t2v_R@1"] == pytest.approx(100 / 3)
    assert got["t2v_MnR"] == pytest.approx(5 / 3)


@pytest.mark.parametrize("convention", CONVENTIONS)
def test_ties_rank_pessimistically(convention):
    # t2v: text0's 1 ties column 1 -> rank 2; text1's 2 ties column 2 -> rank 2;
    #      text2's 1 ties both other columns -> rank 3.
    # v2t: column 0 = [1, 0, 1]: text0's 1 ties text2 -> rank 2; column 1 = [1, 2, 1]:
    #      text1 alone on top -> rank 1; column 2 = [0, 2, 1]: text1 ahead of text2 -> rank 2.
    sim = torch.tensor([[1.0, 1.0, 0.0],
                        [0.0, 2.0, 2.0],
                        [1.0, 1.0, 1.0]])
    got = retrieval_metrics(sim, torch.tensor([0, 1, 2]), convention=convention)
    _assert_metrics(got, _expected([2, 2, 3], [2, 1, 2]))
    assert got["t2v_R@1"] == 0.0
    assert got["v2t_MnR"] == pytest.approx(5 / 3)


@pytest.mark.parametrize("convention", CONVENTIONS)
def test_constant_matrix_gets_worst_ranks(convention):
    got = retrieval_metrics(np.zeros((4, 4)), np.arange(4), convention=convention)
    _assert_metrics(got, _expected([4] * 4, [4] * 4))


# Texts 0-2 describe video 0, texts 3-4 video 1.
VATEX_STYLE_SIM = np.array([[0.2, 0.8],
                            [0.9, 0.1],
                            [0.4, 0.6],
                            [0.3, 0.6],
                            [0.7, 0.6]])
VATEX_STYLE_INDEX = [0, 0, 0, 1, 1]


def test_multi_sentence_per_caption():
    # t2v: t0 0.2 < 0.8 -> 2; t1 -> 1; t2 0.4 < 0.6 -> 2; t3 0.6 > 0.3 -> 1; t4 0.6 < 0.7 -> 2.
    # v2t: column 0 = [0.2, 0.9, 0.4, 0.3, 0.7]: best caption t1 (0.9) is top -> rank 1.
    #      column 1 = [0.8, 0.1, 0.6, 0.6, 0.6]: best captions t3 = t4 = 0.6 (a tie between
    #      the video's own captions does not count); t0 (0.8) is ahead and t2 (0.6, not a
    #      caption of video 1) ties -> rank 1 + 2 = 3.
    got = retrieval_metrics(VATEX_STYLE_SIM, VATEX_STYLE_INDEX, convention="per_caption")
    _assert_metrics(got, _expected([2, 1, 2, 1, 2], [1, 3]))
    assert got["RSum"] == pytest.approx(40 + 100 + 100 + 50 + 100 + 100)


def test_multi_sentence_released():
    # t2v as per-caption ([2, 1, 2, 1, 2]; five ranks, so both medians are the middle one, 2).
    # v2t: groups scored by their best caption: G[group 0] = [max(.2, .9, .4), max(.8, .1, .6)]
    #      = [0.9, 0.8]; G[group 1] = [max(.3, .7), max(.6, .6)] = [0.7, 0.6].
    #      Video 0: own 0.9 > 0.7 -> rank 1. Video 1: own 0.6 < 0.8 -> rank 2 (one competing
    #      group, where per-caption counts two competing captions, t0 and t2).
    got = retrieval_metrics(VATEX_STYLE_SIM, VATEX_STYLE_INDEX)
    _assert_metrics(got, _expected([2, 1, 2, 1, 2], [1, 2]))
    assert got == retrieval_metrics(VATEX_STYLE_SIM, VATEX_STYLE_INDEX, convention="released")


# Two captions per video, six texts (an even count, so the two medians differ); video 2's
# caption group ties video 1's for video 2.
EVEN_SIM = np.array([[0.9, 0.85, 0.2],    # t0, video 0
                     [0.3, 0.9, 0.4],     # t1, video 0
                     [0.2, 0.6, 0.5],     # t2, video 1
                     [0.1, 0.8, 0.0],     # t3, video 1
                     [0.95, 0.3, 0.5],    # t4, video 2
                     [0.4, 0.2, 0.1]])    # t5, video 2
EVEN_INDEX = [0, 0, 1, 1, 2, 2]
# t2v: t0 0.9 top -> 1; t1 0.3 < 0.9, 0.4 -> 3; t2 0.6 top -> 1; t3 0.8 top -> 1;
#      t4 0.5 < 0.95 -> 2; t5 0.1 < 0.4, 0.2 -> 3. Sorted [1, 1, 1, 2, 3, 3].
EVEN_T2V = [1, 3, 1, 1, 2, 3]


def test_multi_sentence_even_count_released_lower_median_and_group_ties():
    # t2v MdR: lower median = 3rd of 6 sorted ranks = 1 (the average median would be 1.5).
    # v2t: G rows (groups) x columns (videos): group 0 [0.9, 0.9, 0.4], group 1 [0.2, 0.8, 0.5],
    #      group 2 [0.95, 0.3, 0.5].
    #      Video 0: own 0.9 < group 2's 0.95 -> 2. Video 1: own 0.8 < group 0's 0.9 -> 2.
    #      Video 2: own 0.5 ties group 1's 0.5 -> 2 (pessimistic), ahead of group 0's 0.4.
    got = retrieval_metrics(EVEN_SIM, EVEN_INDEX)
    _assert_metrics(got, _expected(EVEN_T2V, [2, 2, 2], t2v_median=1))
    assert got["v2t_R@1"] == 0.0 and got["v2t_MnR"] == 2.0


def test_multi_sentence_even_count_per_caption():
    # t2v MdR: average median (1 + 2) / 2 = 1.5.
    # v2t: video 0, column 0 = [.9, .3, .2, .1, .95, .4]: best own 0.9, t4 ahead -> 2.
    #      Video 1, column 1 = [.85, .9, .6, .8, .3, .2]: best own 0.8, t0 and t1 ahead -> 3.
    #      Video 2, column 2 = [.2, .4, .5, .0, .5, .1]: best own 0.5, t2 ties -> 2.
    got = retrieval_metrics(EVEN_SIM, EVEN_INDEX, convention="per_caption")
    _assert_metrics(got, _expected(EVEN_T2V, [2, 3, 2]))
    assert got["t2v_MdR"] == 1.5


@pytest.mark.parametrize("convention", CONVENTIONS)
def test_recall_cutoffs_and_median(convention):
    # Column 0 scores highest in every row and column j sits at rank j + 1, so text i whose
    # video is column r_i - 1 has t2v rank r_i. Every column is constant over texts, so each
    # video ties all 12 texts: v2t rank 12 (pessimistic).
    num = 12
    true_ranks = np.array([3, 1, 12, 5, 6, 2, 11, 10, 4, 9, 7, 8])
    sim = np.tile(-np.arange(num, dtype=float), (num, 1))
    got = retrieval_metrics(sim, true_ranks - 1, convention=convention)
    _assert_metrics(got, _expected(true_ranks, [num] * num))
    assert got["t2v_R@5"] == pytest.approx(100 * 5 / 12)
    assert got["t2v_R@10"] == pytest.approx(100 * 10 / 12)
    assert got["t2v_MdR"] == pytest.approx(6.5)  # one caption per video: the average median


def _brute_force_ranks(sim, index):
    """Reference ranks by explicit loops, ties pessimistic: t2v, v2t per caption (a video at
    its best caption among all texts) and v2t released (a video's group among all groups)."""
    num_texts, num_videos = sim.shape
    t2v = []
    for i in range(num_texts):
        positive = sim[i, index[i]]
        t2v.append(1 + sum(1 for j in range(num_videos) if j != index[i] and sim[i, j] >= positive))
    v2t_caption, v2t_group = [], []
    for j in range(num_videos):
        captions = [i for i in range(num_texts) if index[i] == j]
        best = max(sim[i, j] for i in captions)
        v2t_caption.append(1 + sum(1 for k in range(num_texts) if k not in captions and sim[k, j] >= best))
        group_best = [max(sim[i, j] for i in range(num_texts) if index[i] == g) for g in range(num_videos)]
        v2t_group.append(1 + sum(1 for g in range(num_videos) if g != j and group_best[g] >= best))
    return t2v, v2t_caption, v2t_group


@pytest.mark.parametrize("row_chunk, col_chunk", [(3, 2), (metrics.ROW_CHUNK, metrics.COL_CHUNK)])
def test_matches_brute_force_with_ties_and_multi_sentence(monkeypatch, row_chunk, col_chunk):
    monkeypatch.setattr(metrics, "ROW_CHUNK", row_chunk)
    monkeypatch.setattr(metrics, "COL_CHUNK", col_chunk)
    rng = np.random.default_rng(0)
    num_videos = 9
    index = np.concatenate([np.arange(num_videos), rng.integers(0, num_videos, size=14)])
    sim = rng.integers(0, 4, size=(len(index), num_videos)).astype(np.float32)  # many ties
    t2v, v2t_caption, v2t_group = _brute_force_ranks(sim, index)
    got = retrieval_metrics(sim, index, convention="per_caption")
    _assert_metrics(got, _expected(t2v, v2t_caption))
    _assert_metrics(retrieval_metrics(torch.from_numpy(sim), torch.from_numpy(index),
                                      convention="per_caption"), got)
    lower_median = np.sort(t2v)[(len(t2v) - 1) // 2]
    _assert_metrics(retrieval_metrics(sim, index), _expected(t2v, v2t_group, t2v_median=lower_median))


def test_single_caption_conventions_agree():
    # One caption per video (rows in any order): both conventions are the same numbers, ties
    # included.
    rng = np.random.default_rng(1)
    for num in (1, 2, 7, 20):
        index = rng.permutation(num)
        for sim in (rng.normal(size=(num, num)), rng.integers(0, 3, size=(num, num)).astype(float)):
            assert retrieval_metrics(sim, index) == retrieval_metrics(sim, index, convention="per_caption")


# ----- independent re-implementation of the released CLIP4Clip / AVIGATE formulas ---------
def _released_compute_metrics(square):
    """The released ``compute_metrics`` on a square matrix whose diagonal holds the ground
    truth: each row's entries sorted in descending order, and every position where the sorted
    value equals the diagonal value listed (a tied row appears once per tied position).
    Returns (R@1, R@5, R@10, MdR by np.median, MnR) over the listed positions (1-based)."""
    positions = []
    for row in range(square.shape[0]):
        descending = sorted(square[row], reverse=True)
        positions += [p + 1 for p, value in enumerate(descending) if value == square[row, row]]
    positions = np.array(positions, dtype=float)
    return (*(100.0 * np.mean(positions <= k) for k in (1, 5, 10)), float(np.median(positions)),
            float(positions.mean()))


def _released_reference(sim, index):
    """Released metrics as a dict with our keys. One caption per video: ``compute_metrics`` on
    the captions-by-videos matrix and its transpose. Otherwise t2v from the -inf-padded
    [Nv, max_captions, Nv] tensor (each caption's video ranked among all videos by a descending
    sort, padded slots skipped, torch's lower median) and v2t ``compute_metrics`` on the
    [Nv, Nv] matrix of each video's score for each caption group's best caption."""
    num_videos = sim.shape[1]
    groups = [np.flatnonzero(np.asarray(index) == v) for v in range(num_videos)]
    keys = ("R@1", "R@5", "R@10", "MdR", "MnR")
    if all(len(g) == 1 for g in groups):
        square = sim[[g[0] for g in groups]]
        t2v, v2t = _released_compute_metrics(square), _released_compute_metrics(square.T)
    else:
        padded = np.full((num_videos, max(len(g) for g in groups), num_videos), -np.inf)
        for v, g in enumerate(groups):
            padded[v, :len(g)] = sim[g]
        ranks = []
        for v in range(num_videos):
            for slot in range(padded.shape[1]):
                row = torch.from_numpy(padded[v, slot])
                if torch.isinf(row[v]):
                    continue
                order = torch.argsort(row, descending=True).tolist()
                ranks.append(order.index(v) + 1)
        ranks = torch.tensor(ranks)
        t2v = (*(100.0 * (ranks <= k).double().mean().item() for k in (1, 5, 10)),
               float(torch.median(ranks)), ranks.double().mean().item())
        group_best = padded.max(axis=1)           # [group, video]
        v2t = _released_compute_metrics(group_best.T)  # rows: videos, columns: groups
    out = {f"t2v_{k}": v for k, v in zip(keys, t2v)}
    out.update({f"v2t_{k}": v for k, v in zip(keys, v2t)})
    out["RSum"] = sum(out[f"{d}_R@{k}"] for d in ("t2v", "v2t") for k in (1, 5, 10))
    return out


@pytest.mark.parametrize("seed", range(6))
def test_released_convention_matches_independent_reference(seed):
    # Continuous random scores (no ties), a mild diagonal signal so ranks spread over 1..Nv,
    # 1-5 captions per video in shuffled row order.
    rng = np.random.default_rng(seed)
    num_videos = int(rng.integers(3, 25))
    per_video = rng.integers(1, 6, size=num_videos) if seed else np.ones(num_videos, dtype=int)
    index = rng.permutation(np.repeat(np.arange(num_videos), per_video))
    sim = rng.normal(size=(len(index), num_videos))
    sim[np.arange(len(index)), index] += 1.0
    _assert_metrics(retrieval_metrics(sim, index), _released_reference(sim, index))


def test_released_code_tie_handling_differs_only_on_ties():
    # EVEN_SIM has one tie (video 2's group vs video 1's): the released compute_metrics lists
    # video 2 twice (positions 1 and 2), giving v2t R@1 = 1/4 and MnR = (2 + 2 + 1 + 2) / 4;
    # our deterministic rule ranks it 2 once (R@1 = 0, MnR = 2). t2v has no ties and agrees.
    reference = _released_reference(EVEN_SIM, EVEN_INDEX)
    ours = retrieval_metrics(EVEN_SIM, EVEN_INDEX)
    assert reference["v2t_R@1"] == 25.0 and reference["v2t_MnR"] == 1.75
    assert ours["v2t_R@1"] == 0.0 and ours["v2t_MnR"] == 2.0
    for key in ("t2v_R@1", "t2v_R@5", "t2v_R@10", "t2v_MdR", "t2v_MnR"):
        assert ours[key] == pytest.approx(reference[key]), key


def test_unknown_convention_raises():
    with pytest.raises(ValueError, match="convention"):
        retrieval_metrics(np.eye(2), [0, 1], convention="average")


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
    both = metrics_report(sim, [0, 1, 2], dsl=True, temperature=0.1)
    assert set(both) == {"metric_convention", "per_caption", "plain", "dsl"}
    _assert_metrics(both["plain"], retrieval_metrics(sim, [0, 1, 2]))
    assert both["plain"]["t2v_R@1"] == pytest.approx(100 / 3)
    assert both["dsl"]["t2v_R@1"] == pytest.approx(100.0)
    assert set(both["dsl"]) == set(both["plain"])


def test_dsl_rejects_non_positive_temperature():
    with pytest.raises(ValueError, match="temperature"):
        dual_softmax(np.eye(2), 0.0)


@pytest.mark.parametrize("dsl", [False, True])
def test_metrics_report_carries_both_conventions(dsl):
    # metrics.json layout: the released convention under "plain"/"dsl", per-caption beside it.
    report = metrics_report(EVEN_SIM, EVEN_INDEX, dsl=dsl, temperature=0.5)
    names = {"plain", "dsl"} if dsl else {"plain"}
    assert set(report) == {"metric_convention", "per_caption"} | names
    assert report["metric_convention"] == "released"
    assert set(report["per_caption"]) == names
    for convention, entries in (("released", report), ("per_caption", report["per_caption"])):
        _assert_metrics(entries["plain"], retrieval_metrics(EVEN_SIM, EVEN_INDEX, convention=convention))
        if dsl:
            _assert_metrics(entries["dsl"], _dsl_reference(EVEN_SIM, EVEN_INDEX, 0.5, convention))
    assert report["plain"]["t2v_MdR"] == 1.0 and report["per_caption"]["plain"]["t2v_MdR"] == 1.5


def test_dsl_metrics_rank_each_direction_on_its_softmax():
    # Multi-sentence: the released v2t groups are scored on the dim=1 DSL matrix, t2v ranks on
    # the dim=0 one.
    rng = np.random.default_rng(3)
    index = rng.permutation(np.repeat(np.arange(6), 3))
    sim = rng.normal(size=(len(index), 6))
    report = metrics_report(sim, index, dsl=True, temperature=0.3)
    for convention, entries in (("released", report), ("per_caption", report["per_caption"])):
        _assert_metrics(entries["dsl"], _dsl_reference(sim, index, 0.3, convention))
