"""Released weights: found locally, or fetched into a cache and verified (docs/design.md §1, §11).

Where a released file is looked for, in order:

1. the path the flag names (``modules/ViT-B-32.pt``, ``modules/audioset_10_10_0.4593.pth``,
   or any file), as documented before this module existed: it always takes precedence;
2. the weights cache: ``$AVIGATE_CACHE``, else ``$XDG_CACHE_HOME/avigate``, else
   ``~/.cache/avigate`` (``--weights_cache`` overrides all three), as ``clip/ViT-B-32.pt``,
   ``clip/ViT-B-16.pt`` and ``ast/audioset_10_10_0.4593.pth``;
3. a download into that cache, unless offline (``--offline`` or ``AVIGATE_OFFLINE=1``): then
   the error names the URL and the exact path to put the file at.

Downloads resume an interrupted transfer (HTTP Range) from ``<file>.part``, show a tqdm bar,
and only a complete, verified file is renamed to its final name. Verification:

- OpenAI CLIP: the release URL carries the file's SHA-256 (openai/CLIP ``clip/clip.py``,
  ``_MODELS``); the download must match it.
- AST AudioSet checkpoint: no checksum is published (github.com/YuanGongND/ast README,
  "Pretrained Models", links the Dropbox file). The file must load as a tensor-only state
  dict with every ``module.v.*`` trunk key of the DeiT-base 384 AST at its full shape and
  the 527-class ``module.mlp_head``; its SHA-256 is then recorded next to it
  (``<file>.sha256.json``) and every later run compares the file against that record.

Each resolver returns a ``ResolvedWeights`` (path, SHA-256, where it came from, URL) for the
run to record.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import http.client
import json
import os
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from typing import Callable, Iterator, Mapping, Optional, Union

from tqdm import tqdm

from atomic_io import write_json

PathLike = Union[str, os.PathLike]

MODULES_DIR = os.path.dirname(os.path.abspath(__file__))
CACHE_ENV = "AVIGATE_CACHE"
OFFLINE_ENV = "AVIGATE_OFFLINE"
# Help of the --weights_cache / --offline flags, shared by every entry point that resolves weights.
WEIGHTS_CACHE_HELP = (f"where released weights are downloaded (default: ${CACHE_ENV}, else "
                      "$XDG_CACHE_HOME/avigate, else ~/.cache/avigate)")
OFFLINE_HELP = f"never download weights (also ${OFFLINE_ENV}=1)"
CACHE_APP_DIR = "avigate"
PART_SUFFIX = ".part"
LOCK_SUFFIX = ".lock"
RECORD_SUFFIX = ".sha256.json"
CHUNK_BYTES = 1 << 20
HASH_PROGRESS_BYTES = 1 << 30  # files from this size on show a progress bar while hashed
TIMEOUT_S = 60
RETRIES = 3  # reconnections per download, each resuming where the last one stopped
USER_AGENT = "avigate-weights/1"
HTTP_PARTIAL_CONTENT = 206
HTTP_RANGE_NOT_SATISFIABLE = 416


@dataclass(frozen=True)
class Release:
    """A released weight file.

    Args:
        file_name: its name, in ``modules/`` and in the cache.
        cache_subdir: folder under the weights cache.
        url: where its authors publish it.
        sha256: published SHA-256, or None when none is published (then recorded at download).
    """

    file_name: str
    cache_subdir: str
    url: str
    sha256: Optional[str] = None


# openai/CLIP clip/clip.py (_MODELS): the second-to-last URL path component is the SHA-256.
CLIP_RELEASES = {
    "ViT-B/32": Release(
        "ViT-B-32.pt", "clip",
        "https://openaipublic.azureedge.net/clip/models/"
        "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af/ViT-B-32.pt",
        "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af"),
    "ViT-B/16": Release(
        "ViT-B-16.pt", "clip",
        "https://openaipublic.azureedge.net/clip/models/"
        "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f/ViT-B-16.pt",
        "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f"),
}
# github.com/YuanGongND/ast README, "Pretrained Models" item 1: "Full AudioSet, 10 tstride,
# 10 fstride, with Weight Averaging (0.459 mAP)". No checksum is published.
AST_RELEASE = Release("audioset_10_10_0.4593.pth", "ast",
                      "https://www.dropbox.com/s/ca0b1v2nlxzyeb4/audioset_10_10_0.4593.pth?dl=1")
AUDIOSET_CLASSES = 527


class WeightsError(RuntimeError):
    """A weight file could not be found, fetched or verified; the message says what to do."""


@dataclass(frozen=True)
class ResolvedWeights:
    """Where a weight file was found.

    Args:
        path: the file to load.
        sha256: its SHA-256 (hex).
        source: "path" (the given path or modules/), "cache" or "download".
        url: the release URL when the file is a known release, else None.
    """

    path: str
    sha256: str
    source: str
    url: Optional[str] = None

    def record(self) -> dict:
        """JSON-ready form for run records and checkpoints."""
        return asdict(self)


def default_cache_dir(environ: Mapping[str, str] = os.environ) -> str:
    """$AVIGATE_CACHE, else $XDG_CACHE_HOME/avigate, else ~/.cache/avigate."""
    if environ.get(CACHE_ENV):
        return os.path.expanduser(environ[CACHE_ENV])
    base = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, CACHE_APP_DIR)


def offline_by_default(environ: Mapping[str, str] = os.environ) -> bool:
    """True when AVIGATE_OFFLINE is set to a true value (1, true, yes)."""
    return environ.get(OFFLINE_ENV, "").strip().lower() in ("1", "true", "yes")


def file_sha256(path: PathLike) -> str:
    """SHA-256 (hex) of a file, with a progress bar for large ones (hashing 13 GB takes a while)."""
    digest = hashlib.sha256()
    size = os.path.getsize(path)
    with open(path, "rb") as handle, tqdm(total=size, unit="B", unit_scale=True, unit_divisor=1024,
                                          desc=f"sha256 {os.path.basename(path)}",
                                          disable=size < HASH_PROGRESS_BYTES) as bar:
        for block in iter(lambda: handle.read(CHUNK_BYTES), b""):
            digest.update(block)
            bar.update(len(block))
    return digest.hexdigest()


# ----------------------------------------------------------------------------- SHA-256 records

def record_path(path: PathLike) -> str:
    return os.fspath(path) + RECORD_SUFFIX


def _stamp(path: str) -> dict:
    stat = os.stat(path)
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def write_sha256_record(path: PathLike, sha256: str, url: Optional[str]) -> None:
    """Record a verified file's SHA-256 (with its size and mtime) next to it, atomically."""
    path = os.fspath(path)
    payload = {"file": os.path.basename(path), "sha256": sha256, "url": url, **_stamp(path)}
    write_json(record_path(path), payload, indent=1)


