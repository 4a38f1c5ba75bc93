"""Pieces shared by preprocess/prepare_data.py and the per-dataset sources (source_*.py):
the error type, downloadable source files, annotation results, and zip handling.

Archives are read with ``zipfile``: a file that is not a zip (truncated, an HTML error page,
zero bytes) is refused when opened, and every member is CRC-checked as it is extracted, so
a corrupt archive is always an error naming the archive (and member), never a silent gap.
Extraction is flat (``<out_dir>/<member base name>``), atomic per file (a temporary name,
then a rename) and resumable (a file already there with the member's size is kept).
"""
from __future__ import annotations

import os
import shutil
import zipfile
import zlib
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence

from tqdm import tqdm

from atomic_io import atomic_path

COPY_CHUNK_BYTES = 1 << 20
NAMES_SHOWN = 5


class PrepareError(RuntimeError):
    """Input the preparation cannot go past; the message names the file and what to do."""


@dataclass(frozen=True)
class SourceFile:
    """A file of the public release, fetched into the archives folder.

    Args:
        name: file name (in the archives folder and at the end of ``url``).
        url: where the release publishes it.
        what: one line for messages (what the file holds and where the URL is documented).
    """

    name: str
    url: str
    what: str


@dataclass
class AnnotationResult:
    """What a source wrote for the loaders.

    Args:
        files: DataConfig/main flag name -> annotation file name under data_path
            ("train_file", "eval_file").
        video_ids: every video the written files reference, in first-seen order.
        counts: named counts for the final check (e.g. "train_entries").
        skipped: reason -> ids left out (counted, reported skips).
        notes: conventions used, for the report.
    """

    files: Dict[str, str]
    video_ids: List[str]
    counts: Dict[str, int]
    skipped: Dict[str, List[str]] = field(default_factory=dict)
    notes: List[str] = field(default_factory=list)


def shown(names: Sequence[str]) -> str:
    """The first few names and how many more, for messages."""
    head = ", ".join(map(str, names[:NAMES_SHOWN]))
    return head + (f" ... ({len(names)} in all)" if len(names) > NAMES_SHOWN else "")


def require_source(path: str, source: SourceFile) -> None:
    """The file exists and is not empty, else an error saying where to get it."""
    if not os.path.isfile(path):
        raise PrepareError(f"{source.name} ({source.what}) not found at {path}: download it from {source.url} "
                           f"and put it there, or rerun with --download")
    if os.path.getsize(path) == 0:
        raise PrepareError(f"{path} is empty (0 bytes): a failed download. Delete it and rerun with --download, "
                           f"or fetch it again from {source.url}")


def open_zip(path: str) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as err:
        raise PrepareError(f"{path} is not a readable zip archive ({err}): the download is corrupt or "
                           f"incomplete. Delete it and rerun with --download") from err


def check_zip_crc(archive: zipfile.ZipFile, path: str) -> None:
    """CRC-check every member (for small archives; large ones are checked as they unpack)."""
    try:
        bad = archive.testzip()
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as err:
        bad = f"({err})"
    if bad is not None:
        raise PrepareError(f"{path} is corrupt (member {bad} fails its CRC check). Delete it and rerun "
                           f"with --download")


def members_named(archive: zipfile.ZipFile, path: str, names: Iterable[str]) -> Dict[str, zipfile.ZipInfo]:
    """The member with each base name (anywhere in the archive); a missing one is an error."""
    by_name: Dict[str, zipfile.ZipInfo] = {}
    for info in archive.infolist():
        if not info.is_dir():
            by_name.setdefault(os.path.basename(info.filename), info)
    missing = [n for n in names if n not in by_name]
    if missing:
        raise PrepareError(f"{path} lacks {missing} (the public release ships them); it holds "
                           f"{shown(sorted(by_name))}. Re-download it, or check that it is the right archive")
    return {n: by_name[n] for n in names}


