"""Paper presets of run.sh (issue 12, deliverable 3): `bash run.sh --list-presets` lists each
with one line, and every preset's command parses and takes one training step on tiny data.

Each preset's command comes from `PRESET=<name> bash run.sh --dry-run <tiny overrides>` (the
torchrun command run.sh would execute) and runs in-process through ``main_task_retrieval.main``;
tests/test_run_scripts.py runs one preset through bash and torchrun end to end. The tiny
overrides never touch a flag a preset sets, except --batch_size of table11e (32 > the tiny
training set) and --epochs of tg-two-stage (1 either way)."""
import dataclasses
import json
import math
import os
import shlex
import subprocess

import pytest
import torch

import checkpoint_record
import main_task_retrieval
from modules.ast import AST, ASTConfig
from modules.clip import CLIP, CLIPConfig
from tests.datagen import make_msrvtt
from tests.test_train_e2e import ROOT, read_jsonl

TINY = ["--epochs", "1", "--max_steps", "1", "--batch_size", "2", "--batch_size_val", "2", "--max_frames", "2",
        "--max_words", "16", "--audio_query_layers", "1", "--device", "cpu", "--n_display", "1",
        "--num_thread_reader", "0", "--save_every_steps", "0", "--lr", "1e-3", "--warmup_proportion", "0"]
OVERRIDDEN = {"table11e-train-ast": {"batch_size"}, "table11e-frozen-ast": {"batch_size"}, "tg-two-stage": {"epochs"}}
# The released recipe in full, which every paper row (table*) runs.
RELEASED_RECIPE = "--precision fp32 --grad_clip_scope global --weight_decay_rule released --padding_rule released"


def run_sh(*args: str, env: dict = None, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["bash", os.path.join(ROOT, "run.sh"), *args], env={**os.environ, **(env or {})},
                            capture_output=True, text=True, timeout=60)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def list_presets() -> dict:
    """name -> (description, flags) from `bash run.sh --list-presets`."""
    presets = {}
    for line in run_sh("--list-presets").stdout.splitlines():
        name, rest = line.split(None, 1)
        description, flags = rest.rsplit("  [", 1)
        presets[name] = (description, flags.rstrip("]").split())
    return presets


