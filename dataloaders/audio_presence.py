"""Which videos of a split have a wav, before any work: missing audio is counted and loud.

A video without ``<audio_dir>/<video_id>.wav`` is either expected (its video has no
soundtrack: MSR-VTT has 418 of 10,000) or a mistake (a misspelled folder, an extraction
that stopped). ``preprocess/extract_audio.py`` lists the first kind in
``<audio_dir>/extract_audio_report.json`` ("no_audio") and ``preprocess/prepare_data.py`` in
``videos_without_audio.txt`` (in the audio folder or the folder above it); every other
missing wav counts as missing. Above ``max_missing`` (a fraction of the split) the run
stops, naming the count and the first paths. Unreadable wavs are found when loaded
(``--on_bad_audio``, counted by ``dataloaders.audio.AudioIssueCounter``).
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Iterable, List, Sequence

logger = logging.getLogger(__name__)

DEFAULT_MAX_MISSING = 0.05
EXTRACT_REPORT = "extract_audio_report.json"   # preprocess/extract_audio.py, key "no_audio"
NO_AUDIO_LIST = "videos_without_audio.txt"      # preprocess/prepare_data.py
PATHS_SHOWN = 5


class MissingAudioError(FileNotFoundError):
    """Too many videos of a split lack their wav; the message gives the count and the first paths."""


@dataclass
class AudioPresence:
    """Counts of one split's wavs.

    Args:
        audio_dir: the folder looked in.
        total: videos of the split.
        found: videos with a wav.
        no_soundtrack: videos without a wav that are listed as having no soundtrack.
        missing: paths of the other wavs that do not exist.
    """

    audio_dir: str
    total: int
    found: int
    no_soundtrack: int
    missing: List[str] = field(default_factory=list)

    def summary(self) -> str:
        return (f"audio in {self.audio_dir}: {self.found} of {self.total} videos have a wav, "
                f"{self.no_soundtrack} have no soundtrack (listed by the extraction), "
                f"{len(self.missing)} wav files are missing")


def listed_without_soundtrack(audio_dir: str) -> set:
    """Video ids the extraction found without an audio stream (empty when it left no list)."""
    ids: set = set()
    report = os.path.join(audio_dir, EXTRACT_REPORT)
    if os.path.isfile(report):
        with open(report) as handle:
            try:
                ids.update(json.load(handle).get("no_audio", []))
            except (json.JSONDecodeError, AttributeError) as err:
                raise ValueError(f"{report} is not an extract_audio report ({err}); delete it or rerun "
                                 f"preprocess/extract_audio.py") from err
    for folder in (audio_dir, os.path.dirname(os.path.abspath(audio_dir))):
        listing = os.path.join(folder, NO_AUDIO_LIST)
        if os.path.isfile(listing):
            with open(listing) as handle:
                ids.update(line.strip() for line in handle if line.strip())
    return ids


def audio_presence(video_ids: Sequence[str], audio_dir: str, extension: str = ".wav") -> AudioPresence:
    """Count the wavs of ``video_ids`` in ``audio_dir``."""
    present = set(os.listdir(audio_dir))
    silent = listed_without_soundtrack(audio_dir)
    absent = [v for v in video_ids if v + extension not in present]
    missing = [os.path.join(audio_dir, v + extension) for v in absent if v not in silent]
    return AudioPresence(audio_dir, len(video_ids), len(video_ids) - len(absent), len(absent) - len(missing),
                         missing)


def check_audio_presence(video_ids: Iterable[str], audio_dir: str, max_missing: float, what: str,
                         flag: str = "--audio_path", extension: str = ".wav") -> AudioPresence:
    """Count the wavs of ``video_ids`` (logged), and stop when none is found or more than
    ``max_missing`` of them are missing (not listed as without soundtrack).

    Args:
        video_ids: the split's videos.
        audio_dir: the audio folder.
        max_missing: largest tolerated fraction of missing wavs (1: never stop, unless none exists).
        what: the split's name, for the messages.
        flag: the flag that named ``audio_dir``.
        extension: audio file extension, with its dot.
    """
    ids = list(video_ids)
    if not os.path.isdir(audio_dir):
        raise MissingAudioError(f"{flag} {audio_dir}: no such folder (expected <video_id>{extension} files)")
    presence = audio_presence(ids, audio_dir, extension)
    logger.info("%s: %s", what, presence.summary())
    shown = ", ".join(presence.missing[:PATHS_SHOWN]) + (" ..." if len(presence.missing) > PATHS_SHOWN else "")
    if ids and presence.found == 0 and presence.no_soundtrack < len(ids):
        raise MissingAudioError(f"{flag} {audio_dir}: none of the {len(ids)} videos of {what} has its "
                                f"<video_id>{extension} there (first: {shown}); is the folder right? "
                                f"(preprocess/extract_audio.py writes them)")
    if ids and len(presence.missing) > max_missing * len(ids):
        raise MissingAudioError(
            f"{flag} {audio_dir}: {len(presence.missing)} of {len(ids)} videos of {what} have no "
            f"{extension} file (more than --max_missing_audio {max_missing:g}); first: {shown}. Extract them "
            f"(preprocess/extract_audio.py, which also lists videos without a soundtrack), or raise "
            f"--max_missing_audio to run with the zero input for them")
    if presence.missing:
        logger.warning("%s: %d wav files missing (zero audio input used for them), e.g. %s", what,
                       len(presence.missing), shown)
    return presence
