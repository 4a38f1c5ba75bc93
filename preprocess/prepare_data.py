"""From a dataset's public release to exactly the folder the loaders (and run.sh) read.

    python -m preprocess.prepare_data --dataset msrvtt --root data/msrvtt --download
    bash run.sh                                       # DATATYPE=msrvtt, data under data/msrvtt

Stages, in order. Each is idempotent: a rerun skips finished work (downloaded files,
extracted members, wavs, cached tokens) and continues an interrupted one (partial
downloads resume from ``.part`` files). A progress bar follows the stages and each stage's
files.

  fetch        the release files into <root>/archives (``--download``; otherwise they must be
               there), non-empty, their SHA-256 recorded at download and compared later
  unpack       annotations into <root>, videos into <root>/videos (every member CRC-checked)
  annotations  the files the loaders read, each listed video checked against the videos
  compress     (``--compress``) 3 fps, short side 224 copies in <root>/videos_3fps
  audio        <root>/audio/<video_id>.wav, 16 kHz mono (preprocess/extract_audio.py)
  ast_cache    frozen-AST tokens in <root>/ast_cache (preprocess/cache_audio_features.py), when an
               AST checkpoint is available (``--ast_checkpoint``; the released file is looked for
               in modules/ and the weights cache, and downloaded with ``--download``)
  frame_cache  every used video decoded once into <root>/frame_cache (preprocess/cache_frames.py),
               with run.sh's frame flags (``--max_frames``, 1 fps, uniform, 224 px, OpenCV);
               ``--no_frame_cache`` skips it (about 1.7 MiB per clip at 12 frames)
  val_split    a held-out slice of the training videos (preprocess/make_val_split.py)
  check        what came out against what the dataset should have

The result is ``<root>/prepare_report.json``: paths for the loaders, every stage's summary,
the checks (expected vs found), counted skips, the videos without a soundtrack (also
``<root>/videos_without_audio.txt``) and the command that trains on it. Exit status: 0 when
every check passes, 1 when one fails (the report says which), 2 on an error.

Dataset facts and where they come from: preprocess/source_msrvtt.py, source_vatex.py,
source_charades.py. Bad input, and what happens:
- a corrupt archive (not a zip, truncated, a member failing its CRC): error naming it;
- a missing file of the release (an archive, a split file inside one, an official annotation
  file, the VATEX test list): error naming it and where it comes from;
- a zero-byte download or archive: error, and nothing is left under the final name;
- a video id in the annotations without a video: MSR-VTT and Charades error (their archives
  ship every video); VATEX counts and reports the skip (YouTube clips disappear);
- a video whose soundtrack cannot be decoded: counted, listed in the report, and the check
  fails; likewise a video whose frames cannot be decoded (recorded in the frame cache); a video without an audio stream: listed as without soundtrack (the loaders feed AST
  the zero input for it).
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, Optional, Sequence

from tqdm import tqdm

from atomic_io import write_json
from dataloaders.audio import FbankConfig
from dataloaders.base import find_video_files
from modules import weights
from dataloaders.video import FrameSamplingConfig
from preprocess import (cache_audio_features, cache_frames, compress_video, extract_audio, make_val_split, source_charades,
                        source_msrvtt, source_vatex)
from preprocess.media import MediaJob, build_report, run_jobs
from preprocess.prepare_common import AnnotationResult, DatasetOptions, Layout, PrepareError, require_source

SOURCES = {"msrvtt": source_msrvtt, "vatex": source_vatex, "charades": source_charades}
REPORT_FILE = "prepare_report.json"
NO_AUDIO_LIST = "videos_without_audio.txt"
DEFAULT_NUM_VAL = make_val_split.DEFAULT_NUM_VAL
EXIT_OK, EXIT_CHECK_FAILED, EXIT_ERROR = 0, 1, 2


@dataclass
class Run:
    """One preparation: its inputs and what the stages have produced so far."""

    args: argparse.Namespace
    source: object  # a source_* module
    layout: Layout
    options: DatasetOptions
    annotations: Optional[AnnotationResult] = None
    report: dict = field(default_factory=dict)

    @property
    def features_path(self) -> str:
        return self.layout.compressed if self.args.compress else self.layout.videos


# ----------------------------------------------------------------------------- stages

def fetch(run: Run) -> dict:
    """Every release file present (downloaded if asked) and non-empty; SHA-256 recorded/compared."""
    files = {}
    for source in run.source.downloads(run.layout, run.options):
        path = os.path.join(run.layout.archives, source.name)
        url = run.args.mirror.rstrip("/") + "/" + source.name if run.args.mirror else source.url
        downloaded = False
        try:
            if not os.path.isfile(path) and run.args.download:
                sha256 = weights.download(url, path, offline=run.args.offline)
                weights.write_sha256_record(path, sha256, url)
                downloaded = True
            require_source(path, source)
            sha256 = weights.checked_sha256(path)
        except weights.WeightsError as err:
            raise PrepareError(str(err)) from err
        files[source.name] = {"path": path, "url": url, "bytes": os.path.getsize(path), "sha256": sha256,
                              "downloaded": downloaded, "what": source.what}
    return files


def unpack(run: Run) -> dict:
    return run.source.unpack(run.layout, run.options)


def video_ids_on_disk(folder: str) -> set:
    """Stems of the video files the loaders would find in ``folder`` (hidden temporaries excluded)."""
    if not os.path.isdir(folder):
        raise PrepareError(f"video folder {folder} not found")
    return {stem for stem in find_video_files(folder) if not stem.startswith(".")}


def annotations(run: Run) -> dict:
    result = run.source.build_annotations(run.layout, run.options, video_ids_on_disk(run.layout.videos))
    run.annotations = result
    run.report["skipped"] = {reason: {"count": len(ids), "video_ids": ids} for reason, ids in result.skipped.items()}
    return {"files": result.files, "videos_used": len(result.video_ids), "counts": result.counts,
            "skipped": {reason: len(ids) for reason, ids in result.skipped.items()}, "notes": result.notes}


def media_stage(run: Run, convert: Callable, out_dir: str, ext: str, options: dict, desc: str) -> dict:
    """Convert the used videos (only those the annotations list) into ``out_dir/<id><ext>``."""
    os.makedirs(out_dir, exist_ok=True)
    files = find_video_files(run.layout.videos)
    jobs = [MediaJob(v, files[v], os.path.join(out_dir, v + ext), options) for v in run.annotations.video_ids]
    report = build_report(run_jobs(convert, jobs, run.args.workers, desc), {"output_dir": out_dir, **options})
    write_json(os.path.join(out_dir, f"{desc}_report.json"), report)
    return report


def compress(run: Run) -> dict:
    if not run.args.compress:
        return {"skipped": "not asked (--compress)"}
    options = {"fps": compress_video.DEFAULT_FPS, "short_side": compress_video.DEFAULT_SHORT_SIDE}
    return media_stage(run, compress_video.compress_one, run.layout.compressed, ".mp4", options, "compress_video")


def audio(run: Run) -> dict:
    # From the unpacked originals, so audio is never re-encoded by the optional compression.
    options = {"sample_rate": FbankConfig.sample_rate}
    return media_stage(run, extract_audio.extract_one, run.layout.audio, ".wav", options, "extract_audio")


def ast_checkpoint(run: Run) -> Optional[weights.ResolvedWeights]:
    """The AST checkpoint to cache tokens with, or None when the released one is not at hand."""
    offline = run.args.offline or not run.args.download
    try:
        return weights.resolve_ast_checkpoint(run.args.ast_checkpoint, run.args.weights_cache, offline)
    except weights.WeightsError as err:
        if weights.is_default_ast_checkpoint(run.args.ast_checkpoint):
            run.report.setdefault("notes", []).append(f"AST token cache not built: {err}")
            return None
        raise PrepareError(str(err)) from err


def ast_cache(run: Run) -> dict:
    if run.args.no_ast_cache:
        return {"skipped": "not asked (--no_ast_cache)"}
    checkpoint = ast_checkpoint(run)
    if checkpoint is None:
        return {"skipped": "no AST checkpoint available (see notes); rerun with --download or --ast_checkpoint"}
    lists = [os.path.join(run.layout.annotations, name) for name in run.annotations.files.values()]
    workers = run.args.workers if run.args.workers > 1 else 0
    try:
        cache_audio_features.main(["--checkpoint", checkpoint.path, "--video_list", *lists,
                                   "--audio_dir", run.layout.audio, "--cache_dir", run.layout.ast_cache,
                                   "--num_workers", str(workers), "--device", run.args.device,
                                   # the check stage reports videos without audio; cache them all
                                   "--max_missing_audio", "1"])
    except ValueError as err:  # e.g. a cache started for other videos or from another checkpoint
        raise PrepareError(f"AST token cache {run.layout.ast_cache}: {err}") from err
    return {"cache_dir": run.layout.ast_cache, "checkpoint": checkpoint.record()}


def frame_cache(run: Run) -> dict:
    if run.args.no_frame_cache:
        return {"skipped": "not asked (--no_frame_cache)"}
    cfg = FrameSamplingConfig(max_frames=run.args.max_frames, image_size=run.args.image_size)
    video_files, missing = cache_frames.locate_videos(run.annotations.video_ids, run.features_path)
    try:
        summary = cache_frames.build_frame_cache(run.layout.frame_cache, video_files, cfg, run.args.workers, missing)
    except (ValueError, OSError) as err:  # a cache built with other flags; a full disk
        raise PrepareError(f"frame cache {run.layout.frame_cache}: {err}") from err
    return {**summary, "settings": asdict(cfg)}


def val_split(run: Run) -> dict:
    if run.args.num_val == 0:
        return {"skipped": "--num_val 0"}
    try:
        paths = make_val_split.make_val_split(run.args.dataset, run.layout.annotations, run.args.num_val,
                                              run.args.seed)
    except ValueError as err:
        raise PrepareError(f"held-out validation split: {err}") from err
    return {name: os.path.basename(path) for name, path in paths.items()}


def expected_counts(run: Run) -> Dict[str, int]:
    expected = dict(run.source.EXPECTED)
    if run.source is source_vatex and run.options.vatex_test_all_validation:
        expected["test_list_videos"] = source_vatex.EXPECTED_ALL_VALIDATION_TEST
    return expected


def check(run: Run) -> dict:
    """Counts against the dataset's, decoding failures, and the videos without a soundtrack."""
    found = run.annotations.counts
    checks = [{"name": name, "expected": value, "found": found.get(name), "ok": found.get(name) == value}
              for name, value in expected_counts(run).items()]
    stages = run.report["stages"]
    for stage in ("audio", "compress"):
        failed = stages[stage].get("failed")
        if failed is not None:
            checks.append({"name": f"{stage}_failures", "expected": 0, "found": len(failed), "ok": not failed,
                           "video_ids": [f["video_id"] for f in failed]})
    unreadable = stages["frame_cache"].get("unreadable")
    if unreadable is not None:
        checks.append({"name": "frame_decode_failures", "expected": 0, "found": len(unreadable),
                       "ok": not unreadable, "video_ids": sorted(unreadable)})
    silent = stages["audio"]["no_audio"]
    with open(os.path.join(run.layout.root, NO_AUDIO_LIST), "w") as handle:
        handle.writelines(f"{v}\n" for v in silent)
    run.report["no_soundtrack"] = {"count": len(silent), "video_ids": silent}
    run.report["ok"] = all(c["ok"] for c in checks)
    return {"checks": checks, "ok": run.report["ok"]}


