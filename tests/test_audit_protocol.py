"""tools/audit_protocol.py: the honest protocol of a text-guided checkpoint passes (every score
unchanged under permuted order, other batch and chunk sizes and, distributed, 2 torchrun
processes); the LEAKING paired_block protocol of a model whose text terms matter fails with
exit status 1; the alignment of score matrices survives repeated captions and reordering."""
import json
import os

import numpy as np
import pytest
import torch

import main_task_retrieval
import util
from tests.datagen import make_msrvtt
from tests.fusion_weights import spread_fusion_weights
from tests.test_robustness import write_distinct_audio
from tests.test_train_e2e import tiny_flags, write_tiny_checkpoints
from tools import audit_protocol

GUIDED = ["--text_gate", "--text_query", "--query_gate"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Tiny data (5 test pairs, so blocks of 2, 3 and 7 cut the list differently; a sound per
    clip, so no two videos tie exactly) and a tiny text-guided checkpoint whose text terms and
    gates are far from their zero start."""
    root = tmp_path_factory.mktemp("audit")
    data = make_msrvtt(str(root / "data"), n_videos=7, n_test=5, seconds=1.0)
    write_distinct_audio(data)
    ckpts = write_tiny_checkpoints(str(root))
    flags = tiny_flags(data, ckpts, root / "unused", *GUIDED)
    flags = flags[2:]  # without --output_dir: the audit chooses it
    args = main_task_retrieval.build_parser().parse_args(["--do_eval", *flags, "--output_dir", str(root)])
    torch.manual_seed(0)
    model = main_task_retrieval.build_model(args, torch.device("cpu"))
    spread_fusion_weights(model.fusion, cross_attn=True)
    checkpoint = str(root / "pytorch_model.bin.0")
    util.save_model_file(model, checkpoint)
    return flags, checkpoint, root


def audit(setup, name, *extra) -> tuple[int, dict]:
    flags, checkpoint, root = setup
    audit_dir = root / name
    status = audit_protocol.main(["--audit_dir", str(audit_dir), *extra, "--", *flags, "--init_model", checkpoint])
    with open(audit_dir / audit_protocol.AUDIT_FILE) as f:
        return status, json.load(f)


def test_honest_protocol_passes(setup, capsys):
    status, summary = audit(setup, "honest")
    names = [run["name"] for run in summary["runs"]]
    assert names == ["reference", "permuted_seed1", "batch7_chunk7x5", "batch3_chunk33x64"]
    assert status == audit_protocol.EXIT_PASS and summary["passed"] and summary["protocol"] == "honest"
    assert summary["largest_score_change"] <= 1e-4 and summary["R@1_spread"]["t2v_R@1"] == 0.0
    permuted = summary["runs"][1]
    with open(setup[2] / "honest" / "permuted_seed1" / "sim_cols.json") as f:
        permuted_cols = json.load(f)
    with open(setup[2] / "honest" / "reference" / "sim_cols.json") as f:
        assert permuted_cols != json.load(f)  # the permuted run really saw another order
    assert permuted["comparison"]["max_abs_diff"] is not None
    assert "PASS" in capsys.readouterr().out


def test_paired_block_protocol_is_flagged(setup, capsys):
    status, summary = audit(setup, "leak", "--", "--eval_protocol", "paired_block")
    out = capsys.readouterr().out
    print(out)
    assert status == audit_protocol.EXIT_FAIL and not summary["passed"]
    assert summary["protocol"] == "paired_block" and summary["LEAKING"].startswith("LEAKING")
    assert summary["largest_score_change"] > 1e-2
    assert summary["largest_score_change"] > 100 * summary["tolerance"]  # fails by orders of magnitude
    assert "FAIL" in out and "LEAKING" in out


@pytest.mark.distributed
def test_honest_protocol_passes_under_torchrun(setup):
    status, summary = audit(setup, "torchrun", "--torchrun", "2", "--alt_batch_sizes", "4", "1",
                            "--alt_chunks", "1x1", "2x3")
    assert summary["runs"][-1]["name"] == "torchrun2" and summary["runs"][-1]["processes"] == 2
    assert status == audit_protocol.EXIT_PASS, summary


def test_audit_refuses_flags_it_chooses_itself(setup, capsys):
    flags, checkpoint, root = setup
    for extra in (["--output_dir", str(root)], ["--do_train"]):
        with pytest.raises(SystemExit) as err:
            audit_protocol.main(["--audit_dir", str(root / "x"), *flags, "--init_model", checkpoint, *extra])
        assert err.value.code == audit_protocol.EXIT_USAGE
    with pytest.raises(SystemExit):
        audit_protocol.main(["--audit_dir", str(root / "x"), *flags])  # no checkpoint
    assert "--init_model" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        audit_protocol.main(["--audit_dir", str(root / "x"), *flags, "--init_model", checkpoint,
                             "--alt_batch_sizes", "2", "3"])  # 2 is the evaluation's own --batch_size_val
    assert "other than" in capsys.readouterr().err


def test_failed_evaluation_has_its_own_exit_status(setup, tmp_path):
    flags, _, _ = setup
    status = audit_protocol.main(["--audit_dir", str(tmp_path), *flags, "--init_model", str(tmp_path / "missing.bin")])
    assert status == audit_protocol.EXIT_EVAL_FAILED


def outputs(rows, cols, sim):
    return audit_protocol.EvalOutputs({}, np.asarray(sim, dtype=np.float32), audit_protocol.row_keys(rows),
                                      cols, None)


def test_alignment_handles_repeated_captions_and_order():
    rows = [{"video_id": "a", "caption": "same"}, {"video_id": "b", "caption": "same"},
            {"video_id": "a", "caption": "same"}, {"video_id": "b", "caption": "other"}]
    sim = np.arange(8, dtype=np.float32).reshape(4, 2)
    sim[2] = sim[0]  # a repeated (video, caption) is the same text: the same scores
    reference = outputs(rows, ["a", "b"], sim)
    order = [3, 2, 1, 0]
    shuffled = outputs([rows[i] for i in order], ["b", "a"], sim[order][:, [1, 0]])
    result = audit_protocol.compare(reference, shuffled)
    assert result.problem is None and result.max_abs_diff == 0.0
    moved = sim[order][:, [1, 0]].copy()
    moved[0, 1] += 0.5  # text (b, other) x video a
    result = audit_protocol.compare(reference, outputs([rows[i] for i in order], ["b", "a"], moved))
    assert result.max_abs_diff == 0.5 and result.where["caption"] == "other" and result.where["video"] == "a"
    fewer = audit_protocol.compare(reference, outputs(rows[:3], ["a", "b"], sim[:3]))
    assert fewer.problem and fewer.max_abs_diff is None


def test_tolerance_scales_with_precision_and_score_magnitude():
    parse = main_task_retrieval.build_parser().parse_args
    base = ["--do_eval", "--output_dir", "o", "--data_path", "d", "--features_path", "v"]
    assert audit_protocol.compute_precision(parse(base), cuda_available=False) == "fp32"
    assert audit_protocol.compute_precision(parse(base), cuda_available=True) == "tf32"
    assert audit_protocol.compute_precision(parse([*base, "--no-tf32"]), cuda_available=True) == "fp32"
    assert audit_protocol.compute_precision(parse([*base, "--precision", "bf16"]), cuda_available=True) == "bf16"
    assert audit_protocol.scaled_tolerance("fp32", 50.0)["tolerance"] == audit_protocol.TOLERANCE_FLOOR
    bf16 = audit_protocol.scaled_tolerance("bf16", 50.0)["tolerance"]
    assert bf16 == pytest.approx(4 * 2 ** -8 * 50)  # 0.78: a few bf16 roundings of a score of 50
    assert audit_protocol.scaled_tolerance("bf16", 25.0)["tolerance"] == pytest.approx(bf16 / 2)
    assert audit_protocol.scaled_tolerance("tf32", 50.0)["tolerance"] == pytest.approx(4 * 2 ** -11 * 50)
