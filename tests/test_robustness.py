"""Audio perturbations at evaluation (--audio_perturb, dataloaders/perturb.py) and the per-query
dump (--dump_topk) with its Markdown report (tools/error_report.py).

A perturbation changes only the audio of the test items: frames, frame masks and texts stay
bit-identical; silence is the zero input; swap is a derangement fixed by the seed; noise is
reproducible and independent of the evaluation order; the visual-only model's scores do not
move at all. The dump lists each text's best videos with the scores of sim_matrix.npy, its
video's rank as the metrics count it, and the gates the fusion used for each listed pair.
"""
import json
import os

import numpy as np
import pytest
import soundfile as sf
import torch

import main_task_retrieval
from dataloaders.audio import ast_input, zero_ast_input
from dataloaders.perturb import AudioPerturbation, noise_waveform, swap_sources
from dataloaders.registry import DataConfig, build_eval_datasets
from dataloaders.video import FrameSamplingConfig
from metrics import retrieval_metrics
from modules.tokenization_clip import ClipTokenizer
from preprocess.cache_audio_features import main as cache_main
from tests.datagen import AUDIO_SAMPLE_RATE, make_msrvtt
from tests.test_train_e2e import tiny_flags, write_tiny_checkpoints
from tools import error_report, robustness_table

N_TEST = 4
KINDS = ("none", "silence", "noise", "swap")


def write_distinct_audio(data: dict) -> None:
    """Give every clip its own sound (datagen writes the same tone everywhere), so a swapped
    soundtrack differs from the clip's own."""
    for number, video_id in enumerate(data["video_ids"]):
        path = os.path.join(data["audio_path"], f"{video_id}.wav")
        seconds = sf.info(path).duration
        t = np.arange(int(seconds * AUDIO_SAMPLE_RATE)) / AUDIO_SAMPLE_RATE
        sf.write(path, (0.3 * np.sin(2 * np.pi * (220.0 + 170.0 * number) * t)).astype(np.float32),
                 AUDIO_SAMPLE_RATE)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    paths = make_msrvtt(str(tmp_path_factory.mktemp("robust_data")), n_videos=N_TEST + 2, n_test=N_TEST,
                        seconds=1.0)
    write_distinct_audio(paths)
    return paths


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    return write_tiny_checkpoints(str(tmp_path_factory.mktemp("robust_ckpts")))


@pytest.fixture(scope="module")
def tokenizer():
    return ClipTokenizer()


def eval_data(data, tokenizer, kind="none", seed=3, order_seed=None, **audio):
    audio = audio or {"audio_path": data["audio_path"]}
    cfg = DataConfig(datatype="msrvtt", data_path=data["data_path"], features_path=data["features_path"],
                     max_words=16, frames=FrameSamplingConfig(max_frames=2, image_size=32),
                     audio_perturbation=AudioPerturbation(kind=kind, seed=seed), eval_order_seed=order_seed,
                     **audio)
    return build_eval_datasets(cfg, tokenizer)


def video_items(datasets) -> dict:
    return {datasets.split.video_ids[i]: datasets.videos[i] for i in range(len(datasets.videos))}


def text_items(datasets) -> list:
    return [datasets.texts[i] for i in range(len(datasets.texts))]


def assert_same_items(a: dict, b: dict, keys) -> None:
    for key in keys:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("kind", KINDS[1:])
