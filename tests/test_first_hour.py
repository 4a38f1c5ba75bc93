"""The first hour (issue 19): every first mistake is answered before any work, by one message
naming the flag, variable or file at fault; a run that failed at its start does not block its
corrected rerun; run_eval.sh's default folders never collide; missing audio is loud."""
import os
import re
import subprocess
import sys

import pytest

import main_task_retrieval
from dataloaders.audio_presence import EXTRACT_REPORT, MissingAudioError, check_audio_presence
from modules import weights
from tests.datagen import make_msrvtt
from tests.test_train_e2e import ROOT, tiny_flags, write_tiny_checkpoints


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    return write_tiny_checkpoints(str(tmp_path_factory.mktemp("ckpts")))


@pytest.fixture()
def data(tmp_path):
    return make_msrvtt(str(tmp_path / "data"), n_videos=4, n_test=2, seconds=1.0)


def _parse_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as info:
        main_task_retrieval.parse_and_check(argv)
    assert info.value.code == 2
    return capsys.readouterr().err


# ----- flag values, at parse time ---------------------------------------------------------
BASE = ["--do_train", "--output_dir", "/nonexistent/out", "--data_path", "d", "--features_path", "f", "--no_audio"]


@pytest.mark.parametrize("flag,value,expected", [
    ("--max_frames", "0", "--max_frames must be >= 1, got 0"),
    ("--max_frames", "-3", "--max_frames must be >= 1, got -3"),
    ("--batch_size", "0", "--batch_size must be >= 1"),
    ("--lr", "0", "--lr must be > 0"),
    ("--fusion_residual", "1.5", "--fusion_residual must be in [0, 1]"),
    ("--warmup_proportion", "-0.1", "--warmup_proportion must be in [0, 1]"),
    ("--feature_framerate", "0", "--feature_framerate must be > 0"),
    ("--max_missing_audio", "2", "--max_missing_audio must be in [0, 1]"),
    ("--epochs", "0", "--epochs must be >= 1"),
])
def test_out_of_range_values_stop_at_parse_time(capsys, flag, value, expected):
    err = _parse_error(capsys, [*BASE, flag, value])
    assert expected in err
    assert err.count("error:") == 1 and "usage:" not in err  # one line, not the 60-line usage


def test_eval_only_with_bf16_precision_names_eval_precision(capsys):
    argv = ["--do_eval", "--output_dir", "/nonexistent/out", "--data_path", "d", "--features_path", "f",
            "--no_audio", "--precision", "bf16"]
    assert "Pass --eval_precision bf16" in _parse_error(capsys, argv)
    args, _ = main_task_retrieval.parse_and_check([*argv, "--eval_precision", "bf16"])
    assert args.eval_precision == "bf16"
    default, _ = main_task_retrieval.parse_and_check(argv[:-2])
    assert default.eval_precision == "fp32"  # evaluation reproduces the published numbers by default


# ----- output folders ---------------------------------------------------------------------
def test_run_failed_at_start_then_corrected_command_succeeds(ckpts, data, tmp_path):
    out = tmp_path / "run"
    wrong = tiny_flags(data, ckpts, out, "--pretrained_clip_name", str(tmp_path / "nowhere" / "clip.pt"))
    with pytest.raises(weights.WeightsError, match="CLIP checkpoint not found: .*nowhere/clip.pt"):
        main_task_retrieval.main(["--do_train", "--epochs", "1", *wrong])
    assert sorted(os.listdir(out)) == ["args.json", "log.txt", "run_info.json"]
    main_task_retrieval.main(["--do_train", "--epochs", "1", *tiny_flags(data, ckpts, out)])
    assert (out / "metrics.json").is_file() and (out / "pytorch_model.bin.0").is_file()
    log = (out / "log.txt").read_text()
    assert "held only the start-up files" in log and "nowhere" not in log  # the old log was replaced


def test_folder_with_results_is_refused_and_resume_advice_names_existing_files_only(capsys, tmp_path):
    out = tmp_path / "old"
    out.mkdir()
    (out / "log.txt").write_text("")
    (out / "metrics.json").write_text("{}")
    argv = ["--do_train", "--output_dir", str(out), "--data_path", "d", "--features_path", "f", "--no_audio"]
    err = _parse_error(capsys, argv)
    assert f"--output_dir {out} already holds a run's results" in err and "--resume_model" not in err
    (out / "training_state.pt").write_bytes(b"")
    assert f"--resume_model {out / 'training_state.pt'}" in _parse_error(capsys, argv)


