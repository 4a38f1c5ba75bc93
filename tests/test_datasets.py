"""Dataset formats, item shapes, determinism, bad inputs and the validation split tool."""
import os

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from dataloaders.audio_cache import AudioCacheWriter
from dataloaders.audio_presence import NO_AUDIO_LIST
from dataloaders.base import AnnotationError, collate_items
from dataloaders.registry import (DataConfig, build_eval_datasets, build_eval_split, build_train_dataset,
                                  build_train_split)
from dataloaders.video import FrameSamplingConfig, VideoReadError, normalize_frames
from modules.tokenization_clip import ClipTokenizer
from preprocess.make_val_split import main as make_val_split_main
from tests.datagen import make_charades, make_msrvtt, make_vatex, write_bad_video

F, S, L = 4, 32, 16
CAPTIONS = 3
MAKERS = {"msrvtt": make_msrvtt, "vatex": make_vatex, "charades": make_charades}


@pytest.fixture(scope="module")
def tokenizer():
    return ClipTokenizer()


def _config(paths, datatype, **kwargs) -> DataConfig:
    settings = {"audio_path": paths["audio_path"], "max_words": L,
                "frames": FrameSamplingConfig(max_frames=F, image_size=S), **kwargs}
    return DataConfig(datatype=datatype, data_path=paths["data_path"], features_path=paths["features_path"],
                      **settings)


def _make(datatype, root, **kwargs):
    if datatype == "charades":
        kwargs.pop("captions_per_video", None)
    return MAKERS[datatype](str(root), **kwargs)


@pytest.fixture(scope="module")
def msrvtt(tmp_path_factory):
    return make_msrvtt(str(tmp_path_factory.mktemp("msrvtt")), n_videos=6, captions_per_video=CAPTIONS)


def _assert_split_consistent(split, expected_ids):
    assert split.video_ids == expected_ids
    for caption, video in zip(split.captions, split.caption_video):
        assert split.video_ids[video] in caption  # datagen captions name their video