def test_perturbation_changes_only_the_audio(data, tokenizer, kind):
    clean, perturbed = eval_data(data, tokenizer), eval_data(data, tokenizer, kind)
    clean_items, items = video_items(clean), video_items(perturbed)
    for mine, theirs in zip(text_items(clean), text_items(perturbed)):
        assert_same_items(mine, theirs, ("text_ids", "text_mask", "text_index", "video_index"))
    sources = swap_sources(clean.split.video_ids, 3)
    for video_id, item in items.items():
        assert_same_items(item, clean_items[video_id], ("frames", "frame_mask", "video_index"))
        assert not torch.equal(item["fbank"], clean_items[video_id]["fbank"]), video_id
        if kind == "silence":
            assert torch.equal(item["fbank"], zero_ast_input()) and not item["has_audio"]
        elif kind == "swap":
            assert torch.equal(item["fbank"], clean_items[sources[video_id]]["fbank"])
        else:
            wave = noise_waveform(video_id, AudioPerturbation("noise", seed=3), AUDIO_SAMPLE_RATE)
            assert abs(float(np.sqrt(np.mean(wave.astype(np.float64) ** 2))) - 0.1) < 0.002
            assert torch.equal(item["fbank"], ast_input(torch.from_numpy(wave), AUDIO_SAMPLE_RATE))
    record = perturbed.audio_perturbation()
    assert record["kind"] == kind and record["applied"] is True
    assert ("swap_sources" in record) == (kind == "swap")


def test_noise_and_swap_do_not_depend_on_order_and_follow_the_seed(data, tokenizer):
    for kind in ("noise", "swap"):
        first = video_items(eval_data(data, tokenizer, kind))
        shuffled_data = eval_data(data, tokenizer, kind, order_seed=11)
        assert shuffled_data.split.video_ids != eval_data(data, tokenizer).split.video_ids  # really permuted
        shuffled = video_items(shuffled_data)
        for video_id, item in first.items():
            assert torch.equal(item["fbank"], shuffled[video_id]["fbank"]), (kind, video_id)
        other_seed = video_items(eval_data(data, tokenizer, kind, seed=4))
        assert any(not torch.equal(first[v]["fbank"], other_seed[v]["fbank"]) for v in first), kind


def test_swap_is_a_reproducible_derangement():
    ids = [f"video{k}" for k in range(50)]
    sources = swap_sources(ids, seed=7)
    assert sorted(sources) == sorted(ids) and sorted(sources.values()) == sorted(ids)  # a permutation
    assert all(source != video for video, source in sources.items())                  # no fixed point
    assert swap_sources(list(reversed(ids)), seed=7) == sources                         # order-free
    assert swap_sources(ids, seed=8) != sources
    assert swap_sources(["a", "b"], seed=0) == {"a": "b", "b": "a"}
    with pytest.raises(ValueError, match="at least 2"):
        swap_sources(["only"], seed=0)


def test_token_cache_swap_reads_tokens_and_silence_gives_the_fbank(data, tokenizer, ckpts, tmp_path):
    cache_dir = str(tmp_path / "cache")
    cache_main(["--checkpoint", ckpts["ast"], "--video_list", data["test_csv"], "--audio_dir", data["audio_path"],
                "--cache_dir", cache_dir, "--batch_size", "2", "--num_workers", "0", "--device", "cpu"])
    clean = video_items(eval_data(data, tokenizer, audio_cache_dir=cache_dir))
    swapped = eval_data(data, tokenizer, "swap", audio_cache_dir=cache_dir)
    sources = swap_sources(swapped.split.video_ids, 3)
    for video_id, item in video_items(swapped).items():
        assert torch.equal(item["audio_tokens"], clean[sources[video_id]]["audio_tokens"])
    for video_id, item in video_items(eval_data(data, tokenizer, "silence", audio_cache_dir=cache_dir)).items():
        assert "audio_tokens" not in item and torch.equal(item["fbank"], zero_ast_input())
        assert torch.equal(item["frames"], clean[video_id]["frames"])


def run_eval(data, ckpts, out, *extra) -> dict:
    main_task_retrieval.main(["--do_eval", *tiny_flags(data, ckpts, out, *extra)])
    with open(os.path.join(out, "metrics.json")) as f:
        return json.load(f)


def test_visual_only_scores_identical_under_every_perturbation(data, ckpts, tmp_path):
    sims = {}
    for kind in KINDS:
        metrics = run_eval(data, ckpts, tmp_path / kind, "--no_audio", "--audio_perturb", kind)
        assert metrics["audio_perturbation"]["kind"] == kind
        if kind != "none":
            assert metrics["audio_perturbation"]["applied"] is False
        sims[kind] = np.load(tmp_path / kind / "sim_matrix.npy")
    for kind in KINDS[1:]:
        assert np.array_equal(sims[kind], sims["none"]), kind


