"""Linear probes: where does a trained model lose the sound? (issue 17, docs/diagnostics.md)

For every video of an evaluation split (default: the test split) the checkpoint computes

- ``ast_tokens``: the AST trunk's tokens (before its final LayerNorm, as cached), mean over tokens;
- ``resampled_audio``: the resampler's output Â, mean over queries;
- ``fused_frames_unblended``: the fusion's last block output x_L, mean over valid frames (before
  the ``V = r x_L + (1 - r) v0`` blend);
- ``fused_frames``: the fused frames V after the blend, mean over valid frames;
- ``video_embedding``: the unit global video vector the score uses (similarity.video_index row 0);

and for every sound caption of the split ``caption_embedding``: the unit text embedding.
A 5-fold cross-validated multinomial logistic regression (scikit-learn; standardized features,
fixed C, stratified folds with a fixed seed) then predicts the clip's sound event from each
video-side representation on the clips with informative audio, and the named sound from the
caption embeddings. Text-guided models are probed in their agnostic view (t := 0, docs/design.md §4a),
the view their video index uses; the output says so.

The checkpoint describes itself: the model is rebuilt from its record
(``pytorch_model.bin.N.json``, checkpoint_record.py); the frame and caption settings default
to the run's args.json beside the checkpoint. Labels come from the benchmark's metadata.json.

    python -m tools.probe_sound --checkpoint demo_out/runs/avigate_seed0/pytorch_model.bin.2 \
        --data_path demo_out/data --audio_feature_cache demo_out/ast_cache --out probe.json

In process: ``probe_checkpoint(checkpoint, ProbeData(...)) -> dict`` (the same JSON).

Shapes: N samples, d feature width, B batch, F frames, Q audio queries, A audio tokens, D width.
"""
from __future__ import annotations

import argparse
import json
import os
import warnings
from dataclasses import asdict, dataclass, fields, replace
from typing import Optional, Sequence

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

import checkpoint_record
from dataloaders.base import RetrievalSplit, TextDataset, collate_items
from dataloaders.registry import DataConfig, build_eval_datasets
from dataloaders.video import FrameSamplingConfig
from evaluation import eval_loader
from modules.fusion import masked_mean
from modules.modeling import AVIGATE, AVIGATEConfig
from modules.similarity import exact_fp32, video_index
from modules.tokenization_clip import ClipTokenizer
from synthetic.vocab import VISUAL_ATTRIBUTES
from training import video_inputs
from util import load_model_weights, write_json

PERCENT = 100.0
SOUND_KIND = "sound"
VIDEO_REPRESENTATIONS = ("ast_tokens", "resampled_audio", "fused_frames_unblended", "fused_frames",
                         "video_embedding")
CAPTION_REPRESENTATION = "caption_embedding"
DESCRIPTIONS = {
    "ast_tokens": "AST trunk tokens (before its final LayerNorm, as cached), mean over tokens",
    "resampled_audio": "resampler output, mean over queries",
    "fused_frames_unblended": "fusion's last block output x_L, mean over valid frames (before the residual blend)",
    "fused_frames": "fused frames V = r x_L + (1 - r) v0, mean over valid frames",
    "video_embedding": "unit global video vector of the score (video index row 0)",
    "caption_embedding": "unit text embedding of each sound caption",
}
# The data settings a probe takes from the run's args.json (flag name -> ProbeData field).
RUN_DATA_FLAGS = {"datatype": "datatype", "max_words": "max_words", "feature_framerate": "framerate",
                  "slice_framepos": "slice_framepos", "decoder": "decoder"}


@dataclass
class ProbeSettings:
    """The classifier and its cross-validation.

    Args:
        folds: cross-validation folds (fewer when a class has fewer samples; reported).
        seed: fold assignment seed.
        C: inverse L2 strength of the logistic regression (fixed, not tuned).
        max_iter: lbfgs iterations per fit (folds that stop unconverged are counted).
    """

    folds: int = 5
    seed: int = 0
    C: float = 1.0
    max_iter: int = 5000