PRESETS = list_presets()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Tiny data; a tiny CLIP whose text tower has 6 layers (the fusion copies one per block, and
    the depth presets go to 6); a stage-1 AVIGATE checkpoint for tg-two-stage."""
    root = tmp_path_factory.mktemp("presets")
    data = make_msrvtt(str(root / "data"), n_videos=4, n_test=2, seconds=1.0)
    torch.manual_seed(0)
    clip_path, ast_path = str(root / "clip.pt"), str(root / "ast.pth")
    torch.save(CLIP(dataclasses.replace(CLIPConfig.tiny(), transformer_layers=6)).state_dict(), clip_path)
    ast = {f"module.v.{k}": v for k, v in AST(ASTConfig.tiny()).state_dict().items()}
    ast["module.mlp_head.1.weight"] = torch.zeros(527, ASTConfig.tiny().embed_dim)
    torch.save(ast, ast_path)
    env = {"DATA_PATH": data["data_path"], "VIDEO_PATH": data["features_path"], "AUDIO_PATH": data["audio_path"],
           "CLIP_NAME": clip_path, "AST_CHECKPOINT": ast_path, "NUM_GPUS": "1"}
    stage1 = root / "stage1"
    main_task_retrieval.main(command(env, stage1))  # plain `bash run.sh`: AVIGATE
    env["STAGE1_CHECKPOINT"] = str(stage1 / "pytorch_model.bin.step1")
    return root, env


def command(env: dict, output_dir, preset: str = "") -> list:
    """main_task_retrieval.py's arguments in run.sh's command for ``preset`` with the tiny overrides."""
    printed = run_sh("--dry-run", *TINY, env={**env, "PRESET": preset, "OUTPUT_DIR": str(output_dir)}).stdout
    words = shlex.split(printed)
    assert words[0] == "torchrun"
    return words[words.index("main_task_retrieval.py") + 1:]


def test_list_presets_one_line_each_covering_the_tables():
    names = list(PRESETS)
    assert len(names) == len(set(names))
    for prefix in ("table4-", "table5-", "table11a-", "table11b-", "table11c-", "table11d-", "table11e-",
                   "table11f-", "tg-"):
        assert any(n.startswith(prefix) for n in names), prefix
    table4 = {"table4-clip", "table4-fusion", "table4-fusion-margin", "table4-gated", "table4-gated-fixed",
              "table4-margin"}  # the paper's six rows
    assert table4 == {n for n in names if n.startswith("table4-")}
    assert {"table5-global", "table5-local", "table5-both", "table11e-frozen-ast", "table11e-train-ast",
            "tg-gate", "tg-query", "tg-qgate", "tg-all", "tg-two-stage"} <= set(names)
    # Table 11 (a)-(c) at the paper's values (PAPER_TABLES: depths 1 2 4 6, beta 0-0.3, delta 0-0.2).
    assert {f"table11a-depth{d}" for d in (1, 2, 4, 6)} <= set(names)
    assert {f"table11b-beta{b}" for b in ("0", "0.1", "0.2", "0.3")} <= set(names)
    assert {f"table11c-delta{d}" for d in ("0", "0.05", "0.1", "0.15", "0.2")} <= set(names)
    for name, (description, flags) in PRESETS.items():
        assert description and flags, name
        assert (RELEASED_RECIPE in " ".join(flags)) == name.startswith("table"), name
        assert ("--padding_rule released" in " ".join(flags)) == name.startswith("table"), name


def test_fixed_margin_row_sets_every_margin_to_delta():
    flags = " ".join(PRESETS["table4-gated-fixed"][1])
    assert "--gate soft --margin_fixed --margin_BD 0.1" in flags


@pytest.mark.parametrize("script, expected", [
    ("run.sh", {"--batch_size": "128", "--max_frames": "12", "--max_words": "32", "--margin_BD": "0.1"}),
    ("run_vatex.sh", {"--batch_size": "128", "--max_frames": "12", "--max_words": "32", "--margin_BD": "0.05"}),
    ("run_charades.sh", {"--batch_size": "64", "--max_frames": "32", "--max_words": "64", "--margin_BD": "0.1"}),
])
def test_per_dataset_settings_follow_table7(script, expected, tmp_path):
    result = subprocess.run(["bash", os.path.join(ROOT, script), "--dry-run"], capture_output=True, text=True,
                            env={**os.environ, "OUTPUT_DIR": str(tmp_path)}, timeout=60)
    assert result.returncode == 0, result.stderr
    words = shlex.split(result.stdout)
    for flag, value in expected.items():
        assert words[words.index(flag) + 1] == value, (script, flag)


def test_presets_page_lists_every_preset_with_the_paper_numbers():
    with open(os.path.join(ROOT, "docs", "presets.md"), encoding="utf-8") as f:
        rows = {line.split("|")[1].strip().strip("`"): line for line in f if line.startswith("| `")}
    assert set(rows) == set(PRESETS)
    for name, line in rows.items():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        paper, ours = cells[-2], cells[-1]
        assert ours == "", name  # filled in when measured
        if name.startswith("table"):
            # R@1 / R@5 / R@10 from the paper (docs/presets.md cites PAPER_TABLES), or "–" where not reported.
            assert paper == "–" or len(paper.split(" / ")) == 3, (name, paper)


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_parses_and_takes_one_training_step(name, setup, tmp_path):
    root, env = setup
    out = tmp_path / name
    argv = command(env, out, name)
    flags = [f if f != "$STAGE1_CHECKPOINT" else env["STAGE1_CHECKPOINT"] for f in PRESETS[name][1]]
    at = [i for i in range(len(argv)) if argv[i:i + len(flags)] == flags]
    assert argv[-len(TINY):] == TINY  # extra arguments come last: they win
    assert at and at[0] + len(flags) <= len(argv) - len(TINY), f"{name}: preset flags not in {argv}"
    main_task_retrieval.main(argv)
    with open(out / "args.json") as f:
        recorded = json.load(f)
    # Every flag the preset sets reached the run (the tiny overrides aside).
    parser = main_task_retrieval.build_parser()
    base = ["--output_dir", "o", "--data_path", "d", "--features_path", "v"]
    expected = vars(parser.parse_args(base + flags))
    for dest in checkpoint_record.explicit_flags(parser, base + flags) - {"output_dir", "data_path", "features_path"}:
        if dest not in OVERRIDDEN.get(name, set()):
            assert recorded[dest] == expected[dest], f"{name}: {dest} = {recorded[dest]}, preset {expected[dest]}"
    losses = [r["loss"] for r in read_jsonl(out / "train_metrics.jsonl") if r["event"] == "train"]
    assert len(losses) == 1 and math.isfinite(losses[0])
    record = checkpoint_record.read_record(str(out / "pytorch_model.bin.step1"))
    assert record["flags"]["padding_rule"] == ("released" if name.startswith("table") else "masked")


def test_bad_presets_are_clear_errors(tmp_path):
    unknown = run_sh(env={"PRESET": "table99"}, check=False)
    assert unknown.returncode == 2 and "unknown PRESET 'table99'" in unknown.stderr and "--list-presets" in unknown.stderr
    two_stage = run_sh(env={"PRESET": "tg-two-stage", "STAGE1_CHECKPOINT": ""}, check=False)
    assert two_stage.returncode == 2 and "STAGE1_CHECKPOINT" in two_stage.stderr
    missing = run_sh(env={"PRESET": "tg-two-stage", "STAGE1_CHECKPOINT": str(tmp_path / "none.bin")}, check=False)
    assert missing.returncode == 2 and "is not a file" in missing.stderr
    sweep = run_sh(env={"PRESET": "table11a-depthX"}, check=False)
    assert sweep.returncode == 2 and "needs a number" in sweep.stderr


def test_sweep_presets_take_any_value(tmp_path):
    printed = run_sh("--dry-run", env={"PRESET": "table11b-beta0.25", "OUTPUT_DIR": str(tmp_path)}).stdout
    assert f"--beta 0.25 {RELEASED_RECIPE}" in printed
