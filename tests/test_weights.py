"""modules/weights.py: downloads from a local HTTP server, verification, the cache and resolvers."""
import hashlib
import os
import subprocess

import pytest
import torch

from fileserver import FileServer
from modules import weights
from modules.ast import AST, ASTConfig
from modules.clip import CLIP, CLIPConfig, load_clip_state_dict
from synthetic.make_tiny_checkpoints import ast_to_audioset_checkpoint, audioset_head

DATA = bytes(range(256)) * 4099  # ~1 MB, no repeating period of a chunk size


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.delenv(weights.CACHE_ENV, raising=False)
    monkeypatch.delenv(weights.OFFLINE_ENV, raising=False)


def leftovers(folder) -> list:
    return sorted(name for name in os.listdir(folder) if name.endswith((".part", ".tmp")))


def test_download_writes_verified_file(tmp_path):
    with FileServer({"/w.bin": DATA}) as server:
        got = weights.download(server.url("/w.bin"), tmp_path / "w.bin", sha(DATA))
    assert got == sha(DATA)
    assert (tmp_path / "w.bin").read_bytes() == DATA
    assert leftovers(tmp_path) == []
    assert [r["range"] for r in server.requests] == [None]


def test_interrupted_transfer_resumes_with_range(tmp_path):
    with FileServer({"/w.bin": DATA}, cut_once={"/w.bin"}) as server:
        weights.download(server.url("/w.bin"), tmp_path / "w.bin", sha(DATA))
    assert (tmp_path / "w.bin").read_bytes() == DATA
    first, second = server.requests
    assert first["range"] is None
    assert second["range"] == f"bytes={len(DATA) // 2}-"  # continued where the cut left off


def test_part_from_an_earlier_process_is_resumed(tmp_path):
    kept = 300_000
    (tmp_path / "w.bin.part").write_bytes(DATA[:kept])
    with FileServer({"/w.bin": DATA}) as server:
        weights.download(server.url("/w.bin"), tmp_path / "w.bin", sha(DATA))
    assert (tmp_path / "w.bin").read_bytes() == DATA
    assert [r["range"] for r in server.requests] == [f"bytes={kept}-"]


def test_complete_part_is_finished_without_a_transfer(tmp_path):
    (tmp_path / "w.bin.part").write_bytes(DATA)
    with FileServer({"/w.bin": DATA}) as server:
        weights.download(server.url("/w.bin"), tmp_path / "w.bin", sha(DATA))
    assert (tmp_path / "w.bin").read_bytes() == DATA
    assert server.requests[0]["range"] == f"bytes={len(DATA)}-"  # answered 416: nothing left


def test_server_ignoring_range_restarts_the_part(tmp_path):
    (tmp_path / "w.bin.part").write_bytes(b"stale bytes from another file")
    with FileServer({"/w.bin": DATA}, ignore_range=True) as server:
        weights.download(server.url("/w.bin"), tmp_path / "w.bin", sha(DATA))
    assert (tmp_path / "w.bin").read_bytes() == DATA


def test_wrong_checksum_leaves_nothing_under_the_final_name(tmp_path):
    with FileServer({"/w.bin": DATA}) as server:
        with pytest.raises(weights.WeightsError, match="expected " + "0" * 64):
            weights.download(server.url("/w.bin"), tmp_path / "w.bin", "0" * 64)
    assert not (tmp_path / "w.bin").exists()
    assert leftovers(tmp_path) == []


def test_zero_byte_download_is_an_error(tmp_path):
    with FileServer({"/empty.bin": b""}) as server:
        with pytest.raises(weights.WeightsError, match="0 bytes"):
            weights.download(server.url("/empty.bin"), tmp_path / "empty.bin")
    assert os.listdir(tmp_path) == []


def test_failed_verification_deletes_the_part(tmp_path):
    def reject(path):
        raise weights.WeightsError(f"not the file: {path}")

    with FileServer({"/w.bin": DATA}) as server:
        with pytest.raises(weights.WeightsError, match="not the file"):
            weights.download(server.url("/w.bin"), tmp_path / "w.bin", verify=reject)
    assert os.listdir(tmp_path) == []


def test_offline_error_names_url_and_path(tmp_path):
    dest = tmp_path / "cache" / "w.bin"
    with pytest.raises(weights.WeightsError) as err:
        weights.download("https://example.org/w.bin", dest, offline=True)
    assert "https://example.org/w.bin" in str(err.value) and str(dest) in str(err.value)
    assert not dest.exists()


