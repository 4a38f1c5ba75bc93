"""preprocess/prepare_data.py end to end on fabricated releases in each dataset's real layout,
served from a local HTTP server, with the result read by the real dataloaders; and bad input."""
import csv
import dataclasses
import io
import json
import os
import zipfile

import av
import numpy as np
import pytest
import torch

from dataloaders.registry import DataConfig, build_eval_datasets, build_train_dataset
from dataloaders.video import FrameSamplingConfig
from fileserver import FileServer
from preprocess import prepare_data, source_charades, source_msrvtt, source_vatex
from synthetic.make_tiny_checkpoints import TinyCheckpointConfig, make_tiny_checkpoints

FPS, SECONDS, SIZE, AUDIO_RATE = 5, 1.0, (64, 48), 16000
FRAMES = FrameSamplingConfig(max_frames=2, image_size=32)


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


@pytest.fixture(autouse=True)
def _private_weights_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("AVIGATE_CACHE", str(tmp_path / "weights_cache"))


def clip_bytes(with_audio: bool, tmp_path, name: str) -> bytes:
    """A SECONDS-long H.264 mp4, with a 440 Hz AAC soundtrack or none."""
    path = tmp_path / f"_{name}.mp4"
    with av.open(str(path), "w") as container:
        video = container.add_stream("libx264", rate=FPS)
        video.width, video.height, video.pix_fmt = *SIZE, "yuv420p"
        audio = container.add_stream("aac", rate=AUDIO_RATE) if with_audio else None
        if audio is not None:
            audio.layout = "mono"
        for i in range(int(SECONDS * FPS)):
            image = np.full((SIZE[1], SIZE[0], 3), 40 * i, np.uint8)
            container.mux(video.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(video.encode(None))
        if audio is not None:
            tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(int(SECONDS * AUDIO_RATE)) / AUDIO_RATE))
            for start in range(0, tone.size, 1024):
                frame = av.AudioFrame.from_ndarray(tone[None, start:start + 1024].astype(np.float32),
                                                   format="fltp", layout="mono")
                frame.sample_rate, frame.pts = AUDIO_RATE, start
                container.mux(audio.encode(frame))
            container.mux(audio.encode(None))
    return path.read_bytes()


def zip_bytes(members: dict, stored: bool = False) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED if stored else zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def csv_text(header, rows) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(header)
    writer.writerows(rows)
    return out.getvalue()


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clips")
    return {True: clip_bytes(True, folder, "sound"), False: clip_bytes(False, folder, "silent")}


@pytest.fixture(scope="module")
def tiny_ast(tmp_path_factory):
    return make_tiny_checkpoints(str(tmp_path_factory.mktemp("ckpt")), TinyCheckpointConfig())["ast"]


def run_prepare(*args) -> int:
    return prepare_data.main(["--workers", "1", "--device", "cpu", *map(str, args)])


def report_of(root) -> dict:
    with open(os.path.join(root, prepare_data.REPORT_FILE)) as handle:
        return json.load(handle)


def check_loaders(datatype: str, report: dict, num_train_videos: int, num_test_videos: int) -> None:
    """The prepared tree, as the real loaders read it (wav audio, token cache, validation files)."""
    paths = report["paths"]
    cfg = DataConfig(datatype=datatype, data_path=paths["data_path"], features_path=paths["features_path"],
                     audio_path=paths["audio_path"], frames=FRAMES)
    train = build_train_dataset(cfg)
    assert train.split.num_videos == num_train_videos
    test = build_eval_datasets(cfg)
    assert test.split.num_videos == num_test_videos
    assert train[0]["frames"].shape == (2, 3, 32, 32) and train[0]["fbank"].shape == (1024, 128)
    if "audio_feature_cache" in paths:
        cached = build_eval_datasets(DataConfig(datatype=datatype, data_path=paths["data_path"],
                                                features_path=paths["features_path"],
                                                audio_cache_dir=paths["audio_feature_cache"], frames=FRAMES))
        assert cached.videos[0]["audio_tokens"].shape[0] == 1213
    if "frame_cache" in paths:  # the frame cache serves exactly the decoded frames
        frames = FrameSamplingConfig(**report["stages"]["frame_cache"]["settings"])
        decoded = DataConfig(datatype=datatype, data_path=paths["data_path"], features_path=paths["features_path"],
                             frames=frames)
        cached = build_train_dataset(dataclasses.replace(decoded, frame_cache_dir=paths["frame_cache"]))
        reference = build_train_dataset(decoded)
        for index in range(len(cached)):
            assert torch.equal(cached[index]["frames"], reference[index]["frames"])
        assert f"--frame_cache {paths['frame_cache']}" in report["run"]
    if "val_file" in paths:
        reduced = build_train_dataset(DataConfig(datatype=datatype, data_path=paths["data_path"],
                                                 features_path=paths["features_path"], frames=FRAMES,
                                                 train_file=paths["val_train_file"]))
        val = build_eval_datasets(DataConfig(datatype=datatype, data_path=paths["data_path"],
                                             features_path=paths["features_path"], frames=FRAMES,
                                             eval_file=paths["val_file"]))
        assert reduced.split.num_videos + val.split.num_videos == num_train_videos