def test_perturbation_is_recorded_and_moves_audio_model_scores(data, ckpts, tmp_path):
    guided = ["--text_gate", "--text_query", "--query_gate", "--text_init", "normal"]
    clean = run_eval(data, ckpts, tmp_path / "clean", *guided)
    swap = run_eval(data, ckpts, tmp_path / "swap", *guided, "--audio_perturb", "swap", "--seed", "5")
    assert clean["audio_perturbation"] == {"kind": "none"}
    assert swap["audio_perturbation"]["kind"] == "swap" and swap["audio_perturbation"]["seed"] == 5
    with open(tmp_path / "swap" / "audio_perturbation.json") as f:
        sources = json.load(f)["swap_sources"]
    assert sources == swap_sources(sorted(sources), 5)
    with open(tmp_path / "swap" / "args.json") as f:
        assert json.load(f)["audio_perturb"] == "swap"
    sim_clean, sim_swap = np.load(tmp_path / "clean" / "sim_matrix.npy"), np.load(tmp_path / "swap" / "sim_matrix.npy")
    assert np.abs(sim_clean - sim_swap).max() > 1e-4  # the audio reaches the scores
    noise = run_eval(data, ckpts, tmp_path / "noise", *guided, "--audio_perturb", "noise", "--audio_noise_rms", "0.05")
    assert noise["audio_perturbation"]["noise_rms"] == 0.05 and noise["audio_perturbation"]["seed"] == 42


def test_silence_through_a_token_cache_equals_silence_from_wav_files(data, ckpts, tmp_path):
    cache_dir = str(tmp_path / "cache")
    cache_main(["--checkpoint", ckpts["ast"], "--video_list", data["test_csv"], "--audio_dir", data["audio_path"],
                "--cache_dir", cache_dir, "--batch_size", "2", "--num_workers", "0", "--device", "cpu"])
    for kind in ("silence", "noise"):
        run_eval(data, ckpts, tmp_path / f"wav_{kind}", "--audio_perturb", kind)
        run_eval(data, ckpts, tmp_path / f"cache_{kind}", "--audio_perturb", kind, "--audio_feature_cache", cache_dir)
        np.testing.assert_array_equal(np.load(tmp_path / f"cache_{kind}" / "sim_matrix.npy"),
                                      np.load(tmp_path / f"wav_{kind}" / "sim_matrix.npy"))
    other = tmp_path / "other_ast.pth"
    torch.save({k: v + 1.0 if v.is_floating_point() else v for k, v in torch.load(ckpts["ast"]).items()}, other)
    with pytest.raises(ValueError, match="was built with"):
        run_eval(data, {**ckpts, "ast": str(other)}, tmp_path / "stale", "--audio_perturb", "silence",
                 "--audio_feature_cache", cache_dir)


# ----------------------------------------------------------------------------- --dump_topk

