"""Checkpoints describe themselves and the command line cannot be misused silently (issue 12,
deliverable 4): the record beside each model file and training state, architecture flags read
from it (an explicit flag that disagrees names both values; the warm start of a text-guided
model from an AVIGATE checkpoint is the one exception), --max_steps model files, reused output
folders, LEAKING on every output of a paired_block run, the lr log line, --help."""
import argparse
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import checkpoint_record
import main_task_retrieval
from tests.datagen import make_msrvtt
from tests.test_train_e2e import ROOT, read_jsonl, tiny_flags, write_tiny_checkpoints

# The tiny run's architecture: every flag here is an architecture flag.
ARCH = ["--max_frames", "2", "--cross_num_hidden_layers", "1", "--audio_query_layers", "1",
        "--fusion_residual", "1.0", "--text_gate", "--text_query"]


def data_flags(data: dict, output_dir, *extra) -> list:
    """tiny_flags without any architecture or weight flag."""
    return ["--output_dir", str(output_dir), "--data_path", data["data_path"],
            "--features_path", data["features_path"], "--audio_path", data["audio_path"],
            "--batch_size", "2", "--batch_size_val", "2", "--max_words", "16", "--num_thread_reader", "0",
            "--device", "cpu", "--n_display", "1", "--lr", "1e-3", *extra]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny text-guided run trained with --fusion_residual 1.0 (the issue's example) and tested."""
    root = tmp_path_factory.mktemp("record")
    data = make_msrvtt(str(root / "data"), n_videos=4, n_test=2, seconds=1.0)
    ckpts = write_tiny_checkpoints(str(root))
    run = root / "train"
    main_task_retrieval.main(["--do_train", "--epochs", "1", "--expand_msrvtt_sentences", "--warmup_proportion", "0",
                              *tiny_flags(data, ckpts, run, *ARCH)])
    return {"root": root, "data": data, "ckpts": ckpts, "run": run, "model": str(run / "pytorch_model.bin.0")}


def evaluate(trained, name, *flags) -> dict:
    out = trained["root"] / name
    main_task_retrieval.main(["--do_eval", "--init_model", trained["model"],
                              *data_flags(trained["data"], out, *flags)])
    return {"dir": out, "sim": np.load(out / "sim_matrix.npy"), "args": json.load(open(out / "args.json"))}


def test_record_beside_model_file_which_stays_a_plain_state_dict(trained):
    state = torch.load(trained["model"], map_location="cpu", weights_only=True)
    assert isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values())
    record = checkpoint_record.read_record(trained["model"])
    assert record["file"] == "pytorch_model.bin.0" and record["epoch"] == 0 and record["step"] == 3
    fusion = record["model_config"]["fusion"]
    assert fusion["fusion_residual"] == 1.0 and fusion["text_gate"] and fusion["text_query"] and fusion["layers"] == 1
    assert record["flags"]["fusion_residual"] == 1.0 and record["flags"]["pretrained_clip_name"] == trained["ckpts"]["clip"]
    assert set(record["weight_sources"]) == {"clip", "ast"}
    assert len(record["weight_sources"]["clip"]["sha256"]) == 64
    assert "commit" in record["git"]
    # The training state carries the same record (inside and beside it).
    state_path = trained["run"] / "training_state.pt"
    assert checkpoint_record.read_record(str(state_path))["model_config"] == record["model_config"]
    assert torch.load(state_path, map_location="cpu", weights_only=False)["record"]["flags"] == record["flags"]


def test_eval_without_architecture_flags_reproduces_the_training_run_exactly(trained):
    out = evaluate(trained, "eval_bare")  # no architecture flag, no CLIP / AST file named
    np.testing.assert_array_equal(out["sim"], np.load(trained["run"] / "sim_matrix.npy"))
    assert out["args"]["fusion_residual"] == 1.0 and out["args"]["text_gate"] and out["args"]["text_query"]
    assert out["args"]["max_frames"] == 2 and out["args"]["cross_num_hidden_layers"] == 1
    assert out["args"]["pretrained_clip_name"] == trained["ckpts"]["clip"]  # the files behind the model
    log = (out["dir"] / "log.txt").read_text()
    assert "--fusion_residual 1.0" in log and "architecture from the record" in log
    # The evaluation's own record of where its weights came from names the checkpoint it read.
    with open(out["dir"] / "metrics.json") as f:
        assert json.load(f)["checkpoint"] == trained["model"]


