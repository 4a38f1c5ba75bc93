"""Residual text guidance and shortlist re-ranking (docs/design.md §4a): a text-guided model warm-started
from an AVIGATE checkpoint scores every pair as that checkpoint at step 0; --freeze_agnostic
leaves the agnostic model untouched; re-ranked scores do not depend on order or batching, and
re-ranking with K = gallery size is full text-guided scoring."""
import logging
import os
from dataclasses import replace

import numpy as np
import pytest
import torch

import util
from metrics import retrieval_metrics
from modules.modeling import AVIGATE, AVIGATEConfig, TextFeatures, VideoFeatures
from modules.objective import ContrastiveObjective, ObjectiveConfig
from modules.optimization import OptimConfig, build_optimizer
from modules.rerank import ranking_matrices, score_pair_list, shortlists, top_k_with_keys
from tests.fusion_weights import spread_fusion_weights

NT, NV = 9, 7
TEXT_VARIANTS = [dict(text_gate=True), dict(text_query=True), dict(query_gate=True),
                 dict(text_gate=True, text_query=True, query_gate=True)]


def variant_id(flags):
    return "+".join(flags)


def agnostic_checkpoint(path) -> AVIGATE:
    """A text-agnostic tiny AVIGATE with gates far from their near-zero init, saved to ``path``."""
    torch.manual_seed(0)
    model = AVIGATE(AVIGATEConfig.tiny(fusion_residual=0.5))
    spread_fusion_weights(model.fusion, cross_attn=True)
    util.save_model_file(model, str(path))
    return model.eval()


def features(model: AVIGATE, nt=NT, nv=NV, seed=1):
    cfg = model.cfg
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 40000, (nt, 8), generator=g)
    ids[:, 0], ids[:, 7] = 49406, 49407
    res = cfg.clip.image_resolution
    frames = torch.randn(nv, cfg.fusion.max_frames, 3, res, res, generator=g)
    fmask = torch.ones(nv, cfg.fusion.max_frames, dtype=torch.long)
    fmask[1, 2:], fmask[3, 1:] = 0, 0
    tokens = torch.randn(nv, cfg.ast.num_output_tokens, cfg.ast.embed_dim, generator=g)
    with torch.no_grad():
        return model.encode_text(ids, torch.ones_like(ids)), model.encode_video(frames, fmask, tokens)


def warm_started(path, **flags) -> tuple[AVIGATE, list]:
    model = AVIGATE(AVIGATEConfig.tiny(fusion_residual=0.5, **flags))
    created = util.load_model_weights(model, str(path))
    return model.eval(), created


@pytest.mark.parametrize("flags", TEXT_VARIANTS, ids=variant_id)
def test_warm_start_scores_every_pair_as_the_checkpoint(tmp_path, flags, caplog):
    agnostic = agnostic_checkpoint(tmp_path / "avigate.bin")
    with caplog.at_level(logging.INFO, logger=util.LOGGER_NAME):
        guided, created = warm_started(tmp_path / "avigate.bin", **flags)
    assert created and set(created) == set(guided.text_term_names())
    assert "created" in caplog.text and created[0] in caplog.text
    texts, videos = features(agnostic)
    want = agnostic.score(texts, videos)
    g_texts, g_videos = features(guided)
    got = guided.score(g_texts, g_videos)  # every pair fused under its own text
    err = (got - want).abs().max().item()
    print(f"{variant_id(flags)}: step-0 max |text-guided - checkpoint| = {err:.1e}")
    assert err <= 1e-6
    # The agnostic view (stage 1 of re-ranking) is the checkpoint itself.
    torch.testing.assert_close(guided.agnostic_scores(g_texts, g_videos).scores, want, atol=1e-6, rtol=0)


def test_checkpoint_of_another_width_or_depth_names_the_keys(tmp_path):
    agnostic_checkpoint(tmp_path / "avigate.bin")
    cfg = AVIGATEConfig.tiny(text_gate=True)
    deeper = AVIGATE(replace(cfg, fusion=replace(cfg.fusion, layers=3)))
    with pytest.raises(ValueError, match=r"missing keys \['fusion.blocks.2"):
        util.load_model_weights(deeper, str(tmp_path / "avigate.bin"))
    longer = AVIGATE(replace(cfg, fusion=replace(cfg.fusion, max_frames=6)))
    with pytest.raises(ValueError, match=r"fusion.frame_position: file \(4, 64\) vs model \(6, 64\)"):
        util.load_model_weights(longer, str(tmp_path / "avigate.bin"))
    guided_path = tmp_path / "guided.bin"
    util.save_model_file(AVIGATE(AVIGATEConfig.tiny(query_gate=True)), str(guided_path))
    with pytest.raises(ValueError, match=r"unexpected keys \['fusion.blocks.0.gates.q"):
        util.load_model_weights(AVIGATE(AVIGATEConfig.tiny()), str(guided_path))