STAGES = (("fetch", fetch), ("unpack", unpack), ("annotations", annotations), ("compress", compress),
          ("audio", audio), ("ast_cache", ast_cache), ("frame_cache", frame_cache), ("val_split", val_split),
          ("check", check))


# ----------------------------------------------------------------------------- report

def loader_paths(run: Run) -> dict:
    """What main_task_retrieval.py / run.sh read, as prepared."""
    stages = run.report["stages"]
    paths = {"data_path": run.layout.annotations, "features_path": run.features_path,
             "audio_path": run.layout.audio, **(run.annotations.files if run.annotations else {})}
    if stages.get("ast_cache", {}).get("cache_dir"):
        paths["audio_feature_cache"] = run.layout.ast_cache
    if stages.get("frame_cache", {}).get("cache_dir"):
        paths["frame_cache"] = run.layout.frame_cache
    if stages.get("val_split", {}).get("eval_file"):
        paths["val_train_file"] = stages["val_split"]["train_file"]
        paths["val_file"] = stages["val_split"]["eval_file"]
    return paths


def run_command(run: Run, paths: dict) -> str:
    """The run.sh call that trains on the prepared data."""
    env = [f"DATATYPE={run.args.dataset}", f"DATA_PATH={paths['data_path']}",
           f"VIDEO_PATH={paths['features_path']}", f"AUDIO_PATH={paths['audio_path']}"]
    if "val_file" in paths:
        env += [f"TRAIN_CSV={paths['val_train_file']}", f"VAL_CSV={paths['val_file']}"]
    extra = [f"--audio_feature_cache {paths['audio_feature_cache']}"] if "audio_feature_cache" in paths else []
    if "frame_cache" in paths:
        extra.append(f"--frame_cache {paths['frame_cache']}")
        if run.args.max_frames != FrameSamplingConfig.max_frames:  # run.sh's value
            extra.append(f"--max_frames {run.args.max_frames}")
    return " ".join(env + ["bash run.sh"] + extra)