@dataclass
class ProbeData:
    """Where the split is and how its items are made (flags of main_task_retrieval.py's names).

    Args:
        data_path: annotation folder (holds metadata.json unless ``metadata`` is given).
        features_path: video folder (default ``<data_path>/videos``).
        audio_feature_cache / audio_path: the audio the model was trained with (cache or wavs).
        test_csv: the split to probe (default: the datatype's test file).
        metadata: metadata.json (per video: informative_audio, sound, captions with kind).
        datatype, max_words, framerate, slice_framepos, decoder: None = the run's args.json
            beside the checkpoint, else main_task_retrieval.py's defaults.
        batch_size, workers: encoding batch and DataLoader workers.
    """

    data_path: str
    features_path: Optional[str] = None
    audio_feature_cache: Optional[str] = None
    audio_path: Optional[str] = None
    test_csv: Optional[str] = None
    metadata: Optional[str] = None
    datatype: Optional[str] = None
    max_words: Optional[int] = None
    framerate: Optional[float] = None
    slice_framepos: Optional[int] = None
    decoder: Optional[str] = None
    batch_size: int = 16
    workers: int = 0


# ----------------------------------------------------------------------------- the probe

def cross_validated_accuracy(features: np.ndarray, labels: Sequence, settings: ProbeSettings = ProbeSettings(),
                             target: str = "") -> dict:
    """Stratified k-fold accuracy (percent) of a multinomial logistic regression.

    Args:
        features: [N, d]; labels: N class names.
        target: what the labels are (copied into the result).
    Returns: accuracy (mean over folds) and its std over folds, per-fold accuracies, chance
    (uniform 1/classes and majority class), counts; classes with a single sample are dropped
    (they cannot be in a training and a test fold) and counted. ``accuracy`` is None, with a
    ``reason``, when fewer than two classes remain.
    """
    labels = np.asarray(labels, dtype=object)
    names, counts = np.unique(labels.astype(str), return_counts=True)
    dropped = [str(n) for n, c in zip(names, counts) if c < 2]
    keep = ~np.isin(labels.astype(str), dropped)
    x, y = np.asarray(features, dtype=np.float64)[keep], labels[keep].astype(str)
    names, counts = np.unique(y, return_counts=True)
    out = {"target": target, "num_samples": int(len(y)), "num_classes": int(len(names)), "dim": int(x.shape[1]),
           "class_counts": {str(n): int(c) for n, c in zip(names, counts)},
           "dropped": {"classes": dropped, "samples": int((~keep).sum())}}
    if len(names) < 2:
        return {**out, "accuracy": None, "reason": "fewer than two classes with two or more samples"}
    if not np.isfinite(x).all():
        raise ValueError(f"probe features of {target!r} are not finite: the checkpoint or its inputs are broken")
    folds = int(min(settings.folds, counts.min()))
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=settings.seed)
    accuracies, unconverged = [], 0
    for train, test in splitter.split(x, y):
        classifier = make_pipeline(StandardScaler(), LogisticRegression(C=settings.C, max_iter=settings.max_iter))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            classifier.fit(x[train], y[train])
        unconverged += any(issubclass(w.category, ConvergenceWarning) for w in caught)
        accuracies.append(PERCENT * float((classifier.predict(x[test]) == y[test]).mean()))
    return {**out, "accuracy": float(np.mean(accuracies)), "std": float(np.std(accuracies)),
            "fold_accuracy": accuracies, "folds": folds, "unconverged_folds": int(unconverged),
            "chance_uniform": PERCENT / len(names), "chance_majority": PERCENT * float(counts.max() / counts.sum())}


# ----------------------------------------------------------------------------- the model