def read_run(out) -> dict:
    def load(name):
        with open(os.path.join(out, name)) as f:
            return json.load(f)
    with open(os.path.join(out, "topk.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return {"metrics": load("metrics.json"), "rows": load("sim_rows.json"), "cols": load("sim_cols.json"),
            "gates": load("gates.json") if os.path.isfile(os.path.join(out, "gates.json")) else None,
            "sim": np.load(os.path.join(out, "sim_matrix.npy")), "records": records}


def check_dump_against_matrix(run: dict, k: int) -> None:
    """Lists = the k best columns of sim_matrix (scores equal), ranks agree with the metrics."""
    cols, sim = run["cols"], run["sim"]
    assert len(run["records"]) == len(run["rows"])
    ranks = []
    for i, record in enumerate(run["records"]):
        assert record["text_index"] == i and record["caption"] == run["rows"][i]["caption"]
        assert record["video_id"] == run["rows"][i]["video_id"]
        listed = [cols.index(e["video_id"]) for e in record["top"]]
        assert len(listed) == min(k, len(cols))
        assert [e["score"] for e in record["top"]] == [float(sim[i, j]) for j in listed]
        assert sorted(sim[i], reverse=True)[:len(listed)] == [sim[i, j] for j in listed]
        own = cols.index(record["video_id"])
        assert record["score"] == float(sim[i, own])
        assert record["rank"] == int((sim[i] >= sim[i, own]).sum())  # ties pessimistic
        ranks.append(record["rank"])
    assert 100.0 * np.mean(np.equal(ranks, 1)) == pytest.approx(run["metrics"]["plain"]["t2v_R@1"])


def test_dump_topk_text_agnostic_lists_video_gates(data, ckpts, tmp_path):
    run_eval(data, ckpts, tmp_path / "run", "--dump_topk", "3")
    run = read_run(tmp_path / "run")
    check_dump_against_matrix(run, 3)
    video_gates = {v["video_id"]: v["gates"] for v in run["gates"]["videos"]}
    for record in run["records"]:
        for entry in record["top"]:
            assert entry["gates"] == video_gates[entry["video_id"]]


def test_dump_topk_text_guided_lists_each_pairs_gates(data, ckpts, tmp_path):
    guided = ["--text_gate", "--text_query", "--query_gate", "--text_init", "normal"]
    run_eval(data, ckpts, tmp_path / "run", *guided, "--dump_topk", str(N_TEST + 5))  # K > gallery: clamped
    run = read_run(tmp_path / "run")
    check_dump_against_matrix(run, N_TEST + 5)
    own_gates = {c["text_index"]: {n: c[n] for n in run["gates"]["gate_names"]}
                 for v in run["gates"]["videos"] for c in v["own_captions"]}
    for record in run["records"]:
        entries = {e["video_id"]: e["gates"] for e in record["top"]}
        assert entries[record["video_id"]] == own_gates[record["text_index"]]  # the pair's own gates
        # Gates are per pair: the same video gets other gates under another text.
    video = run["records"][0]["top"][0]["video_id"]
    per_text = [{e["video_id"]: e["gates"] for e in r["top"]}[video]["att"] for r in run["records"]]
    assert len({tuple(g) for g in per_text}) > 1


def test_dump_topk_under_reranking_marks_fused_pairs(data, ckpts, tmp_path):
    guided = ["--text_gate", "--text_query", "--query_gate", "--text_init", "normal"]
    run_eval(data, ckpts, tmp_path / "run", *guided, "--rerank_topk", "1", "--dump_topk", "3")
    run = read_run(tmp_path / "run")
    pairs = np.load(tmp_path / "run" / "rerank_pairs.npz")
    fused = {(int(t), int(v)): float(s) for t, v, s in zip(pairs["pair_text"], pairs["pair_video"], pairs["pair_scores"])}
    cols = run["cols"]
    ranks = []
    for i, record in enumerate(run["records"]):
        first = record["top"][0]
        assert first["text_guided"] and first["score"] == fused[(i, cols.index(first["video_id"]))]
        assert first["gates"] is not None
        for entry in record["top"][1:]:
            j = cols.index(entry["video_id"])
            assert entry["text_guided"] == ((i, j) in fused)
            assert (entry["gates"] is None) == ((i, j) not in fused)
        ranks.append(record["rank"])
    assert 100.0 * np.mean(np.equal(ranks, 1)) == pytest.approx(run["metrics"]["plain"]["t2v_R@1"])


def test_error_report_renders_the_worst_queries(data, ckpts, tmp_path):
    guided = ["--text_gate", "--text_query", "--query_gate", "--text_init", "normal"]
    run_eval(data, ckpts, tmp_path / "run", *guided, "--dump_topk", "2")
    run = read_run(tmp_path / "run")
    out = tmp_path / "report.md"
    assert error_report.main(["--run", str(tmp_path / "run"), "--worst", "3", "--output", str(out)]) == 0
    page = out.read_text()
    worst = sorted(run["records"], key=lambda r: (-r["rank"], r["score"] - r["top"][0]["score"],
                                                  r["text_index"]))[:3]
    positions = [page.index(f'"{r["caption"]}"') for r in worst]
    assert positions == sorted(positions)  # worst first
    for record in worst:
        assert f"rank {record['rank']} of {len(run['cols'])}" in page
        for entry in record["top"]:
            assert entry["video_id"] in page and f"{entry['score']:.3f}" in page
    assert "g_att" in page and run["metrics"]["protocol"] in page
    assert error_report.main(["--run", str(tmp_path / "run"), "--worst", "1"]) == 0
    assert (tmp_path / "run" / "error_report.md").is_file()


def test_error_report_explains_a_run_without_dump(tmp_path):
    (tmp_path / "metrics.json").write_text("{}")
    with pytest.raises(SystemExit, match="--dump_topk"):
        error_report.main(["--run", str(tmp_path), "--worst", "2"])


# ----------------------------------------------------------------------------- robustness table

def fake_eval(directory, kind: str, r1: float, gates=None, **settings) -> str:
    os.makedirs(directory)
    perturbation = {"kind": kind, **settings}
    with open(os.path.join(directory, "metrics.json"), "w") as f:
        json.dump({"plain": {"t2v_R@1": r1}, "audio_perturbation": perturbation}, f)
    if gates is not None:
        with open(os.path.join(directory, "gates.json"), "w") as f:
            json.dump(gates, f)
    return str(directory)


def agnostic_gates(last_layer: list) -> dict:
    return {"text_guided": False, "gate_names": ["att", "ff"],
            "videos": [{"video_id": f"v{k}", "gates": {"att": [0.9, g], "ff": [0.0, 0.0]}}
                       for k, g in enumerate(last_layer)]}


def guided_gates(last_layer: list) -> dict:
    return {"text_guided": True, "gate_names": ["att", "ff", "q"],
            "videos": [{"video_id": "v0", "own_captions": [{"text_index": k, "caption": "c", "att": [0.0, g],
                                                            "ff": [0.0, 0.0], "q": [0.0, 0.0]}
                                                           for k, g in enumerate(last_layer)]}]}


def test_robustness_table_reports_drops_and_last_layer_gates(tmp_path, capsys):
    noise = {"noise_rms": 0.1, "seed": 42}
    settings = {"none": {}, "silence": {}, "noise": noise, "swap": {"seed": 42}}
    vis = [fake_eval(tmp_path / f"vis_{k}", k, 13.0, **settings[k]) for k in KINDS]
    avi = [fake_eval(tmp_path / "avi_none", "none", 50.0, agnostic_gates([0.5, -0.7])),
           fake_eval(tmp_path / "avi_noise", "noise", 41.5, agnostic_gates([0.1, -0.2]), **noise)]
    tg = [fake_eval(tmp_path / "tg_none", "none", 42.0, guided_gates([0.4, -0.4, 0.1])),
          fake_eval(tmp_path / "tg_swap", "swap", 30.0, guided_gates([0.2, 0.2, -0.2]), seed=42)]
    assert robustness_table.main(["--run", "visual-only", *vis, "--run", "AVIGATE", *avi, "--run", "TG", *tg]) == 0
    out = capsys.readouterr().out
    assert "| visual-only | 13.0 | 13.0 (+0.0) | 13.0 (+0.0) | 13.0 (+0.0) | – / – / – / – |" in out
    assert "| AVIGATE | 50.0 | – | 41.5 (-8.5) | – | 0.600 / – / 0.150 / – |" in out
    assert "| TG | 42.0 | – | – | 30.0 (-12.0) | 0.300 / – / – / 0.200 |" in out
    assert '"noise_rms": 0.1' in out
    with pytest.raises(SystemExit, match="unperturbed"):
        robustness_table.main(["--run", "AVIGATE", avi[1]])
    other = fake_eval(tmp_path / "vis_noise_other", "noise", 12.0, noise_rms=0.5, seed=42)
    with pytest.raises(SystemExit, match="different settings"):
        robustness_table.main(["--run", "A", *avi, "--run", "B", vis[0], other])
