"""tools/search.py: a folder of one's own clips searched with a text query. A tiny model is
trained (through main_task_retrieval.main) on generated clips of distinct colors; the caption
of a clip must then return that clip first, from a fresh index and from the cached one, with
the same answer after an interrupted build; the HTML page is checked by parsing it."""
import html.parser
import json
import os

import av
import numpy as np
import pytest

import main_task_retrieval
from tests.datagen import make_msrvtt
from tests.test_train_e2e import tiny_flags, write_tiny_checkpoints
from tools import search

COLORS = [(220, 30, 30), (30, 200, 40), (40, 60, 230), (230, 220, 40), (200, 40, 210)]
EPOCHS = 10


def write_color_clip(path: str, rgb, seconds: float = 1.0, fps: int = 5, size=(64, 48)) -> None:
    """An H.264 mp4 of one flat color (each clip of the folder its own)."""
    with av.open(path, mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        frame = np.empty((size[1], size[0], 3), dtype=np.uint8)
        frame[:] = rgb
        for _ in range(int(seconds * fps)):
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def train_on_clips(root, extra=()) -> tuple[str, dict]:
    """A tiny checkpoint trained on every clip of a generated folder (one caption each): its
    captions are what the search is asked."""
    ckpts = write_tiny_checkpoints(str(root))
    data = make_msrvtt(str(root / "data"), n_videos=len(COLORS), n_test=1, captions_per_video=1, seconds=1.0)
    for video_id, rgb in zip(data["video_ids"], COLORS):
        write_color_clip(os.path.join(data["features_path"], f"{video_id}.mp4"), rgb)
    with open(data["train_csv"], "w") as f:
        f.write("video_id\n" + "\n".join(data["video_ids"]) + "\n")
    out = root / "run"
    main_task_retrieval.main(["--do_train", "--skip_test", "--epochs", str(EPOCHS),
                              *tiny_flags(data, ckpts, out, "--batch_size", str(len(COLORS)), "--coef_lr", "1",
                                          "--warmup_proportion", "0", "--n_display", "100", *extra)])
    return str(out / f"pytorch_model.bin.{EPOCHS - 1}"), data


@pytest.fixture(scope="module")
def agnostic(tmp_path_factory):
    return train_on_clips(tmp_path_factory.mktemp("agnostic"))


@pytest.fixture(scope="module")
def guided(tmp_path_factory):
    return train_on_clips(tmp_path_factory.mktemp("guided"), ("--text_gate", "--text_query", "--query_gate"))


def caption_of(data: dict, video_id: str) -> str:
    with open(data["data_json"]) as f:
        return next(s["caption"] for s in json.load(f)["sentences"] if s["video_id"] == video_id)


class HitRows(html.parser.HTMLParser):
    """The page's hit rows (data-rank, data-file) and each row's image sources."""

    def __init__(self):
        super().__init__()
        self.rows, self.images = [], {}

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "tr" and attrs.get("class") == "hit":
            self.rows.append((int(attrs["data-rank"]), attrs["data-file"]))
        elif tag == "img" and self.rows:
            self.images[self.rows[-1][1]] = attrs["src"]


def test_caption_of_a_test_clip_returns_that_clip_first(agnostic, tmp_path, capsys):
    checkpoint, data = agnostic
    clip = data["test_ids"][0]
    index, page = tmp_path / "index", tmp_path / "hits.html"
    argv = ["--checkpoint", checkpoint, "--videos", data["features_path"], "--index", str(index),
            "--query", caption_of(data, clip), "--top", "3", "--html", str(page), "--device", "cpu"]
    hits = search.main(argv)
    assert hits[0].name == f"{clip}.mp4" and len(hits) == len(COLORS)
    assert [h.rank for h in hits] == list(range(1, len(COLORS) + 1))
    assert all(a.score >= b.score for a, b in zip(hits, hits[1:]))
    assert set(hits[0].gates) == {"att", "ff"} and all(0 <= g <= 1 for g in hits[0].gates["att"])
    out = capsys.readouterr()
    assert out.out.splitlines()[0].startswith(f"  1. {clip}.mp4  score ")
    assert f"{len(COLORS)} clips ({len(COLORS)} encoded now" in out.err

    parser = HitRows()
    parser.feed(page.read_text())
    assert parser.rows == [(h.rank, h.name) for h in hits[:3]]
    assert all(src.startswith("data:image/png;base64,") for src in parser.images.values())

    again = search.main(argv[:-2])  # a second query reads the index: nothing is encoded again
    assert f"(0 encoded now, {len(COLORS)} from the index)" in capsys.readouterr().err
    assert [(h.name, h.score) for h in again] == [(h.name, h.score) for h in hits]


def test_interrupted_index_resumes_and_changed_clips_are_encoded_again(agnostic, tmp_path, capsys):
    checkpoint, data = agnostic
    index = tmp_path / "index"
    argv = ["--checkpoint", checkpoint, "--videos", data["features_path"], "--index", str(index),
            "--query", caption_of(data, data["video_ids"][1]), "--device", "cpu"]
    first = search.main(argv)
    os.remove(search.clip_entry_path(str(index), data["video_ids"][2]))   # as if stopped before that clip
    write_color_clip(os.path.join(data["features_path"], f"{data['video_ids'][3]}.mp4"), COLORS[3], seconds=1.4)
    capsys.readouterr()
    resumed = search.main(argv)
    assert f"(2 encoded now, {len(COLORS) - 2} from the index)" in capsys.readouterr().err
    assert resumed[0].name == first[0].name == f"{data['video_ids'][1]}.mp4"


def test_index_of_another_checkpoint_is_refused(agnostic, tmp_path):
    checkpoint, data = agnostic
    other = checkpoint.replace(f".bin.{EPOCHS - 1}", f".bin.{EPOCHS - 2}")  # the epoch before: other weights
    index = str(tmp_path / "index")
    search.main(["--checkpoint", checkpoint, "--videos", data["features_path"], "--index", index,
                 "--query", "x", "--device", "cpu"])
    with pytest.raises(SystemExit, match="--index .* was built with other settings"):
        search.main(["--checkpoint", other, "--videos", data["features_path"], "--index", index,
                     "--query", "x", "--device", "cpu"])


def test_text_guided_checkpoint_reranks_a_shortlist(guided, tmp_path):
    checkpoint, data = guided
    clip = data["test_ids"][0]
    argv = ["--checkpoint", checkpoint, "--videos", data["features_path"], "--index", str(tmp_path / "index"),
            "--audio_dir", data["audio_path"], "--query", caption_of(data, clip), "--rerank_topk", "2",
            "--device", "cpu"]
    hits = search.main(argv)
    assert hits[0].name == f"{clip}.mp4"
    assert [h.scored_by for h in hits] == ["text-guided"] * 2 + ["agnostic"] * (len(COLORS) - 2)
    assert set(hits[0].gates) == {"att", "ff", "q"}
    full = search.main([*argv[:-4], "--rerank_topk", str(len(COLORS)), "--device", "cpu"])
    assert all(h.scored_by == "text-guided" for h in full) and full[0].name == f"{clip}.mp4"