def test_unreachable_server_names_url_and_path(tmp_path, monkeypatch):
    monkeypatch.setattr(weights, "RETRIES", 0)
    with FileServer({}) as server:
        url = server.url("/w.bin")
    # The server is shut down: the port refuses connections.
    with pytest.raises(weights.WeightsError) as err:
        weights.download(url, tmp_path / "w.bin", timeout=5)
    assert url in str(err.value) and str(tmp_path / "w.bin") in str(err.value)


def test_http_error_names_url_and_path(tmp_path):
    with FileServer({}) as server:
        with pytest.raises(weights.WeightsError, match="HTTP 404") as err:
            weights.download(server.url("/missing.bin"), tmp_path / "m.bin")
    assert str(tmp_path / "m.bin") in str(err.value)


def test_cache_dir_precedence(tmp_path):
    assert weights.default_cache_dir({"AVIGATE_CACHE": "/x", "XDG_CACHE_HOME": "/y"}) == "/x"
    assert weights.default_cache_dir({"XDG_CACHE_HOME": "/y"}) == os.path.join("/y", "avigate")
    assert weights.default_cache_dir({}) == os.path.join(os.path.expanduser("~"), ".cache", "avigate")
    assert weights.offline_by_default({"AVIGATE_OFFLINE": "1"}) and not weights.offline_by_default({})


# ----------------------------------------------------------------------------- CLIP resolver

@pytest.fixture
def clip_release(tmp_path, monkeypatch):
    """A tiny CLIP state dict served as the "ViT-B/32" release; modules/ is an empty folder."""
    path = tmp_path / "served.pt"
    torch.save(CLIP(CLIPConfig.tiny()).state_dict(), path)
    data = path.read_bytes()
    modules_dir = tmp_path / "modules"
    modules_dir.mkdir()
    monkeypatch.setattr(weights, "MODULES_DIR", str(modules_dir))
    with FileServer({"/clip/ViT-B-32.pt": data}) as server:
        release = weights.Release("ViT-B-32.pt", "clip", server.url("/clip/ViT-B-32.pt"), sha(data))
        monkeypatch.setitem(weights.CLIP_RELEASES, "ViT-B/32", release)
        yield server, data, modules_dir


def test_clip_release_is_downloaded_then_cached(tmp_path, clip_release):
    server, data, _ = clip_release
    cache = tmp_path / "cache"
    first = weights.resolve_clip_checkpoint("ViT-B/32", cache)
    assert first.source == "download" and first.sha256 == sha(data)
    assert first.path == str(cache / "clip" / "ViT-B-32.pt")
    assert first.record()["url"] == server.url("/clip/ViT-B-32.pt")
    second = weights.resolve_clip_checkpoint("ViT-B/32", cache, offline=True)
    assert (second.source, second.path, second.sha256) == ("cache", first.path, first.sha256)
    assert len(server.requests) == 1
    model = CLIP.from_state_dict(load_clip_state_dict(second.path))
    assert model.cfg == CLIPConfig.tiny()


def test_modules_copy_takes_precedence(tmp_path, clip_release):
    server, data, modules_dir = clip_release
    (modules_dir / "ViT-B-32.pt").write_bytes(data)
    found = weights.resolve_clip_checkpoint("ViT-B/32", tmp_path / "cache")
    assert (found.source, found.path, found.sha256) == ("path", str(modules_dir / "ViT-B-32.pt"), sha(data))
    assert server.requests == []


def test_cached_clip_with_wrong_hash_is_refused(tmp_path, clip_release):
    cached = tmp_path / "cache" / "clip" / "ViT-B-32.pt"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"some other file")
    with pytest.raises(weights.WeightsError, match="not the released ViT-B-32.pt"):
        weights.resolve_clip_checkpoint("ViT-B/32", tmp_path / "cache")


def test_offline_clip_error_names_url_and_cache_path(tmp_path, clip_release):
    server, _, _ = clip_release
    with pytest.raises(weights.WeightsError) as err:
        weights.resolve_clip_checkpoint("ViT-B/32", tmp_path / "cache", offline=True)
    assert server.url("/clip/ViT-B-32.pt") in str(err.value)
    assert str(tmp_path / "cache" / "clip" / "ViT-B-32.pt") in str(err.value)
    assert server.requests == []


def test_given_clip_path_is_used_as_is(tmp_path):
    path = tmp_path / "mine.pt"
    path.write_bytes(b"x")
    found = weights.resolve_clip_checkpoint(path)
    assert (found.path, found.source, found.sha256, found.url) == (str(path), "path", sha(b"x"), None)
    with pytest.raises(weights.WeightsError, match="ViT-B/32"):
        weights.resolve_clip_checkpoint(tmp_path / "absent.pt")


