"""Extract each video's soundtrack as ``<audio_dir>/<video_id>.wav`` (16 kHz mono PCM16).

Decoding runs in-process with PyAV (no ffmpeg binary needed). Channels are averaged and
the rate converted with the same soxr resampler ``dataloaders.audio.load_waveform`` uses,
so extraction and loading agree. Videos without an audio stream get no wav; the report
lists them (the dataset then feeds AST the zero input). Resumable: existing wavs are
skipped. Example:

    python -m preprocess.extract_audio --video_dir data/MSRVTT/videos \
        --audio_dir data/MSRVTT/audio --workers 8
"""
from __future__ import annotations

import os
import sys
from typing import List, Optional

import av
import numpy as np
import soundfile as sf

from dataloaders.audio import FbankConfig, resample
from atomic_io import atomic_path
from preprocess.media import MediaJob, Outcome, base_parser, run_batch

WAV_SUBTYPE = "PCM_16"
DECODE_FORMAT = "fltp"  # planar float32: to_ndarray() gives [channels, samples]


def decode_mono(path: str, target_sr: int) -> Optional[np.ndarray]:
    """First audio stream of ``path`` as mono float32 [T] at ``target_sr``; None if silent.

    "Silent" means no audio stream, or one that decodes to no samples.
    """
    with av.open(path) as container:
        if not container.streams.audio:
            return None
        chunks: List[np.ndarray] = []
        converter, source_rate = None, None
        for frame in container.decode(container.streams.audio[0]):
            if converter is None:
                # Later frames are converted to the first frame's layout and rate, so a
                # mid-stream format change cannot break concatenation.
                source_rate = frame.sample_rate
                converter = av.AudioResampler(format=DECODE_FORMAT, layout=frame.layout.name,
                                              rate=source_rate)
            chunks.extend(out.to_ndarray() for out in converter.resample(frame))
        if converter is None:
            return None
        chunks.extend(out.to_ndarray() for out in converter.resample(None))
    if not chunks:
        return None
    mono = np.concatenate(chunks, axis=1).mean(axis=0)
    return resample(mono, source_rate, target_sr)


def extract_one(job: MediaJob) -> Outcome:
    """Write ``job.target`` from ``job.source``'s soundtrack (atomic); no file if silent."""
    sample_rate = int(job.options["sample_rate"])
    samples = decode_mono(job.source, sample_rate)
    if samples is None:
        return Outcome(written=False, has_audio=False)
    # libsndfile wraps (not clips) out-of-range floats when writing PCM.
    samples = np.clip(samples, -1.0, 1.0)
    with atomic_path(job.target) as tmp:
        sf.write(tmp, samples, sample_rate, subtype=WAV_SUBTYPE)
    return Outcome(written=True, has_audio=True)


def main(argv: Optional[List[str]] = None) -> int:
    parser = base_parser(__doc__.splitlines()[0], "--audio_dir", "output folder for <video_id>.wav")
    parser.add_argument("--sample_rate", type=int, default=FbankConfig.sample_rate,
                        help="output sample rate in Hz (AST expects 16000)")
    args = parser.parse_args(argv)
    report_path = args.report or os.path.join(args.audio_dir, "extract_audio_report.json")
    report = run_batch(extract_one, args.video_dir, args.audio_dir, ".wav", args.workers,
                       report_path, {"sample_rate": args.sample_rate}, "extract_audio")
    return 1 if report["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