def _train_steps(model: AVIGATE, freeze_agnostic: bool, steps: int = 3) -> None:
    optimizer = build_optimizer(model, OptimConfig(lr=1e-2, coef_lr=1.0, freeze_agnostic=freeze_agnostic))
    objective = ContrastiveObjective(model, ObjectiveConfig())
    cfg = model.cfg
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(1, 40000, (4, 8), generator=g)
    ids[:, 0], ids[:, 7] = 49406, 49407
    res = cfg.clip.image_resolution
    frames = torch.randn(4, cfg.fusion.max_frames, 3, res, res, generator=g)
    tokens = torch.randn(4, cfg.ast.num_output_tokens, cfg.ast.embed_dim, generator=g)
    model.train()
    for _ in range(steps):
        objective(ids, torch.ones_like(ids), frames, torch.ones(4, cfg.fusion.max_frames), tokens).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        model.clamp_logit_scale_()
    model.eval()


def test_freeze_agnostic_trains_only_the_text_terms(tmp_path):
    agnostic = agnostic_checkpoint(tmp_path / "avigate.bin")
    guided, created = warm_started(tmp_path / "avigate.bin", text_gate=True, text_query=True, query_gate=True)
    before = {k: v.clone() for k, v in guided.state_dict().items()}
    _train_steps(guided, freeze_agnostic=True)
    after = guided.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and changed <= set(created), changed - set(created)
    texts, videos = features(guided)
    a_texts, a_videos = features(agnostic)
    # The agnostic view is still exactly the warm start; the text-guided scores have moved.
    torch.testing.assert_close(guided.agnostic_scores(texts, videos).scores, agnostic.score(a_texts, a_videos),
                               atol=1e-6, rtol=0)
    assert (guided.score(texts, videos) - agnostic.score(a_texts, a_videos)).abs().max() > 1e-4


def test_training_everything_moves_the_agnostic_model_too(tmp_path):
    agnostic_checkpoint(tmp_path / "avigate.bin")
    guided, created = warm_started(tmp_path / "avigate.bin", text_gate=True)
    before = {k: v.clone() for k, v in guided.state_dict().items()}
    _train_steps(guided, freeze_agnostic=False, steps=1)
    changed = {k for k, v in guided.state_dict().items() if not torch.equal(before[k], v)}
    assert set(created) <= changed and len(changed - set(created)) > 10


def test_freeze_agnostic_on_a_text_agnostic_model_is_an_error():
    with pytest.raises(ValueError, match="--freeze_agnostic"):
        build_optimizer(AVIGATE(AVIGATEConfig.tiny()), OptimConfig(freeze_agnostic=True))


# ----- re-ranking ---------------------------------------------------------------------------
def trained_guided(tmp_path) -> AVIGATE:
    """A warm-started text-guided model whose text terms moved (so re-ranking changes scores)."""
    agnostic_checkpoint(tmp_path / "avigate.bin")
    model, _ = warm_started(tmp_path / "avigate.bin", text_gate=True, text_query=True, query_gate=True)
    with torch.no_grad():
        for block in model.fusion.blocks:
            for gate in block.gates.values():
                gate.fc1_text.weight.normal_(std=0.3)
                gate.fc2.weight.normal_(std=0.5)
    return model


def rerank(model, texts, videos, k, text_keys=None, video_keys=None, pairs_per_chunk=5):
    lists = shortlists(model.agnostic_scores(texts, videos).scores, k, text_keys, video_keys)
    scores, _ = score_pair_list(model, texts, videos, lists.pair_text, lists.pair_video, pairs_per_chunk)
    return lists, scores


def test_top_k_breaks_ties_by_key_not_position():
    scores = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0]])
    keys = torch.tensor([40, 10, 30, 0, 20])
    assert top_k_with_keys(scores, 2, keys).tolist() == [[1, 4]]
    perm = torch.tensor([4, 2, 0, 3, 1])
    picked = top_k_with_keys(scores[:, perm], 2, keys[perm])
    assert perm[picked].tolist() == [[1, 4]]


def test_rerank_with_k_at_the_gallery_size_is_full_scoring(tmp_path):
    model = trained_guided(tmp_path)
    texts, videos = features(model, nt=NV, nv=NV)  # one caption per video
    full = model.score(texts, videos)
    lists, scores = rerank(model, texts, videos, k=NV)
    assert lists.pair_text.shape[0] == NV * NV
    t2v, v2t = ranking_matrices(lists, scores)
    index = np.arange(NV)
    want = retrieval_metrics(full, index)
    got_t2v, got_v2t = retrieval_metrics(t2v, index), retrieval_metrics(v2t, index)
    assert {k: v for k, v in got_t2v.items() if k.startswith("t2v")} == \
        {k: v for k, v in want.items() if k.startswith("t2v")}
    assert {k: v for k, v in got_v2t.items() if k.startswith("v2t")} == \
        {k: v for k, v in want.items() if k.startswith("v2t")}
    # Same order in every row (t2v) and column (v2t) as the full scores.
    assert torch.equal(t2v.argsort(dim=1, stable=True), full.double().argsort(dim=1, stable=True))
    assert torch.equal(v2t.argsort(dim=0, stable=True), full.double().argsort(dim=0, stable=True))
    fused = torch.zeros(NV, NV)
    fused[lists.pair_text, lists.pair_video] = scores
    torch.testing.assert_close(fused, full, atol=1e-5, rtol=0)


