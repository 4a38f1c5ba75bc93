"""Caches and checkpoints prove what they are (docs/training.md): an AST token cache built with
another trunk than the model's is refused at start-up, naming both; a released-layout
checkpoint implies --padding_rule released and refuses a contradicting one."""
import json

import pytest
import torch

import main_task_retrieval
from modules.released_checkpoint import ReleasedCheckpointError
from preprocess.cache_audio_features import main as cache_main
from tests.datagen import make_msrvtt
from tests.test_released_checkpoint import to_released_layout
from tests.test_train_e2e import tiny_flags, write_tiny_checkpoints


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("long_runs")
    data = make_msrvtt(str(root / "data"), n_videos=4, n_test=2, seconds=1.0)
    ckpts = write_tiny_checkpoints(str(root))
    other = root / "other_ast.pth"  # same sizes, other weights
    torch.save({k: v * 0.9 if v.is_floating_point() else v for k, v in torch.load(ckpts["ast"]).items()}, other)
    caches = {}
    for name, trunk in (("own", ckpts["ast"]), ("other", str(other))):
        caches[name] = str(root / f"cache_{name}")
        cache_main(["--checkpoint", trunk, "--video_list", data["test_csv"], "--audio_dir", data["audio_path"],
                    "--cache_dir", caches[name], "--batch_size", "2", "--num_workers", "0", "--device", "cpu"])
    trained = root / "trained"
    main_task_retrieval.main(["--do_train", "--epochs", "1", "--skip_test", *tiny_flags(data, ckpts, trained)])
    return data, ckpts, caches, trained / "pytorch_model.bin.0", root


def test_cache_of_another_trunk_is_refused(setup, tmp_path):
    data, ckpts, caches, _, _ = setup
    with pytest.raises(ValueError, match=r"cache_other' was built with the AST checkpoint .*tiny_ast.pth"):
        main_task_retrieval.main(["--do_eval", *tiny_flags(data, ckpts, tmp_path / "refused"),
                                  "--audio_feature_cache", caches["other"]])
    main_task_retrieval.main(["--do_eval", *tiny_flags(data, ckpts, tmp_path / "accepted"),
                              "--audio_feature_cache", caches["own"]])
    assert (tmp_path / "accepted" / "metrics.json").is_file()


def test_cache_is_checked_against_the_checkpoints_recorded_trunk(setup, tmp_path):
    """The model's trunk comes from --init_model (its record names the file), not from a
    --ast_checkpoint given beside it."""
    data, ckpts, caches, trained, root = setup
    flags = tiny_flags(data, {**ckpts, "ast": str(root / "other_ast.pth")}, tmp_path / "refused")
    with pytest.raises(ValueError, match="was built with the AST checkpoint"):
        main_task_retrieval.main(["--do_eval", "--init_model", str(trained), *flags,
                                  "--audio_feature_cache", caches["other"]])
    without_weight_flags = [f for f in tiny_flags(data, ckpts, tmp_path / "accepted")
                            if f not in ("--pretrained_clip_name", ckpts["clip"], "--ast_checkpoint", ckpts["ast"])]
    main_task_retrieval.main(["--do_eval", "--init_model", str(trained), *without_weight_flags,
                              "--audio_feature_cache", caches["own"]])
    assert (tmp_path / "accepted" / "metrics.json").is_file()


def test_released_layout_implies_its_padding_rule(setup, tmp_path):
    data, ckpts, _, trained, _ = setup
    released = tmp_path / "released.bin"
    native = torch.load(trained, map_location="cpu", weights_only=True)
    torch.save(to_released_layout(native, torch.Generator().manual_seed(0)), released)
    with pytest.raises(ReleasedCheckpointError, match="trained with --padding_rule released, but the model uses "
                                                      "--padding_rule masked"):
        main_task_retrieval.main(["--do_eval", "--init_model", str(released), "--padding_rule", "masked",
                                  *tiny_flags(data, ckpts, tmp_path / "refused")])
    main_task_retrieval.main(["--do_eval", "--init_model", str(released), *tiny_flags(data, ckpts, tmp_path / "implied")])
    with open(tmp_path / "implied" / "args.json") as f:
        assert json.load(f)["padding_rule"] == "released"


# flags -> a word of the error; each combination would silently do nothing.
INEFFECTIVE = {
    "dsl_with_rerank": (["--dsl", "--rerank_topk", "2", "--text_gate"], "--dsl"),
    "training_pairs_agnostic": (["--training_pairs", "hardest_k"], "--training_pairs hardest_k applies"),
    "hardest_k_agnostic": (["--hardest_k", "2"], "--hardest_k 2 applies"),
    "chunk_agnostic": (["--train_pairs_per_chunk", "4"], "--train_pairs_per_chunk 4 applies"),
    "text_init_agnostic": (["--text_init", "normal"], "--text_init normal applies"),
    "hardest_k_without_its_pairs": (["--text_gate", "--hardest_k", "2"], "only with --training_pairs hardest_k"),
    "noise_rms_without_noise": (["--audio_noise_rms", "0.2"], "only with --audio_perturb noise"),
    "cache_without_audio": (["--no_audio", "--audio_feature_cache", "c"], "--audio_feature_cache would not"),
    "max_steps_without_training": (["--max_steps", "3"], "--max_steps applies to training"),
}


@pytest.mark.parametrize("case", sorted(INEFFECTIVE))
def test_flags_that_would_do_nothing_are_errors(case, tmp_path, capsys):
    flags, message = INEFFECTIVE[case]
    do = ["--do_eval"] if case == "max_steps_without_training" else ["--do_train"]
    with pytest.raises(SystemExit):
        main_task_retrieval.parse_and_check([*do, "--output_dir", str(tmp_path), "--data_path", "d",
                                             "--features_path", "v", "--audio_path", "a", *flags])
    assert message in capsys.readouterr().err
    # The same flags where they take effect (or alone) are accepted.
    main_task_retrieval.parse_and_check(["--do_train", "--output_dir", str(tmp_path), "--data_path", "d",
                                         "--features_path", "v", "--audio_path", "a", "--text_gate",
                                         "--training_pairs", "hardest_k", "--hardest_k", "2",
                                         "--train_pairs_per_chunk", "4", "--text_init", "normal",
                                         "--audio_perturb", "noise", "--audio_noise_rms", "0.2", "--max_steps", "3"])