def test_agreeing_flags_are_fine_and_a_contradicting_flag_names_both_values(trained, capsys):
    agreeing = evaluate(trained, "eval_agree", "--fusion_residual", "1.0", "--text_gate", "--max_frames", "2",
                        "--pretrained_clip_name", trained["ckpts"]["clip"], "--ast_checkpoint", trained["ckpts"]["ast"])
    np.testing.assert_array_equal(agreeing["sim"], np.load(trained["run"] / "sim_matrix.npy"))
    for flags, given, recorded in ((["--fusion_residual", "0.05"], "--fusion_residual 0.05", "--fusion_residual 1.0"),
                                   (["--query_gate"], "--query_gate given", "(no --query_gate)"),
                                   (["--cross_num_hidden_layers", "2"], "--cross_num_hidden_layers 2",
                                    "--cross_num_hidden_layers 1")):
        with pytest.raises(SystemExit):
            evaluate(trained, "eval_conflict", *flags)
        err = capsys.readouterr().err
        assert given in err and recorded in err and trained["model"] in err, err
        assert not os.path.exists(trained["root"] / "eval_conflict")  # refused before writing anything


def test_checkpoint_without_record_loads_with_flags_and_names_the_gap(trained, tmp_path):
    bare = tmp_path / "old_model.bin"
    bare.write_bytes(open(trained["model"], "rb").read())  # no record beside it
    main_task_retrieval.main(["--do_eval", "--init_model", str(bare),
                              *tiny_flags(trained["data"], trained["ckpts"], tmp_path / "with_flags", *ARCH)])
    np.testing.assert_array_equal(np.load(tmp_path / "with_flags" / "sim_matrix.npy"),
                                  np.load(trained["run"] / "sim_matrix.npy"))
    with pytest.raises(ValueError, match="has no record"):  # --text_gate/--text_query forgotten
        main_task_retrieval.main(["--do_eval", "--init_model", str(bare),
                                  *tiny_flags(trained["data"], trained["ckpts"], tmp_path / "forgot",
                                              "--fusion_residual", "1.0")])


def test_warm_start_of_a_text_guided_model_from_an_avigate_checkpoint(trained, tmp_path):
    """The documented exception: the record says text-agnostic, the flags text-guided."""
    data, ckpts = trained["data"], trained["ckpts"]
    avigate = tmp_path / "avigate"
    main_task_retrieval.main(["--do_train", "--epochs", "1", *tiny_flags(data, ckpts, avigate)])
    guided = tmp_path / "guided"
    main_task_retrieval.main(["--do_train", "--epochs", "1", "--freeze_agnostic", "--text_gate", "--query_gate",
                              "--init_model", str(avigate / "pytorch_model.bin.0"), *data_flags(data, guided)])
    log = (guided / "log.txt").read_text()
    assert "warm start of a text-guided model" in log and "created 5 text-guided parameters" in log
    record = checkpoint_record.read_record(str(guided / "pytorch_model.bin.0"))
    assert record["flags"]["text_gate"] and record["flags"]["query_gate"] and not record["flags"]["text_query"]
    assert record["flags"]["max_frames"] == 2  # the rest came from the AVIGATE record
    assert record["weight_sources"]["init_model"]["path"] == str(avigate / "pytorch_model.bin.0")
    assert "clip" in record["weight_sources"]["init_model"]["weight_sources"]
    # Not an exception for other flags, nor from a text-guided checkpoint.
    with pytest.raises(SystemExit):
        main_task_retrieval.main(["--do_eval", "--text_gate", "--gate", "hard", "--init_model",
                                  str(avigate / "pytorch_model.bin.0"), *data_flags(data, tmp_path / "x")])
    with pytest.raises(SystemExit):
        main_task_retrieval.main(["--do_eval", "--text_query", "--init_model", str(guided / "pytorch_model.bin.0"),
                                  *data_flags(data, tmp_path / "y")])