def test_released_urls_carry_their_sha256():
    for release in weights.CLIP_RELEASES.values():
        assert release.url.split("/")[-2] == release.sha256
        assert release.url.endswith("/" + release.file_name)


# ----------------------------------------------------------------------------- AST resolver

def tiny_audioset_bytes(tmp_path) -> bytes:
    cfg = ASTConfig.tiny()
    state = ast_to_audioset_checkpoint(AST(cfg).state_dict(), audioset_head(cfg.embed_dim, 527).state_dict())
    torch.save(state, tmp_path / "served.pth")
    return (tmp_path / "served.pth").read_bytes()


@pytest.fixture
def ast_release(tmp_path, monkeypatch):
    """A tiny AudioSet-format checkpoint served as the release, checked against tiny shapes."""
    data = tiny_audioset_bytes(tmp_path)
    modules_dir = tmp_path / "modules"
    modules_dir.mkdir()
    monkeypatch.setattr(weights, "MODULES_DIR", str(modules_dir))
    real = weights.expected_audioset_shapes
    monkeypatch.setattr(weights, "expected_audioset_shapes", lambda: real(ASTConfig.tiny()))
    with FileServer({"/ast.pth": data, "/junk.pth": b"<html>not a checkpoint</html>"}) as server:
        monkeypatch.setattr(weights, "AST_RELEASE",
                            weights.Release("audioset_10_10_0.4593.pth", "ast", server.url("/ast.pth")))
        yield server, data, modules_dir


def test_ast_release_downloaded_verified_and_recorded(tmp_path, ast_release):
    server, data, modules_dir = ast_release
    cache = tmp_path / "cache"
    found = weights.resolve_ast_checkpoint(modules_dir / "audioset_10_10_0.4593.pth", cache)
    assert found.source == "download" and found.sha256 == sha(data)
    assert os.path.isfile(weights.record_path(found.path))
    again = weights.resolve_ast_checkpoint("audioset_10_10_0.4593.pth", cache, offline=True)
    assert (again.source, again.sha256) == ("cache", found.sha256)
    AST.from_checkpoint(again.path)  # the cached file is the served checkpoint
    # A later run compares the file with the recorded SHA-256.
    with open(found.path, "ab") as handle:
        handle.write(b"tampered")
    with pytest.raises(weights.WeightsError, match="the file changed"):
        weights.resolve_ast_checkpoint("audioset_10_10_0.4593.pth", cache, offline=True)


def test_touched_but_identical_file_still_matches_its_record(tmp_path, ast_release):
    found = weights.resolve_ast_checkpoint("audioset_10_10_0.4593.pth", tmp_path / "cache")
    os.utime(found.path, ns=(1, 1))
    assert weights.resolve_ast_checkpoint("audioset_10_10_0.4593.pth", tmp_path / "cache").sha256 == found.sha256


def test_ast_download_that_is_not_a_checkpoint_is_refused(tmp_path, ast_release, monkeypatch):
    server, _, _ = ast_release
    monkeypatch.setattr(weights, "AST_RELEASE",
                        weights.Release("audioset_10_10_0.4593.pth", "ast", server.url("/junk.pth")))
    with pytest.raises(weights.WeightsError, match="does not load"):
        weights.resolve_ast_checkpoint("audioset_10_10_0.4593.pth", tmp_path / "cache")
    assert not (tmp_path / "cache" / "ast" / "audioset_10_10_0.4593.pth").exists()


def test_ast_with_wrong_shapes_is_refused(tmp_path):
    cfg = ASTConfig.tiny()  # checked against the released (full-size) table
    torch.save(ast_to_audioset_checkpoint(AST(cfg).state_dict(), audioset_head(cfg.embed_dim, 527).state_dict()),
               tmp_path / "small.pth")
    expected = r"module\.v\.pos_embed \(1, 1214, 128\) \(expected \(1, 1214, 768\)\)"
    with pytest.raises(weights.WeightsError, match=expected):
        weights.verify_audioset_checkpoint(tmp_path / "small.pth")


def test_released_audioset_shape_table():
    shapes = weights.expected_audioset_shapes()
    assert shapes["module.v.pos_embed"] == (1, 1214, 768)
    assert shapes["module.v.patch_embed.proj.weight"] == (768, 1, 16, 16)
    assert shapes["module.v.blocks.11.attn.qkv.weight"] == (2304, 768)
    assert "module.v.blocks.12.norm1.weight" not in shapes
    assert shapes["module.mlp_head.1.weight"] == (527, 768)