def checked_sha256(path: PathLike) -> Optional[str]:
    """SHA-256 of a file that has a record next to it, compared against the record.

    The file is re-hashed only when its size or mtime changed since the record was written.
    Returns None when there is no record; raises WeightsError when the file no longer
    matches it.
    """
    path = os.fspath(path)
    if not os.path.isfile(record_path(path)):
        return None
    with open(record_path(path)) as handle:
        record = json.load(handle)
    if {k: record.get(k) for k in ("size", "mtime_ns")} == _stamp(path):
        return record["sha256"]
    actual = file_sha256(path)
    if actual != record["sha256"]:
        raise WeightsError(
            f"{path} has SHA-256 {actual}, but {record_path(path)} recorded {record['sha256']} when it "
            f"was verified: the file changed. Delete both files to fetch it again"
            + (f" from {record['url']}" if record.get("url") else "") + ".")
    write_sha256_record(path, actual, record.get("url"))  # touched but identical: refresh the stamp
    return actual


# ----------------------------------------------------------------------------- downloads

def unavailable_message(url: str, dest: str, reason: str) -> str:
    return (f"{reason}: cannot fetch {url}. Download it yourself and put it at {dest} "
            f"(that exact path), or rerun with network access.")


@contextlib.contextmanager
def file_lock(path: str) -> Iterator[None]:
    """An exclusive lock on ``path`` + ".lock": torchrun ranks sharing a cache download once."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + LOCK_SUFFIX, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _open(url: str, offset: int, timeout: float):
    """The response for ``url`` from byte ``offset`` on; None when nothing is left to send."""
    headers = {"User-Agent": USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code == HTTP_RANGE_NOT_SATISFIABLE and offset:
            return None
        raise


def _receive(response, part: str, offset: int, desc: str) -> Optional[int]:
    """Append the body to ``part`` (restarting it if the server ignored the Range request).

    Returns the expected full size when the server announced one.
    """
    if offset and response.status != HTTP_PARTIAL_CONTENT:
        offset = 0  # the server sent the whole file: start the .part over
    length = response.headers.get("Content-Length")
    total = offset + int(length) if length is not None else None
    with open(part, "ab" if offset else "wb") as handle, \
            tqdm(total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024, desc=desc) as bar:
        for block in iter(lambda: response.read(CHUNK_BYTES), b""):
            handle.write(block)
            bar.update(len(block))
    return total


def _transfer(url: str, part: str, timeout: float, desc: str) -> None:
    """Fill ``part`` with the whole body of ``url``, resuming and reconnecting up to RETRIES times."""
    for attempt in range(RETRIES + 1):
        offset = os.path.getsize(part) if os.path.isfile(part) else 0
        try:
            response = _open(url, offset, timeout)
            if response is None:
                return
            with response:
                total = _receive(response, part, offset, desc)
            size = os.path.getsize(part)
            if total is None or size == total:
                return
            error: Exception = WeightsError(f"{url} ended after {size} of {total} bytes")
        except urllib.error.HTTPError as err:
            raise WeightsError(unavailable_message(url, part[:-len(PART_SUFFIX)], f"HTTP {err.code} {err.reason}"))
        except (urllib.error.URLError, http.client.HTTPException, OSError) as err:
            error = err
        if attempt == RETRIES:
            kept = os.path.getsize(part) if os.path.isfile(part) else 0
            reason = (f"download interrupted ({error}); {kept} bytes are kept in {part} and a rerun resumes there"
                      if kept else f"network error ({error})")
            raise WeightsError(unavailable_message(url, part[:-len(PART_SUFFIX)], reason))


def download(url: str, dest: PathLike, expected_sha256: Optional[str] = None, offline: bool = False,
             verify: Optional[Callable[[str], None]] = None, timeout: float = TIMEOUT_S) -> str:
    """Fetch ``url`` into ``dest`` through ``dest.part``; returns the file's SHA-256.

    Resumes a ``.part`` left by an earlier attempt. Nothing appears under ``dest`` unless the
    transfer is complete, non-empty, matches ``expected_sha256`` (when given) and passes
    ``verify(part_path)`` (when given); a ``.part`` failing any check is deleted.
    """
    dest = os.fspath(dest)
    if offline:
        raise WeightsError(unavailable_message(url, dest, "offline (--offline or AVIGATE_OFFLINE=1)"))
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    part = dest + PART_SUFFIX
    _transfer(url, part, timeout, os.path.basename(dest))
    try:
        if os.path.getsize(part) == 0:
            raise WeightsError(f"{url} sent an empty file (0 bytes); nothing was written to {dest}. "
                               f"Check the URL, or download it yourself and put it at {dest}.")
        sha256 = file_sha256(part)
        if expected_sha256 is not None and sha256 != expected_sha256:
            raise WeightsError(f"{url}: the downloaded file has SHA-256 {sha256}, expected {expected_sha256}; "
                               f"it was deleted and nothing was written to {dest}. Retry, or download it "
                               f"yourself and put it at {dest}.")
        if verify is not None:
            verify(part)
    except Exception:
        os.remove(part)
        raise
    os.replace(part, dest)
    return sha256


# ----------------------------------------------------------------------------- resolvers

def fetch_release(release: Release, cache_dir: Optional[PathLike] = None, offline: bool = False,
                  verify: Optional[Callable[[str], None]] = None) -> ResolvedWeights:
    """The cached copy of ``release``, downloaded (and verified) first when missing.

    Args:
        release: what to fetch.
        cache_dir: weights cache (default ``default_cache_dir()``).
        offline: never touch the network; a missing file is an error naming URL and path.
        verify: optional ``verify(path)`` raising WeightsError on a bad file.
    """
    dest = os.path.join(os.fspath(cache_dir or default_cache_dir()), release.cache_subdir, release.file_name)
    with file_lock(dest):
        if not os.path.isfile(dest):
            sha256 = download(release.url, dest, release.sha256, offline, verify)
            write_sha256_record(dest, sha256, release.url)
            return ResolvedWeights(dest, sha256, "download", release.url)
        sha256 = checked_sha256(dest)
        if sha256 is None:  # placed in the cache by hand: check it like a download, then record it
            sha256 = file_sha256(dest)
            if release.sha256 is not None and sha256 != release.sha256:
                raise WeightsError(f"{dest} has SHA-256 {sha256}, but {release.url} publishes {release.sha256}: "
                                   f"it is not the released {release.file_name}. Delete it to download the release.")
            if verify is not None:
                verify(dest)
            write_sha256_record(dest, sha256, release.url)
        return ResolvedWeights(dest, sha256, "cache", release.url)


def check_published_sha256(found: ResolvedWeights, release: Release, allow_unlisted: bool) -> ResolvedWeights:
    """A local file presented as ``release`` (its name) must have the published SHA-256, unless
    ``allow_unlisted`` (--allow_unlisted_weights) accepts another file under that name."""
    if release.sha256 is None or found.sha256 == release.sha256 or allow_unlisted:
        return found
    raise WeightsError(f"{found.path} has SHA-256 {found.sha256}, but {release.url} publishes {release.sha256}: "
                       f"it is not the released {release.file_name}. Delete or rename it to use the release "
                       f"(fetched into the weights cache), or pass --allow_unlisted_weights to use this file anyway.")


def resolve_clip_checkpoint(name_or_path: PathLike, cache_dir: Optional[PathLike] = None,
                            offline: bool = False, allow_unlisted: bool = False) -> ResolvedWeights:
    """``--pretrained_clip_name``: "ViT-B/32" / "ViT-B/16" or a file path.

    A released name is ``modules/<file>`` when that exists, else the cached (or freshly
    downloaded, SHA-256-checked) release. A path is used as given. A local file carrying a
    release's file name (``modules/ViT-B-32.pt``, ``/any/ViT-B-16.pt``) must have its published
    SHA-256 unless ``allow_unlisted``.
    """
    name = os.fspath(name_or_path)
    release = CLIP_RELEASES.get(name)
    if release is None:
        found = _given(name, "CLIP checkpoint", f"Pass one of {sorted(CLIP_RELEASES)} to use OpenAI's release "
                       "(found in modules/ or the weights cache, else downloaded), or the path of a CLIP "
                       "archive or state dict.")
        named = [r for r in CLIP_RELEASES.values() if r.file_name == os.path.basename(name)]
        return check_published_sha256(found, named[0], allow_unlisted) if named else found
    local = os.path.join(MODULES_DIR, release.file_name)
    if os.path.isfile(local):
        return check_published_sha256(ResolvedWeights(local, file_sha256(local), "path", release.url), release,
                                      allow_unlisted)
    return fetch_release(release, cache_dir, offline)


def is_default_ast_checkpoint(path: PathLike) -> bool:
    """The released name alone, or modules/<released name> (the flag's and run.sh's default)."""
    path = os.path.normpath(os.fspath(path))
    name = AST_RELEASE.file_name
    return path in (name, os.path.join("modules", name)) or os.path.abspath(path) == os.path.join(MODULES_DIR, name)


def resolve_ast_checkpoint(path: PathLike, cache_dir: Optional[PathLike] = None,
                           offline: bool = False) -> ResolvedWeights:
    """``--ast_checkpoint``: an existing file is used as given; the default released file
    (``modules/audioset_10_10_0.4593.pth`` or its bare name) falls back to the cache / a download."""
    path = os.fspath(path)
    if os.path.isfile(path) or not is_default_ast_checkpoint(path):
        return _given(path, "AST checkpoint", f"Leave --ast_checkpoint at its default to use the released "
                      f"{AST_RELEASE.file_name} (found in modules/ or the weights cache, else downloaded from "
                      f"{AST_RELEASE.url}).")
    local = os.path.join(MODULES_DIR, AST_RELEASE.file_name)
    if os.path.isfile(local):
        return ResolvedWeights(local, file_sha256(local), "path", AST_RELEASE.url)
    return fetch_release(AST_RELEASE, cache_dir, offline, verify=verify_audioset_checkpoint)


def _given(path: str, what: str, hint: str) -> ResolvedWeights:
    if not os.path.isfile(path):
        raise WeightsError(f"{what} not found: {path}. {hint}")
    return ResolvedWeights(path, file_sha256(path), "path")


def expected_audioset_shapes(cfg=None) -> dict:
    """Every key of the released AudioSet checkpoint the trunk needs, with its shape.

    The released trunk (``cfg`` None) is DeiT-base 384 distilled over a 128 x 1024 fbank with
    stride 10 (docs/design.md §1): ``module.v.*`` of ``AST(ASTConfig())`` built on the meta device,
    plus the AudioSet classifier ``module.mlp_head.1.weight`` [527, 768].
    """
    import torch  # lazily: resolving a path must not pay for torch/timm at import time

    from modules.ast import AST, DATAPARALLEL_PREFIX, TRUNK_PREFIX, ASTConfig

    with torch.device("meta"):
        trunk = AST(cfg or ASTConfig())
    shapes = {f"{DATAPARALLEL_PREFIX}{TRUNK_PREFIX}{k}": tuple(v.shape) for k, v in trunk.state_dict().items()}
    shapes[f"{DATAPARALLEL_PREFIX}mlp_head.1.weight"] = (AUDIOSET_CLASSES, trunk.cfg.embed_dim)
    return shapes


def verify_audioset_checkpoint(path: PathLike) -> None:
    """Raise WeightsError unless ``path`` loads as the released AudioSet checkpoint (keys, shapes)."""
    import pickle

    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as err:
        raise WeightsError(f"{path} does not load as a PyTorch state dict ({type(err).__name__}: {err}); "
                           f"expected {AST_RELEASE.file_name} from {AST_RELEASE.url}") from err
    if not isinstance(state, dict):
        raise WeightsError(f"{path} holds a {type(state).__name__}, not the AudioSet checkpoint's state dict")
    expected = expected_audioset_shapes()
    missing = sorted(k for k in expected if k not in state)
    wrong = [f"{k} {tuple(state[k].shape)} (expected {expected[k]})"
             for k in expected if k in state and tuple(state[k].shape) != expected[k]]
    if missing or wrong:
        raise WeightsError(f"{path} is not the released AudioSet checkpoint: missing keys {missing[:5]}"
                           f"{' ...' if len(missing) > 5 else ''}; wrong shapes {wrong[:5]}")
