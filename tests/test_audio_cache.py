"""AST feature cache: built by preprocess.cache_audio_features from real wav files, read by
AudioFeatureCache; resume, stale fingerprints and missing ids."""
import json
import pickle

import numpy as np
import pytest
import soundfile as sf
import torch

from dataloaders.audio import FbankConfig, load_ast_input
from dataloaders.audio_cache import (DONE_FILE, TOKENS_FILE, AudioFeatureCache, cache_fingerprint,
                                     read_index)
from dataloaders.audio_presence import EXTRACT_REPORT, MissingAudioError
from modules import weights
from modules.ast import AST, ASTConfig
from preprocess.cache_audio_features import main as cache_main

SAMPLE_RATE = 16000
WITH_AUDIO = ["clip_a", "clip_b", "clip_c"]
WITHOUT_AUDIO = "silent_clip"
VIDEO_IDS = WITH_AUDIO + [WITHOUT_AUDIO]
# One fp16 ulp (11 significant bits): half for the rounding, half as slack for fp32 sums
# that differ with the batch size.
FP16_RTOL = 2.0 ** -10


def save_audioset_checkpoint(model: AST, path) -> None:
    """Our state dict in the released format (DataParallel ``module.v.*``)."""
    torch.save({f"module.v.{k}": v for k, v in model.state_dict().items()}, path)


@pytest.fixture
def workspace(tmp_path):
    """A tiny AST checkpoint, three wav files (one stereo at 44.1 kHz), an id list."""
    model = AST(ASTConfig.tiny())
    checkpoint = tmp_path / "ast_tiny.pth"
    save_audioset_checkpoint(model, checkpoint)
    audio_dir = tmp_path / "audio"
    audio_dir.mkdir()
    rng = np.random.default_rng(0)
    for i, vid in enumerate(WITH_AUDIO):
        seconds = 1.0 + 0.5 * i
        rate, shape = (44100, (int(44100 * seconds), 2)) if i == 2 else (
            SAMPLE_RATE, (int(SAMPLE_RATE * seconds),))
        sf.write(audio_dir / f"{vid}.wav", 0.1 * rng.standard_normal(shape), rate)
    (audio_dir / EXTRACT_REPORT).write_text(json.dumps({"no_audio": [WITHOUT_AUDIO]}))  # as extract_audio lists it
    id_list = tmp_path / "videos.txt"
    id_list.write_text("\n".join(VIDEO_IDS + ["clip_a"]) + "\n")  # a repeated id is cached once
    return {"model": model, "checkpoint": checkpoint, "audio_dir": audio_dir,
            "id_list": id_list, "cache_dir": tmp_path / "cache"}


def run_cache(ws, checkpoint=None) -> int:
    return cache_main(["--checkpoint", str(checkpoint or ws["checkpoint"]),
                       "--video_list", str(ws["id_list"]), "--audio_dir", str(ws["audio_dir"]),
                       "--cache_dir", str(ws["cache_dir"]), "--batch_size", "3",
                       "--num_workers", "0", "--device", "cpu"])


def reference_tokens(ws, vid: str) -> np.ndarray:
    fbank, _ = load_ast_input(str(ws["audio_dir"] / f"{vid}.wav"), FbankConfig())
    return ws["model"].tokens(fbank[None])[0].numpy()


def test_cached_tokens_match_on_the_fly(workspace):
    assert run_cache(workspace) == len(VIDEO_IDS)
    cache = AudioFeatureCache(str(workspace["cache_dir"]))
    assert len(cache) == len(VIDEO_IDS)
    for vid in VIDEO_IDS:
        tokens = cache.tokens(vid)
        assert tokens.dtype == np.float16 and tokens.shape == (1213, 128)
        expected = reference_tokens(workspace, vid)
        np.testing.assert_allclose(tokens.astype(np.float32), expected, rtol=FP16_RTOL, atol=1e-6)
        assert vid in cache
        assert cache.has_audio(vid) == (vid in WITH_AUDIO)
    zero_input = torch.zeros(1, 1024, 128)
    np.testing.assert_allclose(cache.tokens(WITHOUT_AUDIO).astype(np.float32),
                               workspace["model"].tokens(zero_input)[0].numpy(),
                               rtol=FP16_RTOL, atol=1e-6)
    # Distinct clips give distinct rows (rows are not mixed up or shared).
    assert not np.allclose(cache.tokens("clip_a"), cache.tokens("clip_b"))


def test_read_is_a_row_copy_and_pickles_without_the_array(workspace):
    run_cache(workspace)
    cache = AudioFeatureCache(str(workspace["cache_dir"]))
    tokens = cache.tokens("clip_b")
    assert type(tokens) is np.ndarray and tokens.base is None
    on_disk = np.load(workspace["cache_dir"] / TOKENS_FILE, mmap_mode="r")
    assert not np.shares_memory(tokens, on_disk)
    clone = pickle.loads(pickle.dumps(cache))
    assert len(pickle.dumps(cache)) < tokens.nbytes
    np.testing.assert_array_equal(clone.tokens("clip_b"), tokens)