# ----------------------------------------------------------------------------- MSR-VTT

MSRVTT_SILENT = ("video1", "video4")


def msrvtt_release(clips, videos=range(6), test_csv=True) -> dict:
    """msrvtt_data.zip (CLIP4Clip) and MSRVTT.zip (Frozen in Time) in their public layouts."""
    ids = [f"video{k}" for k in range(6)]
    sentences = [{"video_id": v, "caption": f"{v} caption {c}", "sen_id": 6 * c + k}
                 for k, v in enumerate(ids) for c in range(3)]
    annotations = {
        "msrvtt_data/MSRVTT_data.json": json.dumps({"videos": [{"video_id": v} for v in ids],
                                                    "sentences": sentences}),
        "msrvtt_data/MSRVTT_train.9k.csv": csv_text(["video_id"], [[v] for v in ids[:4]]),
        "msrvtt_data/MSRVTT_train.7k.csv": csv_text(["video_id"], [[v] for v in ids[:3]]),
    }
    if test_csv:
        annotations["msrvtt_data/MSRVTT_JSFUSION_test.csv"] = csv_text(
            ["key", "vid_key", "video_id", "sentence"],
            [[f"ret{k}", f"msr{k + 4}", v, f"{v} caption 0"] for k, v in enumerate(ids[4:])])
    members = {f"MSRVTT/videos/all/video{k}.mp4": clips[f"video{k}" not in MSRVTT_SILENT] for k in videos}
    members["MSRVTT/annotation/MSR_VTT.json"] = json.dumps({"annotations": []})
    return {"/msrvtt_data.zip": zip_bytes(annotations), "/MSRVTT.zip": zip_bytes(members, stored=True)}


@pytest.fixture
def tiny_msrvtt_counts(monkeypatch):
    monkeypatch.setattr(source_msrvtt, "EXPECTED", {"videos": 6, "captions": 18, "train_entries": 4,
                                                    "test_entries": 2})


def test_msrvtt_end_to_end(tmp_path, clips, tiny_ast, tiny_msrvtt_counts):
    root = tmp_path / "msrvtt"
    with FileServer(msrvtt_release(clips), cut_once={"/MSRVTT.zip"}) as server:
        args = ["--dataset", "msrvtt", "--root", root, "--download", "--mirror", server.url(""),
                "--ast_checkpoint", tiny_ast, "--num_val", 1]
        assert run_prepare(*args) == prepare_data.EXIT_OK
        resumed = [r["range"] for r in server.requests if r["path"] == "/MSRVTT.zip"]
        assert resumed[0] is None and resumed[1].startswith("bytes=")  # the cut transfer continued
        report = report_of(root)
        assert report["ok"] and report["error"] is None
        assert report["no_soundtrack"] == {"count": 2, "video_ids": list(MSRVTT_SILENT)}
        assert (root / "videos_without_audio.txt").read_text().split() == list(MSRVTT_SILENT)
        assert sorted(os.listdir(root / "audio")) == sorted(
            [f"video{k}.wav" for k in range(6) if f"video{k}" not in MSRVTT_SILENT] + ["extract_audio_report.json"])
        checks = {c["name"]: c for c in report["stages"]["check"]["checks"]}
        assert checks["videos"]["found"] == 6 and checks["test_entries"]["found"] == 2
        assert report["stages"]["fetch"]["MSRVTT.zip"]["downloaded"]
        assert len(report["stages"]["fetch"]["MSRVTT.zip"]["sha256"]) == 64
        assert "bash run.sh" in report["run"] and "DATATYPE=msrvtt" in report["run"]
        check_loaders("msrvtt", report, num_train_videos=4, num_test_videos=2)
        # A rerun resumes: nothing is fetched or unpacked again.
        requests = len(server.requests)
        assert run_prepare(*args) == prepare_data.EXIT_OK
        assert len(server.requests) == requests
        assert report_of(root)["stages"]["unpack"]["MSRVTT.zip"] == {"extracted": 0, "kept": 6}


