"""Re-encode videos at 3 fps with the shorter side 224, keeping the soundtrack (docs/design.md §9).

Writes ``<output_dir>/<video_id>.mp4`` with PyAV in-process (no ffmpeg binary needed):
H.264 (libx264; mpeg4 where this PyAV build lacks libx264), yuv420p, bicubic resize,
AAC audio. Frame-rate conversion keeps, for each output time k / fps, the first source
frame at or after it (a source slower than the target repeats frames). Resumable;
a JSON report lists videos without audio and failures. Example:

    python -m preprocess.compress_video --video_dir data/MSRVTT/videos \
        --output_dir data/MSRVTT/videos_3fps --workers 8
"""
from __future__ import annotations

import fractions
import os
import sys
from typing import List, Optional, Tuple

import av

from atomic_io import atomic_path
from preprocess.media import MediaJob, Outcome, base_parser, run_batch

DEFAULT_FPS = 3
DEFAULT_SHORT_SIDE = 224
PREFERRED_VIDEO_CODECS = ("libx264", "mpeg4")
AUDIO_CODEC = "aac"
PIXEL_FORMAT = "yuv420p"
RESIZE_INTERPOLATION = "BICUBIC"
# The AAC encoder only accepts named channel layouts; sources often carry unnamed ones
# ("2 channels"), so the output layout is chosen by channel count (more than 8: stereo).
AAC_LAYOUTS = {1: "mono", 2: "stereo", 3: "3.0", 4: "quad", 5: "5.0", 6: "5.1", 7: "6.1", 8: "7.1"}
AAC_FALLBACK_LAYOUT = "stereo"
# Half a microsecond of slack so a frame stamped exactly at an output time is not missed.
TIME_SLACK_S = 5e-7


def pick_video_codec() -> str:
    for codec in PREFERRED_VIDEO_CODECS:
        if codec in av.codecs_available:
            return codec
    raise RuntimeError(f"this PyAV build has none of the encoders {PREFERRED_VIDEO_CODECS}")


def scaled_size(width: int, height: int, short_side: int) -> Tuple[int, int]:
    """(width, height) with the shorter side = ``short_side``, aspect kept, both even."""
    scale = short_side / min(width, height)

    def even(x: float) -> int:
        return max(2, int(round(x / 2.0)) * 2)

    if width <= height:
        return short_side, even(height * scale)
    return even(width * scale), short_side


def add_audio_stream(target: av.container.OutputContainer,
                     audio_in: av.audio.stream.AudioStream) -> av.audio.stream.AudioStream:
    """AAC stream at the source rate (or the nearest AAC rate) and a layout AAC accepts.

    PyAV's encoder converts each frame's format, layout and rate to the stream's.
    """
    source = audio_in.codec_context
    rates = av.codec.Codec(AUDIO_CODEC, "w").audio_rates or [source.sample_rate]
    rate = min(rates, key=lambda r: abs(r - source.sample_rate))
    stream = target.add_stream(AUDIO_CODEC, rate=rate)
    stream.layout = AAC_LAYOUTS.get(source.layout.nb_channels, AAC_FALLBACK_LAYOUT)
    return stream


def _frame_time(frame: av.VideoFrame, index: int, stream: av.video.stream.VideoStream) -> float:
    """Presentation time in seconds; falls back to the index at the nominal rate."""
    if frame.time is not None:
        return float(frame.time)
    rate = stream.average_rate or stream.guessed_rate
    return index / float(rate)


def transcode(source: av.container.InputContainer, target: av.container.OutputContainer,
              fps: int, short_side: int) -> bool:
    """Copy the first video (resampled in time and space) and audio streams; True if audio."""
    video_in = source.streams.video[0]
    audio_in = source.streams.audio[0] if source.streams.audio else None
    width, height = scaled_size(video_in.codec_context.width, video_in.codec_context.height,
                                short_side)
    video_out = target.add_stream(pick_video_codec(), rate=fps)
    video_out.width, video_out.height, video_out.pix_fmt = width, height, PIXEL_FORMAT
    audio_out = add_audio_stream(target, audio_in) if audio_in is not None else None
    slot_rate = fractions.Fraction(1, fps)
    next_slot, first_time, index = 0, None, 0
    for packet in source.demux(*[s for s in (video_in, audio_in) if s is not None]):
        for frame in packet.decode():
            if packet.stream is audio_in:
                frame.pts = None  # the encoder stamps audio by sample count
                target.mux(audio_out.encode(frame))
                continue
            time = _frame_time(frame, index, video_in)
            index += 1
            first_time = time if first_time is None else first_time
            while next_slot * slot_rate <= time - first_time + TIME_SLACK_S:
                scaled = frame.reformat(width=width, height=height, format=PIXEL_FORMAT,
                                        interpolation=RESIZE_INTERPOLATION)
                scaled.pts, scaled.time_base = next_slot, slot_rate
                target.mux(video_out.encode(scaled))
                next_slot += 1
    target.mux(video_out.encode(None))
    if audio_out is not None:
        target.mux(audio_out.encode(None))
    return audio_in is not None


def compress_one(job: MediaJob) -> Outcome:
    """Write ``job.target`` (atomic) from ``job.source``."""
    with atomic_path(job.target) as tmp:
        with av.open(job.source) as source, av.open(tmp, "w") as target:
            has_audio = transcode(source, target, int(job.options["fps"]),
                                  int(job.options["short_side"]))
    return Outcome(written=True, has_audio=has_audio)


def main(argv: Optional[List[str]] = None) -> int:
    parser = base_parser(__doc__.splitlines()[0], "--output_dir", "output folder for <video_id>.mp4")
    parser.add_argument("--fps", type=int, default=DEFAULT_FPS, help="output frame rate")
    parser.add_argument("--short_side", type=int, default=DEFAULT_SHORT_SIDE,
                        help="output length of the shorter side in pixels (even)")
    args = parser.parse_args(argv)
    if args.short_side % 2:
        parser.error("--short_side must be even (yuv420p needs even dimensions)")
    report_path = args.report or os.path.join(args.output_dir, "compress_video_report.json")
    report = run_batch(compress_one, args.video_dir, args.output_dir, ".mp4", args.workers,
                       report_path, {"fps": args.fps, "short_side": args.short_side},
                       "compress_video")
    return 1 if report["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
