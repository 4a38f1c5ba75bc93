"""Batch plumbing shared by the preprocessing scripts (extract_audio, compress_video).

Each script supplies one conversion function ``convert(job) -> Outcome``; this module
finds the videos, skips outputs that already exist (resumable), runs the conversions in
a process pool with a progress bar, turns exceptions into "failed" entries, and writes a
JSON report. Outputs are written through ``atomic_io.atomic_path``, so an interrupted run
never leaves a half-written file under a final name.
"""
from __future__ import annotations

import argparse
import functools
import multiprocessing
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Tuple

from tqdm import tqdm

from atomic_io import write_json

VIDEO_EXTENSIONS = (".mp4", ".webm", ".mkv")


@dataclass(frozen=True)
class MediaJob:
    """One video to convert.

    Args:
        video_id: file name without extension; names the output.
        source: input video path.
        target: final output path.
        options: script settings (sample rate, fps ...), plain picklable values.
    """

    video_id: str
    source: str
    target: str
    options: Dict[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class Outcome:
    """What a conversion did: wrote an output, and whether the video had audio."""

    written: bool
    has_audio: bool


@dataclass(frozen=True)
class JobResult:
    """Per-video line of the report. status: written | skipped | no_output | failed."""

    video_id: str
    source: str
    status: str
    has_audio: bool = True
    error: str = ""


def find_videos(video_dir: str) -> List[Tuple[str, str]]:
    """(video_id, path) for every video under ``video_dir`` (recursive), sorted by id."""
    if not os.path.isdir(video_dir):
        raise FileNotFoundError(f"--video_dir {video_dir} is not a directory")
    found: Dict[str, str] = {}
    for root, _, files in os.walk(video_dir):
        for name in files:
            stem, ext = os.path.splitext(name)
            # Hidden files are our own temporaries (and macOS "._" resource forks).
            if ext.lower() not in VIDEO_EXTENSIONS or name.startswith("."):
                continue
            path = os.path.join(root, name)
            if stem in found:
                raise ValueError(f"two videos share the id {stem!r}: {found[stem]} and {path}; "
                                 f"rename one, outputs are named by id")
            found[stem] = path
    return sorted(found.items())


def _run_one(convert: Callable[[MediaJob], Outcome], job: MediaJob) -> JobResult:
    """Run one conversion; a failure becomes a report entry instead of stopping the batch."""
    if os.path.exists(job.target):
        return JobResult(job.video_id, job.source, "skipped")
    try:
        outcome = convert(job)
    except Exception as err:  # noqa: BLE001 - any decoder/encoder error is reported per file
        return JobResult(job.video_id, job.source, "failed", error=f"{type(err).__name__}: {err}")
    status = "written" if outcome.written else "no_output"
    return JobResult(job.video_id, job.source, status, has_audio=outcome.has_audio)


def run_jobs(convert: Callable[[MediaJob], Outcome], jobs: List[MediaJob], workers: int,
             desc: str) -> List[JobResult]:
    """Run ``convert`` (a module-level function) on every job; workers <= 1 runs in-process."""
    run = functools.partial(_run_one, convert)
    if workers <= 1:
        return [run(job) for job in tqdm(jobs, desc=desc)]
    with multiprocessing.Pool(workers) as pool:
        return list(tqdm(pool.imap_unordered(run, jobs), total=len(jobs), desc=desc))


def build_report(results: List[JobResult], settings: Dict[str, object]) -> Dict[str, object]:
    """JSON-ready summary: counts, videos without audio, failed files with their error."""
    counts = {status: sum(r.status == status for r in results)
              for status in ("written", "skipped", "no_output", "failed")}
    return {
        "settings": settings,
        "total": len(results),
        "counts": counts,
        "no_audio": sorted(r.video_id for r in results if r.status != "failed" and not r.has_audio),
        "failed": [{"video_id": r.video_id, "path": r.source, "error": r.error}
                   for r in sorted(results, key=lambda r: r.video_id) if r.status == "failed"],
    }


def base_parser(description: str, output_flag: str, output_help: str) -> argparse.ArgumentParser:
    """Flags every preprocessing script has: input folder, output folder, workers, report."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--video_dir", required=True, help="folder with <video_id>.mp4/.webm/.mkv")
    parser.add_argument(output_flag, required=True, help=output_help)
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 1) // 2),
                        help="worker processes (1 = run in this process)")
    parser.add_argument("--report", default=None,
                        help="JSON report path (default: <output dir>/<script>_report.json)")
    return parser


def run_batch(convert: Callable[[MediaJob], Outcome], video_dir: str, output_dir: str,
              output_ext: str, workers: int, report_path: str,
              options: Dict[str, object], desc: str) -> Dict[str, object]:
    """Convert every video of ``video_dir`` into ``output_dir/<video_id><output_ext>``.

    Returns the report, also written to ``report_path``.
    """
    os.makedirs(output_dir, exist_ok=True)
    jobs = [MediaJob(video_id, path, os.path.join(output_dir, video_id + output_ext), options)
            for video_id, path in find_videos(video_dir)]
    results = run_jobs(convert, jobs, workers, desc)
    report = build_report(results, {"video_dir": video_dir, "output_dir": output_dir, **options})
    write_json(report_path, report)
    print(f"{desc}: {report['counts']}, {len(report['no_audio'])} without audio; report: {report_path}")
    return report