# ----- data and weights before any work ---------------------------------------------------
def test_check_only_reports_data_and_weights(ckpts, data, tmp_path, capsys):
    out = tmp_path / "run"
    main_task_retrieval.main(["--do_train", "--check_only", *tiny_flags(data, ckpts, out)])
    printed = capsys.readouterr().out
    assert "preflight passed" in printed and "4 of 4 videos have a wav" not in printed  # per split
    assert "2 of 2 videos have a wav" in printed and f"clip weights: {ckpts['clip']}" in printed
    assert not out.exists()  # nothing written


def test_check_only_names_a_missing_video_once(ckpts, data, tmp_path, capsys):
    os.remove(os.path.join(data["features_path"], "video3.mp4"))
    with pytest.raises(SystemExit) as info:
        main_task_retrieval.main(["--do_train", "--check_only", *tiny_flags(data, ckpts, tmp_path / "run")])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("error:") == 1
    assert "video3.mp4" in err and "--skip_bad_videos" in err


def test_malformed_csv_names_the_file(ckpts, data, tmp_path, capsys):
    with open(data["test_csv"], "w") as f:
        f.write('key,vid_key,video_id,sentence\n"ret0,unclosed quote\n')
    with pytest.raises(SystemExit):
        main_task_retrieval.main(["--do_eval", "--check_only", *tiny_flags(data, ckpts, tmp_path / "run")])
    err = capsys.readouterr().err
    assert "MSRVTT_JSFUSION_test.csv" in err and "not a readable CSV" in err


# ----- missing audio ----------------------------------------------------------------------
def test_misspelled_audio_folder_is_refused(data, tmp_path):
    with pytest.raises(MissingAudioError, match="--audio_path .*/audoi: no such folder"):
        check_audio_presence(data["video_ids"], str(tmp_path / "audoi"), 0.05, "train")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(MissingAudioError, match="none of the 4 videos of train has its <video_id>.wav"):
        check_audio_presence(data["video_ids"], str(empty), 1.0, "train")  # even with no threshold


def test_missing_wavs_above_threshold_stop_with_count_and_paths(data):
    audio = data["audio_path"]
    for video_id in data["video_ids"][:2]:
        os.remove(os.path.join(audio, f"{video_id}.wav"))
    with pytest.raises(MissingAudioError) as info:
        check_audio_presence(data["video_ids"], audio, 0.05, "train")
    message = str(info.value)
    assert "2 of 4 videos of train have no .wav file" in message and "--max_missing_audio 0.05" in message
    assert os.path.join(audio, "video0.wav") in message
    presence = check_audio_presence(data["video_ids"], audio, 0.5, "train")  # the flag lets it run
    assert (presence.found, presence.no_soundtrack, len(presence.missing)) == (2, 0, 2)


def test_videos_without_soundtrack_are_expected(data):
    audio = data["audio_path"]
    os.remove(os.path.join(audio, "video0.wav"))
    with open(os.path.join(audio, EXTRACT_REPORT), "w") as f:  # preprocess/extract_audio.py's report
        f.write('{"no_audio": ["video0"]}')
    presence = check_audio_presence(data["video_ids"], audio, 0.0, "train")
    assert (presence.found, presence.no_soundtrack, presence.missing) == (3, 1, [])
    assert "1 have no soundtrack" in presence.summary()


def test_run_with_half_the_wavs_missing_stops_before_work(ckpts, data, tmp_path, capsys):
    for video_id in data["test_ids"][:1]:
        os.remove(os.path.join(data["audio_path"], f"{video_id}.wav"))
    with pytest.raises(SystemExit):
        main_task_retrieval.main(["--do_eval", "--check_only", *tiny_flags(data, ckpts, tmp_path / "run")])
    err = capsys.readouterr().err
    assert "1 of 2 videos of" in err and "video2.wav" in err and "--max_missing_audio" in err


# ----- the shell scripts ------------------------------------------------------------------
def _script(name: str, env: dict, *args: str, bin_dir=None) -> subprocess.CompletedProcess:
    path = os.pathsep.join(p for p in (str(bin_dir) if bin_dir else "", os.path.dirname(sys.executable),
                                       os.environ.get("PATH", "")) if p)
    return subprocess.run(["bash", os.path.join(ROOT, name), *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env, "OMP_NUM_THREADS": "1", "PATH": path})


def _fake_gpus(bin_dir, count: int) -> None:
    """A stand-in nvidia-smi listing ``count`` GPUs."""
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / "nvidia-smi"
    lines = "".join(f'echo "GPU {k}: Fake GPU (UUID: GPU-{k})"\n' for k in range(count))
    fake.write_text(f"#!/usr/bin/env bash\n{lines}")
    fake.chmod(0o755)