def write_report(run: Run) -> str:
    if run.annotations is not None:
        run.report["paths"] = loader_paths(run)
        if "check" in run.report["stages"]:
            run.report["run"] = run_command(run, run.report["paths"])
    path = os.path.join(run.layout.root, REPORT_FILE)
    write_json(path, run.report)
    return path


def prepare(args: argparse.Namespace) -> dict:
    """Run every stage for ``args.dataset`` under ``args.root``; returns the report (also written).

    Raises PrepareError on bad input (the report, with "error", is written first).
    """
    layout = Layout.under(args.root, args.archives, args.videos)
    options = DatasetOptions(vatex_test_list=args.vatex_test_list,
                             vatex_test_all_validation=args.vatex_test_all_validation,
                             charades_videos=args.charades_videos, charades_text=args.charades_text)
    run = Run(args, SOURCES[args.dataset], layout, options)
    os.makedirs(layout.root, exist_ok=True)
    run.report = {"dataset": args.dataset, "root": layout.root, "layout": asdict(layout), "ok": False,
                  "error": None, "stages": {}}
    with tqdm(STAGES, desc=f"prepare {args.dataset}", unit="stage") as bar:
        for name, stage in bar:
            bar.set_postfix_str(name)
            try:
                run.report["stages"][name] = stage(run)
            except PrepareError as err:
                run.report["error"] = f"{name}: {err}"
                write_report(run)
                raise
            write_report(run)
    return run.report


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True, choices=sorted(SOURCES))
    p.add_argument("--root", required=True, help="dataset folder to build (e.g. data/msrvtt, run.sh's default)")
    p.add_argument("--download", action="store_true",
                   help="fetch missing release files (and the AST checkpoint) from their public URLs")
    p.add_argument("--archives", default=None, help="folder of the release files (default: <root>/archives)")
    p.add_argument("--videos", default=None,
                   help="use this folder of <video_id>.mp4 files instead of unpacking the video archive "
                        "(required for VATEX, whose clips come from YouTube)")
    p.add_argument("--mirror", default=None, help="fetch every release file as <mirror>/<file name> instead")
    p.add_argument("--offline", action="store_true", help="never use the network; missing files are errors")
    p.add_argument("--compress", action="store_true", help="also write 3 fps, short side 224 copies")
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 1) // 2),
                   help="processes for compression / audio extraction (1: in this process)")
    p.add_argument("--ast_checkpoint", default=weights.AST_RELEASE.file_name,
                   help="AST checkpoint for the token cache (default: the released file, from modules/ or the "
                        "weights cache, downloaded with --download)")
    p.add_argument("--weights_cache", default=None, help="weights cache (default: see modules/weights.py)")
    p.add_argument("--no_ast_cache", action="store_true", help="skip the AST token cache")
    p.add_argument("--device", default="auto", help="device of the AST cache stage (auto: cuda if available)")
    p.add_argument("--no_frame_cache", action="store_true", help="skip the frame cache (frames decoded every epoch)")
    p.add_argument("--max_frames", type=int, default=FrameSamplingConfig.max_frames,
                   help="frames per video of the frame cache (run.sh: 12); training must use the same value")
    p.add_argument("--image_size", type=int, default=FrameSamplingConfig.image_size,
                   help="frame side of the frame cache (the CLIP input: 224 for ViT-B/32 and ViT-B/16)")
    p.add_argument("--num_val", type=int, default=DEFAULT_NUM_VAL,
                   help="training videos held out for model selection (0: none)")
    p.add_argument("--seed", type=int, default=make_val_split.DEFAULT_SEED, help="seed of the held-out draw")
    p.add_argument("--vatex_test_list", default=None,
                   help="VATEX: the HGR split's 1,500 test ids (.txt or HGR's tst_names.npy)")
    p.add_argument("--vatex_test_all_validation", action="store_true",
                   help="VATEX: test on all 3,000 official validation videos (not the published protocol)")
    p.add_argument("--charades_videos", choices=sorted(source_charades.VIDEO_ARCHIVES), default="480",
                   help="Charades video archive: 480p (13 GB) or original size (55 GB)")
    p.add_argument("--charades_text", choices=source_charades.TEXT_COLUMNS, default="script",
                   help="Charades captions: the script (one per video) or the annotators' descriptions")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.device == "auto":
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        report = prepare(args)
    except PrepareError as err:
        print(f"prepare_data: {err}", file=sys.stderr)
        return EXIT_ERROR
    failed = [c["name"] for c in report["stages"]["check"]["checks"] if not c["ok"]]
    print(f"report: {os.path.join(report['root'], REPORT_FILE)}")
    if failed:
        print(f"prepare_data: checks failed: {failed} (see the report)", file=sys.stderr)
        return EXIT_CHECK_FAILED
    print(f"ready; train with:\n  {report['run']}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