def test_max_steps_writes_an_evaluable_model_file(trained, tmp_path):
    data, ckpts = trained["data"], trained["ckpts"]
    stopped = tmp_path / "stopped"
    main_task_retrieval.main(["--do_train", "--epochs", "2", "--max_steps", "1", *tiny_flags(data, ckpts, stopped)])
    model_file = stopped / "pytorch_model.bin.step1"
    assert model_file.is_file() and checkpoint_record.read_record(str(model_file))["step"] == 1
    assert not (stopped / "metrics.json").exists()
    assert f"--init_model {model_file}" in (stopped / "log.txt").read_text()
    main_task_retrieval.main(["--do_eval", "--init_model", str(model_file), *data_flags(data, tmp_path / "ev")])
    assert (tmp_path / "ev" / "metrics.json").is_file()


def test_reused_output_dir_is_refused_resume_in_place_is_not(trained, tmp_path, capsys):
    data, ckpts = trained["data"], trained["ckpts"]
    run = tmp_path / "run"
    main_task_retrieval.main(["--do_train", "--epochs", "2", "--max_steps", "1", *tiny_flags(data, ckpts, run)])
    log_before = (run / "log.txt").read_text()
    with pytest.raises(SystemExit):
        main_task_retrieval.main(["--do_train", "--epochs", "1", *tiny_flags(data, ckpts, run)])
    err = capsys.readouterr().err
    assert "already holds a run" in err and "log.txt" in err and "--resume_model" in err
    assert (run / "log.txt").read_text() == log_before  # nothing appended
    main_task_retrieval.main(["--do_train", "--epochs", "2", "--resume_model", str(run / "training_state.pt"),
                              *tiny_flags(data, ckpts, run)])
    assert (run / "pytorch_model.bin.1").is_file() and (run / "log.txt").read_text().startswith(log_before)


def test_every_output_of_a_paired_block_run_says_leaking(trained):
    out = trained["root"] / "leak"
    main_task_retrieval.main(["--do_eval", "--init_model", trained["model"], "--eval_protocol", "paired_block",
                              *data_flags(trained["data"], out)])
    label = (out / "LEAKING").read_text().strip()
    assert label.startswith("LEAKING")
    for name in ("metrics.json", "gates.json", "args.json", "run_info.json"):
        with open(out / name) as f:
            assert json.load(f)["LEAKING"] == label, name
    assert all(r["LEAKING"] == label for r in read_jsonl(out / "train_metrics.jsonl"))
    assert "LEAKING" in (out / "log.txt").read_text()
    honest = trained["run"]
    assert not (honest / "LEAKING").exists()
    with open(honest / "gates.json") as f:
        assert "LEAKING" not in json.load(f)


def test_log_prints_base_and_per_role_lrs(trained, tmp_path):
    run = tmp_path / "lrs"
    main_task_retrieval.main(["--do_train", "--epochs", "1", "--max_steps", "1", "--warmup_proportion", "0",
                              "--query_lr_scale", "7", *tiny_flags(trained["data"], trained["ckpts"], run)])
    log = (run / "log.txt").read_text()
    assert "lr 0.001 (clip 1e-06, new 0.001, query 0.007)" in log, log
    record = read_jsonl(run / "train_metrics.jsonl")[0]
    assert record["lr"]["query/decay"] == pytest.approx(7e-3)


def test_train_ast_checkpoint_refuses_the_token_cache(trained, tmp_path, capsys):
    record = checkpoint_record.read_record(trained["model"])
    model = tmp_path / "ast_tuned.bin"
    model.write_bytes(open(trained["model"], "rb").read())
    record["flags"]["train_ast"] = True
    checkpoint_record.write_record(str(model), record)
    with pytest.raises(SystemExit):
        main_task_retrieval.main(["--do_eval", "--init_model", str(model), "--output_dir", str(tmp_path / "o"),
                                  "--data_path", "d", "--features_path", "v", "--audio_feature_cache", "c"])
    assert "--train_ast" in capsys.readouterr().err