def test_reranked_scores_do_not_depend_on_order_or_batching(tmp_path):
    model = trained_guided(tmp_path)
    texts, videos = features(model)
    text_keys, video_keys = torch.arange(NT) * 7 % 11, torch.arange(NV) * 3 % 13  # identities
    lists, scores = rerank(model, texts, videos, k=3, text_keys=text_keys, video_keys=video_keys)
    assert lists.pair_text.shape[0] < NT * NV
    base = {(int(t), int(v)): s for t, v, s in zip(lists.pair_text, lists.pair_video, scores.tolist())}
    pt, pv = torch.randperm(NT), torch.randperm(NV)
    for chunk in (1, 4, 1000):
        other, other_scores = rerank(model, texts.select(pt), videos.select(pv), k=3,
                                     text_keys=text_keys[pt], video_keys=video_keys[pv], pairs_per_chunk=chunk)
        moved = {(int(pt[t]), int(pv[v])): s
                 for t, v, s in zip(other.pair_text, other.pair_video, other_scores.tolist())}
        assert moved.keys() == base.keys()  # the same shortlist
        assert max(abs(moved[p] - base[p]) for p in base) <= 1e-5
    # Each fused pair equals its full text-guided score.
    full = model.score(texts, videos)
    torch.testing.assert_close(scores, full[lists.pair_text, lists.pair_video], atol=1e-5, rtol=0)


def test_ranking_puts_shortlisted_videos_first_then_stage1_order():
    stage1 = torch.tensor([[5.0, 4.0, 3.0, 2.0],
                           [0.0, 1.0, 2.0, 3.0]])
    lists = shortlists(stage1, 2)
    assert lists.text_top.tolist() == [[0, 1], [3, 2]]
    guided = torch.full((2, 4), -100.0)
    guided[0, 1], guided[0, 0] = 9.0, 1.0  # text 0: video 1 beats video 0 after fusion
    guided[1, 2], guided[1, 3] = -50.0, -60.0
    for t, v in zip(lists.pair_text.tolist(), lists.pair_video.tolist()):
        guided[t, v] = guided[t, v] if guided[t, v] > -100 else -70.0
    scores = guided[lists.pair_text, lists.pair_video]
    t2v, _ = ranking_matrices(lists, scores)
    assert t2v[0].argsort(descending=True).tolist() == [1, 0, 2, 3]
    assert t2v[1].argsort(descending=True).tolist() == [2, 3, 1, 0]


def test_bad_k_is_an_error():
    with pytest.raises(ValueError, match="--rerank_topk"):
        shortlists(torch.zeros(2, 3), 0)


# ----- the two-stage recipe through the entry point ------------------------------------------
def test_two_stage_recipe_and_rerank_through_main(tmp_path):
    """AVIGATE trained, a text-guided model warm-started from it with --freeze_agnostic, then
    evaluated in full and re-ranked: K covering the gallery reproduces the full metrics, a
    small K records its cost and stage 1 is the AVIGATE checkpoint's own evaluation."""
    import json

    import main_task_retrieval
    from tests.datagen import make_vatex
    from tests.test_train_e2e import tiny_flags, write_tiny_checkpoints

    ckpts = write_tiny_checkpoints(str(tmp_path))
    data = make_vatex(str(tmp_path / "data"), n_videos=5, n_test=3, captions_per_video=2, seconds=1.0)
    common = ["--datatype", "vatex", "--fusion_residual", "0.5", "--expand_msrvtt_sentences"]
    stage_a = tmp_path / "avigate"
    main_task_retrieval.main(["--do_train", "--epochs", "1", *tiny_flags(data, ckpts, stage_a, *common)])
    guided = ["--text_gate", "--text_query", "--query_gate", *common]
    stage_b = tmp_path / "guided"
    main_task_retrieval.main(["--do_train", "--epochs", "1", "--freeze_agnostic",
                              "--init_model", str(stage_a / "pytorch_model.bin.0"),
                              *tiny_flags(data, ckpts, stage_b, *guided)])
    checkpoint = str(stage_b / "pytorch_model.bin.0")

    def evaluate(name, *extra):
        out = tmp_path / name
        main_task_retrieval.main(["--do_eval", "--init_model", checkpoint, *tiny_flags(data, ckpts, out, *guided),
                                  *extra])
        with open(out / "metrics.json") as f:
            return json.load(f)

    full = evaluate("full")
    everything = evaluate("rerank_all", "--rerank_topk", "6")
    assert everything["plain"] == full["plain"]
    assert everything["rerank"]["pairs_fused"] == everything["rerank"]["pairs_total"] == 6 * 3
    short = evaluate("rerank_1", "--rerank_topk", "1")
    assert short["rerank"]["topk"] == 1 and short["rerank"]["pairs_fused"] < 18
    with open(stage_a / "metrics.json") as f:
        avigate = json.load(f)
    assert short["stage1"]["plain"] == avigate["plain"]  # --freeze_agnostic kept the checkpoint
    assert os.path.isfile(tmp_path / "rerank_1" / "rerank_pairs.npz")
