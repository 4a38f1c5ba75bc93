"""The CLIP stand-in's pre-training (synthetic/pretrain_clip.py): its corpus never touches the
benchmark, its output loads through the released-format path, and it is cached by config."""
import json
import os

import pytest
import torch

from modules.clip import CLIP, load_clip_state_dict
from synthetic.make_tiny_checkpoints import TinyCheckpointConfig, make_tiny_checkpoints
from synthetic.pretrain_clip import (BENCHMARK_STREAMS, ClipPretrainConfig, Still, all_corpus_phrasings,
                                     benchmark_captions, check_no_benchmark_text, pretrain_clip, render_still,
                                     report_path, sentence_group, validate_config)
from synthetic.vocab import INFORMATIVE_SOUNDS, caption_variants

TINY = dict(steps=3, batch_size=8, group_size=4, num_images=16, held_out=8, warmup_steps=1)


@pytest.fixture(scope="module")
def init_clip(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("clip"))
    return make_tiny_checkpoints(out, TinyCheckpointConfig())["clip"]


@pytest.mark.parametrize("stream", BENCHMARK_STREAMS)
def test_benchmark_streams_are_refused(stream):
    with pytest.raises(ValueError, match="--stream"):
        validate_config(ClipPretrainConfig(stream=stream))


def test_no_corpus_sentence_is_a_benchmark_caption():
    forbidden = benchmark_captions()
    corpus = all_corpus_phrasings()
    assert len(forbidden) > 100_000 and len(corpus) > 100_000
    assert not forbidden & set(corpus)
    check_no_benchmark_text(corpus[:50], forbidden)
    clash = caption_variants("circle", "red", "left", "black", INFORMATIVE_SOUNDS[0])[0]
    with pytest.raises(ValueError, match="benchmark caption"):
        check_no_benchmark_text([clash], forbidden)


def test_sampled_sentences_come_from_the_checked_templates():
    cfg = ClipPretrainConfig()
    corpus = set(all_corpus_phrasings())
    for index in range(40):
        pairs, contents = sentence_group(cfg, 1, index)
        assert all(a in corpus and b in corpus for a, b in pairs)
        if len(contents) > 1:  # a group shares its visuals and names distinct sounds (one names none)
            assert len({c.visuals for c in contents}) == 1
            assert len({c.sound for c in contents}) == len(contents) and None in {c.sound for c in contents}


def test_stills_are_deterministic_and_captioned_by_what_they_show():
    cfg = ClipPretrainConfig()
    a, still = render_still(cfg, 0, 5)
    b, same = render_still(cfg, 0, 5)
    assert (a == b).all() and still == same and a.shape == (cfg.frame_size, cfg.frame_size, 3)
    caption = still.caption("a {size} {colour} {shape} {where} {background}")
    assert still.colour in caption and still.shape in caption and still.background in caption
    assert not (a == render_still(cfg, 0, 6)[0]).all()


def test_pretraining_writes_an_openai_format_file_and_caches_by_config(init_clip, tmp_path):
    out = str(tmp_path / "clip_pretrained.pt")
    cfg = ClipPretrainConfig(**TINY)
    report = pretrain_clip(init_clip, out, cfg)
    assert not report["reused"]
    model = CLIP.from_state_dict(load_clip_state_dict(out))  # the --pretrained_clip_name path
    initial = load_clip_state_dict(init_clip)
    assert set(model.state_dict()) == set(initial)
    assert not torch.equal(model.state_dict()["text_projection"], initial["text_projection"])
    saved = json.load(open(report_path(out)))
    assert saved["config"]["steps"] == 3 and set(saved["held_out_after"]["zero_shot"]) >= {"shape", "colour"}
    assert 0.0 <= saved["held_out_after"]["language"]["named_sound_nearest_centroid"] <= 100.0
    mtime = os.path.getmtime(out)
    assert pretrain_clip(init_clip, out, cfg)["reused"]  # same config: the file is reused
    assert os.path.getmtime(out) == mtime
    rebuilt = pretrain_clip(init_clip, out, ClipPretrainConfig(**{**TINY, "steps": 2}))
    assert not rebuilt["reused"] and json.load(open(report_path(out)))["config"]["steps"] == 2
    # same config from scratch: the same weights
    twin = str(tmp_path / "twin.pt")
    pretrain_clip(init_clip, twin, ClipPretrainConfig(**{**TINY, "steps": 2}))
    a, b = load_clip_state_dict(twin), load_clip_state_dict(out)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_tampered_file_is_rebuilt(init_clip, tmp_path):
    out = str(tmp_path / "clip_pretrained.pt")
    cfg = ClipPretrainConfig(**TINY)
    pretrain_clip(init_clip, out, cfg)
    with open(out, "ab") as handle:
        handle.write(b"x")
    assert not pretrain_clip(init_clip, out, cfg)["reused"]