def model_from_checkpoint(checkpoint: str, device: torch.device) -> tuple[AVIGATE, dict]:
    """The model a checkpoint's record describes, with the checkpoint's weights, in eval mode;
    returns (model, record)."""
    record = checkpoint_record.read_record(checkpoint, "--checkpoint")
    source = checkpoint_record.record_path(checkpoint)
    if record is None:
        raise ValueError(f"--checkpoint {checkpoint} has no record ({source}): the probe rebuilds the model "
                         f"from it; probe a pytorch_model.bin.N written by main_task_retrieval.py")
    cfg = checkpoint_record.dataclass_from_dict(AVIGATEConfig, record["model_config"], source)
    model = AVIGATE(cfg)
    load_model_weights(model, checkpoint)
    return model.to(device).eval(), record


def _ast_tokens(model: AVIGATE, audio: torch.Tensor) -> torch.Tensor:
    """Cached tokens [B, A, W_a] as they are, or the trunk's tokens of an fbank [B, 1024, 128]."""
    cfg = model.cfg.ast
    if model.ast is None or tuple(audio.shape[1:]) == (cfg.num_output_tokens, cfg.embed_dim):
        return audio.float()
    return model.ast.tokens(audio).float()


@torch.no_grad()
def video_representations(model: AVIGATE, batch: dict, device: torch.device) -> dict:
    """Every video-side representation of one collated batch: name -> [B, d] (missing names:
    the model or the data has no such stage)."""
    inputs = video_inputs(batch, device)
    mask = inputs["frame_mask"].bool()
    audio = inputs["audio"]
    out = {}
    if audio is not None:
        out["ast_tokens"] = _ast_tokens(model, audio).mean(1)
    audio_q = model.resampled_audio(audio) if model.ast is not None else None  # [B, Q, D]
    if audio_q is not None:
        out["resampled_audio"] = audio_q.float().mean(1)
    fused = model.fusion.agnostic(model.frame_embeddings(inputs["frames"], mask), mask, audio_q)
    if fused.unblended is not None:
        out["fused_frames_unblended"] = masked_mean(fused.unblended.float(), mask)
    out["fused_frames"] = masked_mean(fused.fused.float(), mask)
    with exact_fp32(device):
        out["video_embedding"] = video_index(fused.fused.float(), mask)[:, 0]
    return out


@torch.no_grad()
def encode_videos(model: AVIGATE, videos, batch_size: int, workers: int, device: torch.device) -> dict:
    """name -> [Nv, d] numpy over a VideoDataset, in its order."""
    parts: dict = {}
    for batch in eval_loader(videos, batch_size, workers, collate_items, device):
        for name, value in video_representations(model, batch, device).items():
            parts.setdefault(name, []).append(value.cpu().numpy())
    return {name: np.concatenate(values) for name, values in parts.items()}


@torch.no_grad()
def encode_captions(model: AVIGATE, texts: TextDataset, batch_size: int, workers: int,
                    device: torch.device) -> np.ndarray:
    """Unit text embeddings [Nt, D] of a TextDataset, in its order."""
    parts = []
    for batch in eval_loader(texts, batch_size, workers, collate_items, device):
        text = model.encode_text(batch["text_ids"].to(device), batch["text_mask"].to(device)).text.float()
        parts.append(torch.nn.functional.normalize(text, dim=-1).cpu().numpy())
    return np.concatenate(parts) if parts else np.zeros((0, model.cfg.clip.embed_dim), np.float32)


# ----------------------------------------------------------------------------- data and labels

def run_data_settings(checkpoint: str) -> dict:
    """Data flags of the run that wrote ``checkpoint`` (its args.json), as ProbeData fields."""
    path = os.path.join(os.path.dirname(os.path.abspath(checkpoint)), "args.json")
    if not os.path.isfile(path):
        return {}
    with open(path) as handle:
        args = json.load(handle)
    return {field: args[flag] for flag, field in RUN_DATA_FLAGS.items() if flag in args}