def test_explicit_flags_tell_given_from_default():
    parser = main_task_retrieval.build_parser()
    argv = ["--output_dir", "o", "--data_path", "d", "--features_path", "v", "--gate", "soft", "--text_gate",
            "--no-tf32"]
    assert checkpoint_record.explicit_flags(parser, argv) == {"output_dir", "data_path", "features_path", "gate",
                                                              "text_gate", "tf32"}


def test_resolve_flags_rules():
    record = {"flags": {"gate": "soft", "text_gate": False, "text_query": False, "query_gate": False,
                        "text_init": "zero", "fusion_residual": 1.0}}
    args = argparse.Namespace(gate="hard", text_gate=False, text_query=False, query_gate=False, text_init="zero",
                              fusion_residual=0.05, max_frames=12)
    resolved = checkpoint_record.resolve_flags(args, set(), record, "ckpt")
    assert args.gate == "soft" and args.fusion_residual == 1.0 and args.max_frames == 12  # unrecorded: kept
    assert resolved == {"from_record": {"gate": "soft", "fusion_residual": 1.0}, "warm_start": False}
    args.text_gate, args.text_init = True, "normal"
    assert checkpoint_record.resolve_flags(args, {"text_gate", "text_init"}, record, "ckpt")["warm_start"]
    with pytest.raises(checkpoint_record.RecordError, match=r"--gate hard given.*--gate soft"):
        args.gate = "hard"
        checkpoint_record.resolve_flags(args, {"gate"}, record, "ckpt")


def test_bad_records_are_clear_errors(tmp_path):
    model = tmp_path / "m.bin"
    model.write_bytes(b"x")
    (tmp_path / "m.bin.json").write_text("{not json")
    with pytest.raises(checkpoint_record.RecordError, match="unreadable"):
        checkpoint_record.read_record(str(model))
    (tmp_path / "m.bin.json").write_text(json.dumps({"format": checkpoint_record.FORMAT, "version": 99}))
    with pytest.raises(checkpoint_record.RecordError, match="version 99"):
        checkpoint_record.read_record(str(model))
    with pytest.raises(FileNotFoundError, match="--init_model"):
        checkpoint_record.read_record(str(tmp_path / "missing.bin"))


# ----- the command line itself -------------------------------------------------------------
def _python(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-X", "importtime", os.path.join(ROOT, "main_task_retrieval.py"), *args],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)


def _imported(stderr: str) -> set[str]:
    """Module names from ``-X importtime`` lines ("import time: self | cumulative | name")."""
    return {line.rsplit("|", 1)[-1].strip() for line in stderr.splitlines() if line.startswith("import time:")}


def test_help_and_flag_errors_answer_before_torch_is_imported():
    helped = _python("--help")
    assert helped.returncode == 0 and "--alignment" in helped.stdout
    assert "torch" not in _imported(helped.stderr)
    wrong = _python("--output_dir", "o", "--data_path", "d", "--features_path", "v", "--do_train")
    assert wrong.returncode == 2 and "the model fuses audio" in wrong.stderr
    assert "torch" not in _imported(wrong.stderr)


def test_help_shows_each_default_once_and_never_none():
    text = main_task_retrieval.build_parser().format_help()
    assert "(default: None)" not in text and "(default: False)" not in text
    parser = main_task_retrieval.build_parser()
    for action in parser._actions:
        assert action.help, f"{action.option_strings} has no help"
        shown = parser._get_formatter()._expand_help(action) if action.help else ""
        assert shown.count("(default") <= 1, shown


def test_choices_match_the_modules_that_own_them():
    import gate_log
    import util
    from dataloaders import registry, video
    from modules import objective, optimization
    m = main_task_retrieval  # the architecture flags' choices: tests/test_architecture.py
    assert sorted(m.DATATYPES) == sorted(registry.DATASETS)
    assert m.DECODERS == video.DECODERS and m.DEFAULT_DECODER == video.DEFAULT_DECODER
    assert m.PRECISIONS == tuple(util.PRECISIONS)
    assert m.TRAINING_PAIRS == objective.TRAINING_PAIRS and m.OPTIMIZERS == optimization.OPTIMIZERS
    assert m.GATE_LOG_SPLITS == gate_log.GATE_LOG_SPLITS
