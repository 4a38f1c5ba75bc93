"""Distributed re-ranking cannot disagree with itself: shortlists come from rank 0 alone and are
broadcast, so two gloo ranks whose stage-1 scores differ (a test hook perturbs one rank's) still
fuse exactly the single-process pair list and assign every score to its pair; a rank whose fused
shard is not its share of rank 0's list fails loudly. The same spawn checks the multi-node
output-folder marker (util.check_shared_output_dir): a shared folder passes, a folder each rank
sees differently stops every rank with an error naming the blind rank."""
import os
from datetime import timedelta
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import evaluation
import util
from modules.modeling import AVIGATE, AVIGATEConfig
from util import DistInfo
from tests.localhost import free_port

pytestmark = pytest.mark.distributed

WORLD_SIZE = 2
NT, NV, TOPK = 6, 5, 2
GUIDED = {"text_gate": True, "text_query": True, "query_gate": True, "text_init": "normal"}


def _inputs():
    """(model, texts, videos, split) of a tiny text-guided model, identical in every process."""
    torch.manual_seed(0)
    model = AVIGATE(AVIGATEConfig.tiny(**GUIDED)).eval()
    cfg, g = model.cfg, torch.Generator().manual_seed(1)
    ids = torch.randint(1, 40000, (NT, 8), generator=g)
    ids[:, 0], ids[:, 7] = 49406, 49407
    res = cfg.clip.image_resolution
    frames = torch.randn(NV, cfg.fusion.max_frames, 3, res, res, generator=g)
    mask = torch.ones(NV, cfg.fusion.max_frames, dtype=torch.long)
    mask[1, 2:] = 0
    tokens = torch.randn(NV, cfg.ast.num_output_tokens, cfg.ast.embed_dim, generator=g)
    with torch.no_grad():
        texts, videos = model.encode_text(ids, torch.ones_like(ids)), model.encode_video(frames, mask, tokens)
    caption_video = np.array([0, 1, 2, 3, 4, 0])
    split = SimpleNamespace(video_ids=[f"video{v}" for v in range(NV)], caption_video=caption_video,
                            captions=[f"caption {t}" for t in range(NT)])
    return model, texts, videos, split


def _result(scored) -> dict:
    r = scored.reranked
    return {"pair_text": r.pair_text, "pair_video": r.pair_video, "pair_scores": r.pair_scores, "t2v": r.t2v}


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE, timeout=timedelta(seconds=60))
    try:
        info = DistInfo(rank, WORLD_SIZE)
        shared = os.path.join(out_dir, "shared")
        os.makedirs(shared, exist_ok=True)
        util.check_shared_output_dir(shared, info)  # one folder for all: passes
        own = os.path.join(out_dir, f"rank{rank}")  # what a node without the shared disk sees
        os.makedirs(own, exist_ok=True)
        try:
            util.check_shared_output_dir(own, info)
            outcome = "passed"
        except RuntimeError as err:
            outcome = str(err)
        with open(os.path.join(out_dir, f"marker_rank{rank}.txt"), "w") as f:
            f.write(outcome)
        model, texts, videos, split = _inputs()
        for perturbed_rank in range(WORLD_SIZE):
            evaluation.STAGE1_TEST_HOOK = lambda s, r: -s if r == perturbed_rank else s
            scored = evaluation.rerank_split(model, texts, videos, split, DistInfo(rank, WORLD_SIZE), TOPK)
            if rank == 0:
                np.savez(os.path.join(out_dir, f"perturbed{perturbed_rank}.npz"), **_result(scored))
    finally:
        dist.destroy_process_group()


def _single_process(perturb: bool) -> dict:
    model, texts, videos, split = _inputs()
    evaluation.STAGE1_TEST_HOOK = (lambda s, r: -s) if perturb else None
    try:
        return _result(evaluation.rerank_split(model, texts, videos, split, DistInfo(), TOPK))
    finally:
        evaluation.STAGE1_TEST_HOOK = None


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory):
    """One spawn of two gloo ranks re-ranking twice: with rank 1's, then rank 0's stage 1 perturbed."""
    out = tmp_path_factory.mktemp("rerank_ranks")
    mp.spawn(_worker, args=(free_port(), str(out)), nprocs=WORLD_SIZE)
    return out


@pytest.mark.parametrize("perturbed_rank", [1, 0])
def test_ranks_with_perturbed_stage1_fuse_rank0s_pairs(perturbed_rank, rank_results):
    got = dict(np.load(rank_results / f"perturbed{perturbed_rank}.npz"))
    # Rank 0's stage 1 decides: perturbing rank 1 changes nothing, perturbing rank 0 changes the
    # shortlists for every rank alike.
    want = _single_process(perturb=perturbed_rank == 0)
    other = _single_process(perturb=perturbed_rank != 0)
    assert not np.array_equal(want["pair_text"] * NV + want["pair_video"],
                              other["pair_text"] * NV + other["pair_video"]), "the perturbation changes nothing"
    for key in ("pair_text", "pair_video"):
        np.testing.assert_array_equal(got[key], want[key])
    np.testing.assert_allclose(got["pair_scores"], want["pair_scores"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(got["t2v"], want["t2v"], rtol=0, atol=1e-5)


def test_a_rank_that_fused_other_pairs_fails_loudly():
    pair_text, pair_video = torch.tensor([0, 1, 2, 0, 3]), torch.tensor([0, 0, 1, 2, 2])
    shards = [evaluation.pair_list_digest(pair_text[:2], pair_video[:2]),
              evaluation.pair_list_digest(pair_text[2:], pair_video[2:])]
    evaluation.check_pair_shards(shards, pair_text, pair_video, WORLD_SIZE)
    swapped = [shards[0], evaluation.pair_list_digest(pair_text[2:].flip(0), pair_video[2:].flip(0))]
    with pytest.raises(RuntimeError, match="rank 1 fused 3 pairs"):
        evaluation.check_pair_shards(swapped, pair_text, pair_video, WORLD_SIZE)
    short = [shards[0], evaluation.pair_list_digest(pair_text[2:4], pair_video[2:4])]
    with pytest.raises(RuntimeError, match="rank 1 fused 2 pairs .* has 3"):
        evaluation.check_pair_shards(short, pair_text, pair_video, WORLD_SIZE)


def test_output_dir_not_shared_by_every_rank_stops_all_ranks(rank_results):
    for rank in range(WORLD_SIZE):
        outcome = (rank_results / f"marker_rank{rank}.txt").read_text()
        assert "is not shared by every rank: rank 1 on" in outcome, outcome
    assert not (rank_results / "shared" / util.SHARED_DIR_MARKER).exists()  # removed after the check