def resolve_data(data: ProbeData, checkpoint: str) -> ProbeData:
    """Fill the settings left None from the run's args.json, then from the flag defaults."""
    frames = FrameSamplingConfig()
    defaults = {"datatype": "msrvtt", "max_words": DataConfig.max_words, "framerate": frames.framerate,
                "slice_framepos": frames.slice_framepos, "decoder": frames.decoder}
    run = run_data_settings(checkpoint)
    values = {f.name: getattr(data, f.name) for f in fields(ProbeData)}
    for name, default in defaults.items():
        if values[name] is None:
            values[name] = run.get(name, default)
    values["features_path"] = values["features_path"] or os.path.join(data.data_path, "videos")
    values["metadata"] = values["metadata"] or os.path.join(data.data_path, "metadata.json")
    return ProbeData(**values)


def data_config(data: ProbeData, model: AVIGATE) -> DataConfig:
    return DataConfig(datatype=data.datatype, data_path=data.data_path, features_path=data.features_path,
                      audio_path=data.audio_path, audio_cache_dir=data.audio_feature_cache,
                      eval_file=data.test_csv, max_words=data.max_words,
                      frames=FrameSamplingConfig(max_frames=model.cfg.fusion.max_frames, framerate=data.framerate,
                                                 slice_framepos=data.slice_framepos,
                                                 image_size=model.cfg.clip.image_resolution, decoder=data.decoder))