def test_msrvtt_counts_are_checked(tmp_path, clips):
    archives = tmp_path / "archives"
    archives.mkdir()
    for name, data in msrvtt_release(clips).items():
        (archives / name.strip("/")).write_bytes(data)
    root = tmp_path / "msrvtt"
    code = run_prepare("--dataset", "msrvtt", "--root", root, "--archives", archives, "--no_ast_cache",
                       "--num_val", 0)
    assert code == prepare_data.EXIT_CHECK_FAILED
    checks = {c["name"]: c for c in report_of(root)["stages"]["check"]["checks"]}
    assert checks["videos"] == {"name": "videos", "expected": 10_000, "found": 6, "ok": False}
    assert checks["train_entries"]["expected"] == 9_000 and checks["test_entries"]["expected"] == 1_000


def corrupt_member(data: bytes) -> bytes:
    """Flip bytes inside the first stored member's data (its CRC no longer matches)."""
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        info = archive.infolist()[0]
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    broken = bytearray(data)
    broken[start + 200:start + 216] = bytes(16)
    return bytes(broken)


@pytest.mark.parametrize("case, expected", [
    ("not_a_zip", "MSRVTT.zip is not a readable zip archive"),
    ("truncated_zip", "MSRVTT.zip is not a readable zip archive"),
    ("bad_crc", "member MSRVTT/videos/all/video0.mp4 is corrupt"),
    ("missing_split_file", "lacks ['MSRVTT_JSFUSION_test.csv']"),
    ("missing_video", "have no file in"),
    ("zero_byte_archive", "is empty (0 bytes)"),
    ("absent_archive", "--download"),
])
def test_msrvtt_bad_input_is_an_error(tmp_path, clips, case, expected, capsys):
    release = msrvtt_release(clips, videos=[0, 1, 2, 4, 5] if case == "missing_video" else range(6),
                             test_csv=case != "missing_split_file")
    archives = tmp_path / "archives"
    archives.mkdir()
    for name, data in release.items():
        (archives / name.strip("/")).write_bytes(data)
    videos = archives / "MSRVTT.zip"
    if case == "not_a_zip":
        videos.write_bytes(b"<html>rate limited</html>")
    elif case == "truncated_zip":
        videos.write_bytes(release["/MSRVTT.zip"][:len(release["/MSRVTT.zip"]) // 2])
    elif case == "bad_crc":
        videos.write_bytes(corrupt_member(release["/MSRVTT.zip"]))
    elif case == "zero_byte_archive":
        videos.write_bytes(b"")
    elif case == "absent_archive":
        videos.unlink()
    root = tmp_path / "msrvtt"
    code = run_prepare("--dataset", "msrvtt", "--root", root, "--archives", archives, "--no_ast_cache")
    assert code == prepare_data.EXIT_ERROR
    assert expected in capsys.readouterr().err
    assert expected in report_of(root)["error"]
    if case == "missing_video":
        assert "video3" in report_of(root)["error"]
    if case == "bad_crc":
        assert not (root / "videos" / "video0.mp4").exists()  # nothing partial under the final name


def test_zero_byte_download_is_an_error(tmp_path, clips):
    release = msrvtt_release(clips)
    release["/msrvtt_data.zip"] = b""
    root = tmp_path / "msrvtt"
    with FileServer(release) as server:
        code = run_prepare("--dataset", "msrvtt", "--root", root, "--download", "--mirror", server.url(""))
    assert code == prepare_data.EXIT_ERROR
    assert "0 bytes" in report_of(root)["error"]
    assert not (root / "archives" / "msrvtt_data.zip").exists()


def test_offline_download_names_url_and_path(tmp_path, capsys):
    root = tmp_path / "msrvtt"
    code = run_prepare("--dataset", "msrvtt", "--root", root, "--download", "--offline")
    assert code == prepare_data.EXIT_ERROR
    err = capsys.readouterr().err
    assert source_msrvtt.ANNOTATIONS.url in err
    assert str(root / "archives" / "msrvtt_data.zip") in err


# ----------------------------------------------------------------------------- VATEX

VATEX_TRAIN = ["abc_defGHIj_000010_000020", "Xy-z_12345A_000000_000010", "q_w_e_r_t_y_000005_000015"]
VATEX_VALIDATION = ["val0aaaaaaa_000001_000011", "val1bbbbbbb_000002_000012", "val2ccccccc_000003_000013",
                    "val3ddddddd_000004_000014"]
VATEX_TEST = VATEX_VALIDATION[:2]  # the "HGR" half


def vatex_entries(ids):
    return json.dumps([{"videoID": v, "enCap": [f"{v} english {k}" for k in range(3)], "chCap": ["中文"] * 3}
                       for v in ids])


@pytest.fixture
def vatex_setup(tmp_path, clips, monkeypatch):
    """Official JSONs served for download; the user's clip folder lacks one training video."""
    monkeypatch.setattr(source_vatex, "EXPECTED", {"official_train_videos": 3, "official_validation_videos": 4,
                                                   "test_list_videos": 2})
    videos = tmp_path / "youtube_clips"
    videos.mkdir()
    for k, v in enumerate(VATEX_TRAIN[:2] + VATEX_VALIDATION):
        (videos / f"{v}.mp4").write_bytes(clips[k % 2 == 0])
    test_list = tmp_path / "test_list.txt"
    test_list.write_text("\n".join(VATEX_TEST) + "\n")
    files = {"/vatex_training_v1.0.json": vatex_entries(VATEX_TRAIN).encode(),
             "/vatex_validation_v1.0.json": vatex_entries(VATEX_VALIDATION).encode()}
    with FileServer(files) as server:
        yield server, videos, test_list


def test_vatex_end_to_end(tmp_path, vatex_setup, tiny_ast):
    server, videos, test_list = vatex_setup
    root = tmp_path / "vatex"
    code = run_prepare("--dataset", "vatex", "--root", root, "--download", "--mirror", server.url(""),
                       "--videos", videos, "--vatex_test_list", test_list, "--ast_checkpoint", tiny_ast,
                       "--num_val", 1)
    assert code == prepare_data.EXIT_OK
    report = report_of(root)
    missing = VATEX_TRAIN[2]
    assert report["skipped"]["missing_video"] == {"count": 1, "video_ids": [missing]}
    assert (root / "missing_videos.txt").read_text() == \
        f"{missing}\thttps://www.youtube.com/watch?v=q_w_e_r_t_y\t5\t15\n"
    assert (root / "train_list.txt").read_text().split() == VATEX_TRAIN[:2]
    assert (root / "test_list.txt").read_text().split() == VATEX_TEST
    captions = json.loads((root / "ref_captions.json").read_text())
    assert sorted(captions) == sorted(VATEX_TRAIN[:2] + VATEX_TEST) and len(captions[VATEX_TEST[0]]) == 3
    assert report["paths"]["features_path"] == str(videos)
    check_loaders("vatex", report, num_train_videos=2, num_test_videos=2)


def test_vatex_reads_hgr_npy_and_checks_test_ids(tmp_path, vatex_setup):
    server, videos, _ = vatex_setup
    npy = tmp_path / "tst_names.npy"
    np.save(npy, np.array(VATEX_TEST))
    common = ["--dataset", "vatex", "--root", tmp_path / "vatex", "--download", "--mirror", server.url(""),
              "--videos", videos, "--no_ast_cache", "--num_val", 0]
    assert run_prepare(*common, "--vatex_test_list", npy) == prepare_data.EXIT_OK
    assert (tmp_path / "vatex" / "test_list.txt").read_text().split() == VATEX_TEST
    outside = tmp_path / "outside.txt"
    outside.write_text(VATEX_TRAIN[0] + "\n")
    assert run_prepare(*common, "--vatex_test_list", outside) == prepare_data.EXIT_ERROR
    assert "not official validation videos" in report_of(tmp_path / "vatex")["error"]
    assert run_prepare(*common) == prepare_data.EXIT_ERROR
    assert "hgr_v2t" in report_of(tmp_path / "vatex")["error"]
    assert run_prepare(*common, "--vatex_test_all_validation") == prepare_data.EXIT_CHECK_FAILED
    checks = {c["name"]: c for c in report_of(tmp_path / "vatex")["stages"]["check"]["checks"]}
    assert checks["test_list_videos"] == {"name": "test_list_videos", "expected": 3000, "found": 4, "ok": False}


def test_vatex_needs_a_video_folder(tmp_path):
    assert run_prepare("--dataset", "vatex", "--root", tmp_path / "vatex") == prepare_data.EXIT_ERROR
    assert "--videos" in report_of(tmp_path / "vatex")["error"]


# ----------------------------------------------------------------------------- Charades

CHARADES_IDS = ["46GP8", "N11GT", "0IH69", "KRF68", "WIOOY"]
CHARADES_HEADER = ["id", "subject", "scene", "quality", "relevance", "verified", "script", "objects",
                   "descriptions", "actions", "length"]


def charades_row(video_id: str, script: str) -> list:
    return [video_id, "S1", "Kitchen", "6", "7", "Yes", script, "cup;table",
            f"A person in {video_id} drinks.;They put the cup down.", "c106 0.0 5.2", "1.0"]


@pytest.fixture
def charades_release(clips, monkeypatch):
    monkeypatch.setattr(source_charades, "EXPECTED", {"videos": 5, "train_videos": 3, "test_videos": 2})
    train_rows = [charades_row(v, f"script of {v}") for v in CHARADES_IDS[:3]]
    train_rows[1][CHARADES_HEADER.index("script")] = ""  # no script: a counted skip
    annotations = {"Charades/Charades_v1_train.csv": csv_text(CHARADES_HEADER, train_rows),
                   "Charades/Charades_v1_test.csv": csv_text(CHARADES_HEADER, [charades_row(v, f"script of {v}")
                                                                               for v in CHARADES_IDS[3:]]),
                   "Charades/Charades_v1_classes.txt": "c106 Drinking from a cup\n"}
    videos = {f"Charades_v1_480/{v}.mp4": clips[k != 0] for k, v in enumerate(CHARADES_IDS)}
    with FileServer({"/Charades.zip": zip_bytes(annotations), "/Charades_v1_480.zip": zip_bytes(videos)}) as server:
        yield server


def test_charades_end_to_end(tmp_path, charades_release, tiny_ast):
    root = tmp_path / "charades"
    code = run_prepare("--dataset", "charades", "--root", root, "--download", "--mirror", charades_release.url(""),
                       "--ast_checkpoint", tiny_ast, "--num_val", 1, "--compress")
    assert code == prepare_data.EXIT_OK
    report = report_of(root)
    assert report["skipped"]["empty_caption"] == {"count": 1, "video_ids": [CHARADES_IDS[1]]}
    assert report["no_soundtrack"] == {"count": 1, "video_ids": [CHARADES_IDS[0]]}
    with open(root / "charades_test.csv") as handle:
        assert list(csv.reader(handle)) == [["video_id", "sentence"]] + [[v, f"script of {v}"]
                                                                       for v in CHARADES_IDS[3:]]
    assert report["paths"]["features_path"] == str(root / "videos_3fps")
    assert sorted(os.listdir(root / "videos_3fps")) == sorted(
        [f"{v}.mp4" for v in CHARADES_IDS if v != CHARADES_IDS[1]] + ["compress_video_report.json"])
    check_loaders("charades", report, num_train_videos=2, num_test_videos=2)


def test_charades_descriptions_give_several_captions(tmp_path, charades_release):
    root = tmp_path / "charades"
    code = run_prepare("--dataset", "charades", "--root", root, "--download", "--mirror", charades_release.url(""),
                       "--charades_text", "descriptions", "--no_ast_cache", "--num_val", 0)
    assert code == prepare_data.EXIT_OK
    test = build_eval_datasets(DataConfig(datatype="charades", data_path=str(root), features_path=str(root / "videos"),
                                          frames=FRAMES))
    assert (test.split.num_videos, test.split.num_texts) == (2, 4)


def test_charades_video_missing_from_the_folder_is_an_error(tmp_path, charades_release, clips):
    videos = tmp_path / "my_videos"
    videos.mkdir()
    for video_id in CHARADES_IDS[:-1]:
        (videos / f"{video_id}.mp4").write_bytes(clips[True])
    root = tmp_path / "charades"
    code = run_prepare("--dataset", "charades", "--root", root, "--download", "--mirror", charades_release.url(""),
                       "--videos", videos, "--no_ast_cache")
    assert code == prepare_data.EXIT_ERROR
    error = report_of(root)["error"]
    assert "Charades_v1_test.csv" in error and CHARADES_IDS[-1] in error
    assert [r["path"] for r in charades_release.requests] == ["/Charades.zip"]  # no video archive fetched