def test_resume_computes_only_rows_not_done(workspace):
    run_cache(workspace)
    cache_dir = workspace["cache_dir"]
    assert run_cache(workspace) == 0
    # Simulate an interrupted run: clip_b's row never marked done. Mark clip_a's row with
    # a sentinel: a rerun that recomputed done rows would overwrite it.
    index = read_index(str(cache_dir))
    tokens = np.load(cache_dir / TOKENS_FILE, mmap_mode="r+")
    done = np.load(cache_dir / DONE_FILE, mmap_mode="r+")
    tokens[index["rows"]["clip_a"]] = 7.0
    tokens[index["rows"]["clip_b"]] = 0.0
    done[index["rows"]["clip_b"]] = False
    tokens.flush()
    done.flush()
    del tokens, done
    partial = AudioFeatureCache(str(cache_dir))
    assert "clip_b" not in partial
    with pytest.raises(KeyError, match="not computed yet"):
        partial.tokens("clip_b")
    assert run_cache(workspace) == 1
    cache = AudioFeatureCache(str(cache_dir))
    assert (cache.tokens("clip_a") == 7.0).all()
    np.testing.assert_allclose(cache.tokens("clip_b").astype(np.float32),
                               reference_tokens(workspace, "clip_b"), rtol=FP16_RTOL, atol=1e-6)


def test_stale_fingerprint_is_refused(workspace, tmp_path):
    run_cache(workspace)
    cache_dir = str(workspace["cache_dir"])
    other = tmp_path / "ast_other.pth"
    save_audioset_checkpoint(AST(ASTConfig.tiny()), other)  # other random weights
    with pytest.raises(ValueError, match=f"stale AST feature cache in '{cache_dir}'"):
        run_cache(workspace, checkpoint=other)
    with pytest.raises(ValueError, match="stale"):
        AudioFeatureCache(cache_dir, fingerprint=cache_fingerprint(str(other), FbankConfig()))
    changed_fbank = FbankConfig(norm_mean=0.0)
    with pytest.raises(ValueError, match="stale"):
        AudioFeatureCache(cache_dir, fingerprint=cache_fingerprint(str(workspace["checkpoint"]),
                                                                  changed_fbank))
    current = cache_fingerprint(str(workspace["checkpoint"]), FbankConfig())
    assert "clip_a" in AudioFeatureCache(cache_dir, fingerprint=current)


def test_other_video_list_on_resume_is_refused(workspace):
    run_cache(workspace)
    workspace["id_list"].write_text("clip_a\nclip_b\n")
    with pytest.raises(ValueError, match="other videos"):
        run_cache(workspace)


def test_missing_id_and_missing_cache_errors(workspace, tmp_path):
    run_cache(workspace)
    cache_dir = str(workspace["cache_dir"])
    cache = AudioFeatureCache(cache_dir)
    assert "no_such_video" not in cache
    with pytest.raises(KeyError, match=f"'no_such_video'.*'{cache_dir}'"):
        cache.tokens("no_such_video")
    with pytest.raises(KeyError, match="no_such_video"):
        cache.has_audio("no_such_video")
    empty = str(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match=f"'{empty}'"):
        AudioFeatureCache(empty)


def test_misspelled_audio_dir_is_refused_before_any_work(workspace, tmp_path):
    """A folder where no listed video has its wav (a typo, another extension) is refused, naming
    the flag; nothing is cached from the zero input."""
    with pytest.raises(MissingAudioError, match="--audio_dir .*audoi: no such folder"):
        cache_main(["--checkpoint", str(workspace["checkpoint"]), "--video_list", str(workspace["id_list"]),
                    "--audio_dir", str(tmp_path / "audoi"), "--cache_dir", str(workspace["cache_dir"]),
                    "--device", "cpu"])
    with pytest.raises(MissingAudioError, match="none of the 4 videos .* has its <video_id>.flac"):
        cache_main(["--checkpoint", str(workspace["checkpoint"]), "--video_list", str(workspace["id_list"]),
                    "--audio_dir", str(workspace["audio_dir"]), "--audio_ext", "flac",
                    "--cache_dir", str(workspace["cache_dir"]), "--device", "cpu"])
    assert not workspace["cache_dir"].exists()


def test_default_checkpoint_goes_through_the_weights_resolver(workspace, tmp_path, monkeypatch):
    """No --checkpoint: the released AST file is looked for in modules/ and the weights cache like
    main_task_retrieval.py does; offline, the error names the URL and the exact cache path."""
    monkeypatch.setattr(weights, "MODULES_DIR", str(tmp_path / "modules"))
    with pytest.raises(weights.WeightsError) as err:
        cache_main(["--video_list", str(workspace["id_list"]), "--audio_dir", str(workspace["audio_dir"]),
                    "--cache_dir", str(workspace["cache_dir"]), "--weights_cache", str(tmp_path / "wcache"),
                    "--offline", "--device", "cpu"])
    message = str(err.value)
    assert weights.AST_RELEASE.url in message
    assert str(tmp_path / "wcache" / "ast" / weights.AST_RELEASE.file_name) in message