def read_labels(path: str, video_ids: list) -> dict:
    """metadata.json entries of the split's videos; errors name the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--metadata {path!r} does not exist (synthetic/make_synthetic_av.py writes "
                                f"metadata.json beside MSRVTT_data.json)")
    with open(path) as handle:
        videos = json.load(handle).get("videos", {})
    missing = [v for v in video_ids if v not in videos]
    if missing:
        raise KeyError(f"--metadata {path} lacks {len(missing)} videos of the split (e.g. {missing[:3]}); is it "
                       f"the metadata of this benchmark?")
    return {v: videos[v] for v in video_ids}


def sound_caption_mask(split: RetrievalSplit, labels: dict) -> np.ndarray:
    """bool [Nt]: the split's captions that name their clip's sound (metadata kind "sound")."""
    kinds = {(vid, c["caption"]): c.get("kind", SOUND_KIND if c.get("mentions_sound") else "visual")
             for vid, entry in labels.items() for c in entry.get("captions", [])}
    return np.array([kinds.get((split.video_ids[v], caption)) == SOUND_KIND
                     for caption, v in zip(split.captions, split.caption_video)], dtype=bool)


def video_view(model: AVIGATE) -> str:
    if not model.cfg.fusion.use_audio:
        return "visual-only model (--no_audio): V = v0, no fusion"
    if model.text_guided:
        return "text-guided model probed in its agnostic view (text := 0, docs/design.md §4a)"
    return "text-agnostic model"


# ----------------------------------------------------------------------------- entry points

def probe_checkpoint(checkpoint: str, data: ProbeData, settings: ProbeSettings = ProbeSettings(),
                     device: str = "cpu") -> dict:
    """Probe every representation of ``checkpoint`` on ``data`` (module docstring); returns the
    JSON-ready result. Deterministic for fixed inputs and settings."""
    torch_device = torch.device(device)
    model, record = model_from_checkpoint(checkpoint, torch_device)
    if record["flags"].get("train_ast") and data.audio_feature_cache:
        raise ValueError(f"{checkpoint} fine-tuned its AST trunk (--train_ast): --audio_feature_cache holds the "
                         f"original trunk's tokens; pass --audio_path instead")
    data = resolve_data(data, checkpoint)
    skipped = {}
    if model.ast is None and data.audio_path:  # no trunk to turn wavs into tokens
        data = replace(data, audio_path=None)
        skipped["ast_tokens"] = ("a visual-only checkpoint has no AST trunk to compute tokens from wavs; pass "
                                 "--audio_feature_cache to probe the tokens")
    elif model.ast is not None and not (data.audio_feature_cache or data.audio_path):
        raise ValueError(f"{checkpoint} fuses audio: pass the --audio_feature_cache or --audio_path it was "
                         f"trained with")
    eval_data = build_eval_datasets(data_config(data, model), ClipTokenizer())
    split = eval_data.split
    labels = read_labels(data.metadata, split.video_ids)
    features = encode_videos(model, eval_data.videos, data.batch_size, data.workers, torch_device)
    informative = np.array([bool(labels[v]["informative_audio"]) for v in split.video_ids])
    events = [labels[v]["sound"] for v in split.video_ids]
    results = {}
    for name in VIDEO_REPRESENTATIONS:
        if name not in features:
            skipped.setdefault(name, "no audio given (--audio_feature_cache / --audio_path)" if name == "ast_tokens"
                               else "the model has no such stage (visual-only: no resampler or fusion blocks)")
            continue
        results[name] = cross_validated_accuracy(features[name][informative],
                                                 [e for e, i in zip(events, informative) if i], settings,
                                                 "sound event of the clips with informative audio")
    # The category bit (informative vs irrelevant audio) alone predicts which captions can match a
    # clip on the synthetic benchmark (docs/diagnostics.md, section 3): how readable is it?
    category = ["informative" if flag else "irrelevant" for flag in informative]
    category_results = {name: cross_validated_accuracy(features[name], category, settings,
                                                       "audio category (informative vs irrelevant) of every clip")
                        for name in results}
    # Every caption is encoded once: the sound captions' probe and the attribute probes share it.
    texts = encode_captions(model, TextDataset(split, ClipTokenizer(), data.max_words), data.batch_size,
                            data.workers, torch_device)
    sound = sound_caption_mask(split, labels)
    named = [labels[split.video_ids[v]]["sound"] for v in np.asarray(split.caption_video)[sound]]
    results[CAPTION_REPRESENTATION] = cross_validated_accuracy(texts[sound], named, settings,
                                                               "sound named by each sound caption")
    attributes = visual_attribute_probes(split, labels, features["video_embedding"], texts, settings)
    return {"checkpoint": os.path.abspath(checkpoint), "split": split.name, "metadata": data.metadata,
            "audio": data.audio_feature_cache or data.audio_path,
            "model": {k: record["flags"].get(k) for k in ("gate", "no_audio", "fusion_residual", "text_gate",
                                                          "text_query", "query_gate")},
            "video_view": video_view(model),
            "num_videos": split.num_videos, "num_informative_videos": int(informative.sum()),
            "num_sound_captions": int(sound.sum()),
            "probe": {"classifier": "standardized features -> multinomial logistic regression (scikit-learn "
                                    "lbfgs), stratified k-fold", **asdict(settings)},
            "data": {k: v for k, v in asdict(data).items() if k not in ("batch_size", "workers")},
            "descriptions": {k: DESCRIPTIONS[k] for k in results}, "representations": results,
            "audio_category": category_results, "visual_attributes": attributes, "skipped": skipped}


def visual_attribute_probes(split: RetrievalSplit, labels: dict, video_embedding: np.ndarray, texts: np.ndarray,
                            settings: ProbeSettings) -> dict:
    """Each visual attribute (shape, colour, motion, background) decoded from the video embedding
    [Nv, D] of every clip and from the embedding [Nt, D] of every caption: a caption is retrieved
    only if both sides carry what it names, so an attribute one side cannot read caps the recall."""
    out = {}
    for attribute in VISUAL_ATTRIBUTES:
        if any(attribute not in labels[v] for v in split.video_ids):
            continue
        out[attribute] = {
            "video_embedding": cross_validated_accuracy(video_embedding, [labels[v][attribute] for v in split.video_ids],
                                                        settings, f"{attribute} of every clip"),
            "caption_embedding": cross_validated_accuracy(
                texts, [labels[split.video_ids[v]][attribute] for v in split.caption_video], settings,
                f"{attribute} named by every caption")}
    return out


def summary_lines(result: dict) -> list:
    """One line per representation: accuracy ± std (chance), samples and classes."""
    lines = [f"{result['checkpoint']} ({result['video_view']})"]
    for section in ("representations", "audio_category"):
        for name, r in result[section].items():
            label = f"{name} -> {'audio category' if section == 'audio_category' else r['target'].split(' of ')[0]}"
            if r["accuracy"] is None:
                lines.append(f"  {label}: – ({r['reason']})")
                continue
            lines.append(f"  {label}: {r['accuracy']:.1f} ± {r['std']:.1f}% (chance {r['chance_uniform']:.1f}%, "
                         f"majority {r['chance_majority']:.1f}%; {r['num_samples']} samples, {r['num_classes']} "
                         f"classes, {r['folds']} folds)")
    for attribute, sides in result.get("visual_attributes", {}).items():
        cells = [f"{side} {r['accuracy']:.1f}%" if r["accuracy"] is not None else f"{side} –" for side, r in sides.items()]
        chance = next(iter(sides.values()))
        lines.append(f"  visual attribute {attribute} ({chance['num_classes']} classes): {', '.join(cells)}")
    lines += [f"  {name}: skipped ({why})" for name, why in result["skipped"].items()]
    return lines


def parse_args(argv: Optional[Sequence[str]] = None) -> tuple:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--checkpoint", required=True, help="pytorch_model.bin.N with its record (.json beside it)")
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    d = parser.add_argument_group("data (main_task_retrieval.py's flag names; unset: the run's args.json)")
    d.add_argument("--data_path", required=True, help="annotation folder of the benchmark")
    d.add_argument("--features_path", default=None, help="video folder (default: <data_path>/videos)")
    d.add_argument("--audio_feature_cache", default=None, help="the AST-token cache the row was trained with")
    d.add_argument("--audio_path", default=None, help="or the wav folder")
    d.add_argument("--test_csv", default=None, help="the split to probe (default: the datatype's test file)")
    d.add_argument("--metadata", default=None, help="labels: metadata.json (default: <data_path>/metadata.json)")
    d.add_argument("--datatype", default=None)
    d.add_argument("--max_words", type=int, default=None)
    d.add_argument("--feature_framerate", dest="framerate", type=float, default=None)
    d.add_argument("--slice_framepos", type=int, default=None)
    d.add_argument("--decoder", default=None)
    d.add_argument("--batch_size_val", dest="batch_size", type=int, default=ProbeData.batch_size)
    d.add_argument("--num_thread_reader", dest="workers", type=int, default=ProbeData.workers)
    c = parser.add_argument_group("classifier")
    c.add_argument("--folds", type=int, default=ProbeSettings.folds, help="cross-validation folds")
    c.add_argument("--seed", type=int, default=ProbeSettings.seed, help="fold assignment seed")
    c.add_argument("--C", type=float, default=ProbeSettings.C, help="inverse L2 strength (fixed)")
    c.add_argument("--max_iter", type=int, default=ProbeSettings.max_iter, help="lbfgs iterations per fit")
    args = parser.parse_args(argv)
    data = ProbeData(**{f.name: getattr(args, f.name) for f in fields(ProbeData)})
    settings = ProbeSettings(**{f.name: getattr(args, f.name) for f in fields(ProbeSettings)})
    if settings.folds < 2:
        parser.error(f"--folds must be >= 2, got {settings.folds}")
    return args.checkpoint, data, settings, args.device, args.out


def main(argv: Optional[Sequence[str]] = None) -> dict:
    checkpoint, data, settings, device, out = parse_args(argv)
    result = probe_checkpoint(checkpoint, data, settings, device)
    write_json(out, result)
    print("\n".join(summary_lines(result)))
    return result


if __name__ == "__main__":
    main()