def members_under(archive: zipfile.ZipFile, path: str, prefix: str,
                  suffixes: Sequence[str]) -> List[zipfile.ZipInfo]:
    """Members directly under ``prefix`` with one of ``suffixes``; none at all is an error."""
    found = [info for info in archive.infolist()
             if not info.is_dir() and os.path.dirname(info.filename) + "/" == prefix
             and info.filename.lower().endswith(tuple(suffixes))]
    if not found:
        raise PrepareError(f"{path} has no {'/'.join(suffixes)} files under {prefix!r}, where the public "
                           f"release keeps them; it is not the expected archive (or is incomplete)")
    return found


def extract_flat(archive: zipfile.ZipFile, path: str, members: Sequence[zipfile.ZipInfo], out_dir: str,
                 desc: str) -> Dict[str, int]:
    """Extract ``members`` as ``out_dir/<base name>``; returns {"extracted": n, "kept": n}."""
    os.makedirs(out_dir, exist_ok=True)
    counts = {"extracted": 0, "kept": 0}
    for info in tqdm(members, desc=desc, unit="file"):
        target = os.path.join(out_dir, os.path.basename(info.filename))
        if os.path.isfile(target) and os.path.getsize(target) == info.file_size:
            counts["kept"] += 1
            continue
        try:
            with atomic_path(target) as tmp, archive.open(info) as source, open(tmp, "wb") as sink:
                shutil.copyfileobj(source, sink, COPY_CHUNK_BYTES)
        except (zipfile.BadZipFile, zlib.error, EOFError) as err:
            raise PrepareError(f"{path}: member {info.filename} is corrupt ({err}). Delete the archive and "
                               f"rerun with --download") from err
        counts["extracted"] += 1
    return counts


@dataclass(frozen=True)
class Layout:
    """The folders of a prepared dataset (``--root``) and where its inputs come from.

    Args:
        root: the dataset folder.
        archives: downloaded / user-supplied release files (default ``root/archives``).
        annotations: what the loaders read (``--data_path``): ``root`` itself, so run.sh's
            defaults (DATA_PATH=data/<dataset>, VIDEO_PATH=.../videos, AUDIO_PATH=.../audio)
            find everything when ``root`` is ``data/<dataset>``.
        videos: unpacked videos (``root/videos``), or the user's own folder (``--videos``).
        videos_given: whether ``videos`` is the user's folder (no video archive is unpacked).
        compressed: 3 fps / short side 224 copies (``root/videos_3fps``, with --compress).
        audio: ``<video_id>.wav`` files (``--audio_path``): ``root/audio``.
        ast_cache: AST token cache (``--audio_feature_cache``): ``root/ast_cache``.
        frame_cache: decoded frames (``--frame_cache``): ``root/frame_cache``.
    """

    root: str
    archives: str
    annotations: str
    videos: str
    videos_given: bool
    compressed: str
    audio: str
    ast_cache: str
    frame_cache: str

    @classmethod
    def under(cls, root: str, archives: Optional[str] = None, videos: Optional[str] = None) -> "Layout":
        root = os.path.abspath(root)
        return cls(root=root, archives=os.path.abspath(archives or os.path.join(root, "archives")),
                   annotations=root,
                   videos=os.path.abspath(videos or os.path.join(root, "videos")), videos_given=videos is not None,
                   compressed=os.path.join(root, "videos_3fps"), audio=os.path.join(root, "audio"),
                   ast_cache=os.path.join(root, "ast_cache"), frame_cache=os.path.join(root, "frame_cache"))


@dataclass(frozen=True)
class DatasetOptions:
    """Per-dataset choices (prepare_data flags of the same names).

    Args:
        vatex_test_list: file with the 1,500 test video ids of the HGR split (.txt, one per
            line, or HGR's tst_names.npy).
        vatex_test_all_validation: test on all 3,000 official validation videos instead.
        charades_videos: "480" (Charades_v1_480.zip) or "original" (Charades_v1.zip).
        charades_text: "script" (one caption per video) or "descriptions" (several).
    """

    vatex_test_list: Optional[str] = None
    vatex_test_all_validation: bool = False
    charades_videos: str = "480"
    charades_text: str = "script"