@pytest.mark.parametrize("datatype", sorted(MAKERS))
def test_each_format_parses_train_and_eval(tmp_path, datatype):
    paths = _make(datatype, tmp_path, n_videos=5, captions_per_video=CAPTIONS, n_test=2)
    cfg = _config(paths, datatype)
    train, test = build_train_split(cfg), build_eval_split(cfg)
    _assert_split_consistent(train, paths["train_ids"])
    _assert_split_consistent(test, paths["test_ids"])
    per_video = 1 if datatype == "charades" else CAPTIONS
    assert train.num_texts == 3 * per_video
    # MSR-VTT 1k-A: one caption per test video; VATEX: every caption (multi-sentence).
    assert test.num_texts == 2 * (CAPTIONS if datatype == "vatex" else 1)
    assert np.bincount(test.caption_video).tolist() == [test.num_texts // 2] * 2


def test_train_items_and_batches_have_documented_shapes(msrvtt, tokenizer):
    train = build_train_dataset(_config(msrvtt, "msrvtt", expand_sentences=True), tokenizer)
    assert len(train) == 4 * CAPTIONS  # every caption of the 4 training videos
    item = train[CAPTIONS + 1]  # second caption of the second video
    expected = {"text_ids": ((L,), torch.int64), "text_mask": ((L,), torch.int64),
                "text_index": ((), torch.int64), "video_index": ((), torch.int64),
                "frames": ((F, 3, S, S), torch.uint8), "frame_mask": ((F,), torch.bool),
                "fbank": ((1024, 128), torch.float32), "has_audio": ((), torch.bool)}
    assert {k: (tuple(v.shape), v.dtype) for k, v in item.items()} == expected
    assert item["video_index"] == 1 and item["text_index"] == CAPTIONS + 1 and item["has_audio"]
    ids, _ = tokenizer.tokenize_batch([train.split.captions[CAPTIONS + 1]], L)
    assert torch.equal(item["text_ids"], ids[0])
    batch = collate_items([train[i] for i in range(3)])
    assert batch["frames"].shape == (3, F, 3, S, S) and batch["fbank"].shape == (3, 1024, 128)
    # uint8 frames: one byte per value, a quarter of the fp32 frames they become on the device.
    assert batch["frames"].dtype == torch.uint8 and batch["frames"].nbytes == 3 * F * 3 * S * S
    assert normalize_frames(batch["frames"], batch["frame_mask"], torch.device("cpu")).nbytes == \
        4 * batch["frames"].nbytes


def test_short_videos_are_masked(msrvtt, tokenizer):
    train = build_train_dataset(_config(msrvtt, "msrvtt"), tokenizer)
    # datagen: even-numbered videos last 2 s (2 frames at 1 fps), odd ones 3 s.
    for video, real in ((0, 2), (1, 3)):
        item = train[video * CAPTIONS]
        assert item["frame_mask"].tolist() == [True] * real + [False] * (F - real)
        assert (item["frames"][real:] == 0).all() and (item["frames"][:real] > 0).any()


def test_eval_encodes_each_text_and_video_once(tmp_path, tokenizer):
    paths = make_vatex(str(tmp_path), n_videos=5, captions_per_video=CAPTIONS, n_test=2)
    data = build_eval_datasets(_config(paths, "vatex"), tokenizer)
    assert len(data.texts) == 2 * CAPTIONS and len(data.videos) == 2
    texts = collate_items([data.texts[i] for i in range(len(data.texts))])
    assert set(texts) == {"text_ids", "text_mask", "text_index", "video_index"}
    assert texts["video_index"].tolist() == [0] * CAPTIONS + [1] * CAPTIONS
    videos = collate_items([data.videos[i] for i in range(len(data.videos))])
    assert set(videos) == {"frames", "frame_mask", "fbank", "has_audio", "video_index"}
    assert videos["video_index"].tolist() == [0, 1] and videos["frames"].shape == (2, F, 3, S, S)


def test_one_caption_per_video_is_seeded_by_epoch(msrvtt, tokenizer):
    train = build_train_dataset(_config(msrvtt, "msrvtt", expand_sentences=False, seed=3), tokenizer)
    assert len(train) == 4

    def captions(epoch):
        train.set_epoch(epoch)
        return [int(train[i]["text_index"]) for i in range(len(train))]

    first = captions(0)
    assert all(train.split.caption_video[t] == v for v, t in enumerate(first))
    torch.manual_seed(123)
    np.random.seed(123)  # no hidden global RNG: reseeding changes nothing
    assert captions(0) == first
    assert any(captions(epoch) != first for epoch in range(1, 6))


def test_worker_processes_give_the_same_batches(msrvtt, tokenizer):
    train = build_train_dataset(_config(msrvtt, "msrvtt"), tokenizer)

    def batches(workers):
        loader = DataLoader(train, batch_size=4, num_workers=workers, collate_fn=collate_items)
        return [(b["text_ids"], b["frames"], b["fbank"]) for b in loader]

    for (a_ids, a_frames, a_fbank), (b_ids, b_frames, b_fbank) in zip(batches(0), batches(2)):
        assert torch.equal(a_ids, b_ids) and torch.equal(a_frames, b_frames) and torch.equal(a_fbank, b_fbank)


def test_audio_sources(tmp_path, tokenizer):
    paths = make_charades(str(tmp_path), n_videos=3, n_test=1, with_audio=False)
    with open(os.path.join(paths["audio_path"], NO_AUDIO_LIST), "w") as f:  # as prepare_data lists them
        f.writelines(f"{v}\n" for v in paths["video_ids"])
    silent = build_train_dataset(_config(paths, "charades"), tokenizer)
    item = silent[0]
    assert not item["has_audio"] and item["fbank"].abs().sum() == 0  # no wav: the zero input
    assert "audio: 1 of 1 clips used the zero fbank (1 without a soundtrack" in silent.media.audio.counter.summary()
    no_audio = build_train_dataset(_config(paths, "charades", audio_path=None), tokenizer)[0]
    assert "fbank" not in no_audio and "audio_tokens" not in no_audio and not no_audio["has_audio"]

    cache_dir = str(tmp_path / "cache")
    writer = AudioCacheWriter(cache_dir, paths["video_ids"], {"test": True}, num_tokens=5, width=8)
    tokens = np.arange(3 * 5 * 8, dtype=np.float32).reshape(3, 5, 8)
    writer.write(range(3), tokens, [True, False, True])
    cached_cfg = _config(paths, "charades", audio_path=None, audio_cache_dir=cache_dir)
    cached = build_train_dataset(cached_cfg, tokenizer)
    item = cached[1]
    assert item["audio_tokens"].dtype == torch.float16 and item["audio_tokens"].shape == (5, 8)
    assert torch.equal(item["audio_tokens"].float(), torch.from_numpy(tokens[1])) and not item["has_audio"]


def test_empty_caption_tokenizes_to_start_and_end(tmp_path, tokenizer):
    paths = make_charades(str(tmp_path), n_videos=3, n_test=1)
    with open(paths["train_csv"], "a") as f:
        f.write("CH000,\n")
    train = build_train_dataset(_config(paths, "charades", expand_sentences=True), tokenizer)
    assert train.split.captions[-1] == ""
    item = train[len(train) - 1]
    assert item["text_mask"].sum() == 2
    assert item["text_ids"][:2].tolist() == [tokenizer.sot_token_id, tokenizer.eot_token_id]


@pytest.mark.parametrize("build", [build_train_dataset, build_eval_datasets])
def test_missing_video_raises_or_is_dropped_and_counted(tmp_path, tokenizer, build):
    paths = make_msrvtt(str(tmp_path), n_videos=6, captions_per_video=2)
    gone = paths["train_ids"][1] if build is build_train_dataset else paths["test_ids"][0]
    os.remove(os.path.join(paths["features_path"], f"{gone}.mp4"))
    with pytest.raises(VideoReadError, match=f"{gone}.mp4"):
        build(_config(paths, "msrvtt"), tokenizer)
    data = build(_config(paths, "msrvtt", skip_bad_videos=True), tokenizer)
    assert gone not in data.split.video_ids and data.counter.count("missing") == 1
    assert not any(gone in caption for caption in data.split.captions)


def test_corrupt_eval_video_raises_or_is_dropped(tmp_path, tokenizer):
    paths = make_msrvtt(str(tmp_path), n_videos=5, captions_per_video=1, n_test=3)
    bad = paths["test_ids"][1]
    write_bad_video(os.path.join(paths["features_path"], f"{bad}.mp4"), "truncated")
    with pytest.raises(VideoReadError, match=f"{bad}.mp4"):
        build_eval_datasets(_config(paths, "msrvtt"), tokenizer)
    data = build_eval_datasets(_config(paths, "msrvtt", skip_bad_videos=True), tokenizer)
    assert data.split.video_ids == [paths["test_ids"][0], paths["test_ids"][2]]
    assert data.counter.count("unreadable") == 1 and len(data.texts) == 2
    assert "1 unreadable" in data.counter.summary()


def test_corrupt_training_video_is_replaced_deterministically(tmp_path, tokenizer):
    paths = make_msrvtt(str(tmp_path), n_videos=5, captions_per_video=2, n_test=1)
    write_bad_video(os.path.join(paths["features_path"], "video1.mp4"), "garbage")
    strict = build_train_dataset(_config(paths, "msrvtt", expand_sentences=True), tokenizer)
    with pytest.raises(VideoReadError, match="video1.mp4"):
        strict[2]
    train = build_train_dataset(_config(paths, "msrvtt", skip_bad_videos=True, expand_sentences=True),
                                tokenizer)
    # Samples 2 and 3 (video1) become the next sample with a readable video: 4 (video2).
    assert [int(train[i]["text_index"]) for i in range(len(train))] == [0, 1, 4, 4, 4, 5, 6, 7]
    loader = DataLoader(train, batch_size=4, num_workers=2, collate_fn=collate_items)
    assert [int(i) for b in loader for i in b["text_index"]] == [0, 1, 4, 4, 4, 5, 6, 7]
    assert train.counter.count("replaced") == 2 + 2  # in this process, then in the workers
    assert train.counter.summary().startswith("videos: 0 missing, 0 unreadable, 4 replaced")


@pytest.mark.parametrize("datatype, kind, match", [
    ("msrvtt", "csv_column", r"MSRVTT_JSFUSION_test\.csv.*'sentence'"),
    ("msrvtt", "json_key", r"MSRVTT_data\.json.*'sentences'"),
    ("vatex", "json_key", r"ref_captions\.json.*'vatex_004'"),
    ("charades", "csv_column", r"charades_test\.csv.*'video_id'"),
])
def test_bad_annotations_name_file_and_key(tmp_path, datatype, kind, match):
    paths = _make(datatype, tmp_path, n_videos=5, captions_per_video=2, n_test=2)
    cfg = _config(paths, datatype)
    if datatype == "msrvtt" and kind == "csv_column":
        target, text = paths["test_csv"], "key,vid_key,video_id,caption\nret0,msr3,video3,a caption\n"
    elif datatype == "msrvtt":
        target, text = paths["data_json"], '{"videos": []}'
    elif datatype == "vatex":
        target, text = paths["captions_json"], '{"vatex_003": ["a caption"]}'
    else:
        target, text = paths["test_csv"], "id,sentence\nCH003,a caption\n"
    with open(target, "w") as f:
        f.write(text)
    build = build_train_split if target.endswith(".json") and datatype == "msrvtt" else build_eval_split
    with pytest.raises(AnnotationError, match=match):
        build(cfg)


def test_unknown_datatype_is_rejected(msrvtt):
    with pytest.raises(ValueError, match="unknown datatype 'lsmdc'"):
        build_train_split(_config(msrvtt, "lsmdc"))


@pytest.mark.parametrize("datatype", sorted(MAKERS))
def test_make_val_split_holds_out_training_videos(tmp_path, datatype):
    paths = _make(datatype, tmp_path, n_videos=10, captions_per_video=CAPTIONS, n_test=2)
    args = ["--datatype", datatype, "--data_path", paths["data_path"], "--num_val", "3", "--seed", "7"]
    files = make_val_split_main(args)
    contents = {k: open(p).read() for k, p in files.items()}
    assert {k: open(p).read() for k, p in make_val_split_main(args).items()} == contents  # seeded
    cfg = _config(paths, datatype, train_file=files["train_file"], eval_file=files["eval_file"])
    train, val = build_train_split(cfg), build_eval_split(cfg)
    assert len(val.video_ids) == 3 and len(train.video_ids) == 5
    assert sorted(train.video_ids + val.video_ids) == sorted(paths["train_ids"])
    _assert_split_consistent(val, [v for v in paths["train_ids"] if v in val.video_ids])
    # Same caption layout as the test file of each dataset (1k-A style for MSR-VTT).
    assert val.num_texts == 3 * (CAPTIONS if datatype == "vatex" else 1)