def test_explicit_missing_ast_path_is_not_downloaded(tmp_path):
    with pytest.raises(weights.WeightsError, match="default"):
        weights.resolve_ast_checkpoint(tmp_path / "elsewhere.pth", tmp_path / "cache")


# ----------------------------------------------------------------------------- main_task_retrieval

def parse_main_args(*extra):
    import main_task_retrieval

    return main_task_retrieval, main_task_retrieval.build_parser().parse_args(
        ["--output_dir", "out", "--data_path", "d", "--features_path", "v", *extra])


def test_main_offline_names_url_and_path(tmp_path, monkeypatch):
    monkeypatch.setattr(weights, "MODULES_DIR", str(tmp_path / "modules"))
    main, args = parse_main_args("--offline", "--weights_cache", str(tmp_path / "cache"))
    with pytest.raises(weights.WeightsError) as err:
        main.build_model(args, torch.device("cpu"))
    assert weights.CLIP_RELEASES["ViT-B/32"].url in str(err.value)
    assert str(tmp_path / "cache" / "clip" / "ViT-B-32.pt") in str(err.value)


def test_main_records_weight_sources(tmp_path):
    from synthetic.make_tiny_checkpoints import TinyCheckpointConfig, make_tiny_checkpoints

    paths = make_tiny_checkpoints(str(tmp_path), TinyCheckpointConfig())
    main, args = parse_main_args("--pretrained_clip_name", paths["clip"], "--ast_checkpoint", paths["ast"],
                                 "--cross_num_hidden_layers", "2", "--audio_query_layers", "2",
                                 "--max_frames", "4")
    model = main.build_model(args, torch.device("cpu"))
    for name in ("clip", "ast"):
        with open(paths[name], "rb") as handle:
            digest = hashlib.sha256(handle.read()).hexdigest()
        assert model.weight_sources[name] == {"path": paths[name], "sha256": digest, "source": "path", "url": None}


def test_default_ast_name_finds_the_modules_copy(tmp_path, ast_release):
    server, data, modules_dir = ast_release
    (modules_dir / "audioset_10_10_0.4593.pth").write_bytes(data)
    for name in ("audioset_10_10_0.4593.pth", modules_dir / "audioset_10_10_0.4593.pth"):
        found = weights.resolve_ast_checkpoint(name, tmp_path / "cache")
        assert (found.path, found.source) == (str(modules_dir / "audioset_10_10_0.4593.pth"), "path")
    assert server.requests == []


def test_local_clip_copy_must_have_the_published_sha256(tmp_path, clip_release):
    """modules/ViT-B-32.pt (or any file of that name) that is not the release is refused, naming
    the file, both hashes and the flag that accepts it anyway."""
    _, _, modules_dir = clip_release
    (modules_dir / "ViT-B-32.pt").write_bytes(b"a re-saved copy")
    with pytest.raises(weights.WeightsError) as err:
        weights.resolve_clip_checkpoint("ViT-B/32", tmp_path / "cache")
    message = str(err.value)
    assert str(modules_dir / "ViT-B-32.pt") in message and "--allow_unlisted_weights" in message
    assert weights.CLIP_RELEASES["ViT-B/32"].sha256 in message
    accepted = weights.resolve_clip_checkpoint("ViT-B/32", tmp_path / "cache", allow_unlisted=True)
    assert accepted.path == str(modules_dir / "ViT-B-32.pt") and accepted.sha256 == sha(b"a re-saved copy")
    elsewhere = tmp_path / "mine" / "ViT-B-32.pt"  # a path named like the release is checked too
    elsewhere.parent.mkdir()
    elsewhere.write_bytes(b"a re-saved copy")
    with pytest.raises(weights.WeightsError, match="not the released ViT-B-32.pt"):
        weights.resolve_clip_checkpoint(str(elsewhere), tmp_path / "cache")
    other = tmp_path / "mine" / "finetuned_clip.pt"  # any other file name: used as given
    other.write_bytes(b"a fine-tuned model")
    assert weights.resolve_clip_checkpoint(str(other), tmp_path / "cache").source == "path"


def test_gitignore_covers_every_suggested_weights_location():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    suggested = ["modules/ViT-B-32.pt", "modules/ViT-B-16.pt", f"modules/{weights.AST_RELEASE.file_name}",
                 f"modules/{weights.AST_RELEASE.file_name}{weights.RECORD_SUFFIX}", "modules/ViT-B-32.pt.part"]
    result = subprocess.run(["git", "check-ignore", *suggested], cwd=root, capture_output=True, text=True)
    assert sorted(result.stdout.split()) == sorted(suggested)