@pytest.mark.parametrize("script,variables", [
    ("run.sh", ["DATA_PATH", "VIDEO_PATH", "AUDIO_PATH", "NUM_GPUS", "NUM_WORKERS", "PRECISION", "EVAL_PRECISION",
                "CLIP_NAME", "AST_CHECKPOINT", "OUTPUT_DIR", "PRESET"]),
    ("run_eval.sh", ["CHECKPOINT", "DATA_PATH", "VIDEO_PATH", "AUDIO_PATH", "NUM_WORKERS", "AUDIO_FEATURE_CACHE",
                     "PADDING_RULE", "PRECISION", "OUTPUT_DIR"])])
def test_help_lists_the_variables(script, variables):
    result = _script(script, {}, "--help")
    assert result.returncode == 0 and result.stdout.count("usage:") == 0
    missing = [v for v in variables if not re.search(rf"(^|[\s,]){v}( \[|,)", result.stdout, re.M)]
    assert not missing, f"{script} --help does not list {missing}"


def test_run_sh_without_gpus_runs_one_cpu_process(tmp_path):
    _fake_gpus(tmp_path / "bin", 0)
    env = {k: v for k, v in os.environ.items() if k != "NUM_GPUS"}
    result = subprocess.run(["bash", os.path.join(ROOT, "run.sh"), "--dry-run"], capture_output=True, text=True,
                            timeout=30, env={**env, "PATH": f"{tmp_path / 'bin'}{os.pathsep}{env['PATH']}"})
    assert result.returncode == 0, result.stderr
    assert "no GPU found" in result.stderr and "ONE CPU process" in result.stderr
    assert "--nproc_per_node 1 " in result.stdout and "--device cpu" in result.stdout


def test_run_sh_refuses_more_gpus_than_found(tmp_path):
    _fake_gpus(tmp_path / "bin", 2)
    result = _script("run.sh", {"NUM_GPUS": "4"}, "--dry-run", bin_dir=tmp_path / "bin")
    assert result.returncode == 2 and "NUM_GPUS=4 but this node has 2 GPU(s)" in result.stderr
    assert "set NUM_GPUS=2" in result.stderr


def test_run_sh_checks_data_once_before_starting_ranks(tmp_path, ckpts):
    """A forgotten DATA_PATH: one error naming the file, and torchrun is never started."""
    bin_dir = tmp_path / "bin"
    _fake_gpus(bin_dir, 0)
    (bin_dir / "torchrun").write_text("#!/usr/bin/env bash\necho TORCHRUN STARTED\nexit 1\n")
    (bin_dir / "torchrun").chmod(0o755)
    result = _script("run.sh", {"NUM_GPUS": "2", "DATA_PATH": str(tmp_path / "data" / "msrvtt"),
                                "VIDEO_PATH": str(tmp_path), "AUDIO_PATH": str(tmp_path),
                                "CLIP_NAME": ckpts["clip"], "AST_CHECKPOINT": ckpts["ast"],
                                "OUTPUT_DIR": str(tmp_path / "out")}, bin_dir=bin_dir)
    assert result.returncode == 2 and "TORCHRUN STARTED" not in result.stdout
    assert result.stderr.count("error:") == 1
    assert "MSRVTT_train.9k.csv" in result.stderr and "not found" in result.stderr


def test_run_eval_twice_with_different_settings_on_one_checkpoint(ckpts, data, tmp_path):
    """README's two run_eval.sh examples one after the other: each default output folder names
    its settings, and the same settings again get a numbered folder instead of a refusal."""
    main_task_retrieval.main(["--do_train", "--epochs", "1", *tiny_flags(data, ckpts, tmp_path / "train")])
    env = {"CHECKPOINT": str(tmp_path / "train" / "pytorch_model.bin.0"), "DATA_PATH": data["data_path"],
           "VIDEO_PATH": data["features_path"], "AUDIO_PATH": data["audio_path"], "NUM_GPUS": "1",
           "NUM_WORKERS": "0"}
    extra = ("--max_words", "16", "--batch_size_val", "2", "--device", "cpu")
    folders = []
    for settings in ({}, {"AUDIO_PERTURB": "noise"}, {}):
        result = _script("run_eval.sh", {**env, **settings}, *extra)
        assert result.returncode == 0, result.stderr[-3000:]
        folders.append(result.stderr.split("run_eval.sh: writing to ")[1].split("\n")[0])
    default, noise, again = folders
    assert os.path.basename(default).startswith("eval_pytorch_model.bin.0_fp32_honest_args-")
    assert "_audio-noise_" in noise and again == default + "_2"
    for folder in folders:
        assert os.path.isfile(os.path.join(folder, "metrics.json"))
