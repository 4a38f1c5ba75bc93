"""What a checkpoint says about itself: the record written next to every model file and
training state, and the rules that turn it into flags.

Format. ``pytorch_model.bin.N`` stays a plain state dict (``torch.load(path,
weights_only=True)`` gives ``{name: tensor}``, loadable with ``model.load_state_dict`` in
anyone's script); its record is the JSON file beside it, ``pytorch_model.bin.N.json``
(``training_state.pt.json`` for a training state, which also carries the record under its
``"record"`` key). A record holds:

- ``format`` / ``version``: "avigate-checkpoint-record", 1;
- ``model_config``: ``AVIGATEConfig`` as a dict (the architecture: what the weights mean);
- ``flags``: the architecture flags that produced it (``modules.architecture.FLAGS``), the weight
  flags (``--pretrained_clip_name``, ``--ast_checkpoint``) and ``train_ast`` (whether the AST
  trunk was fine-tuned, which makes a token cache of the original trunk wrong for it);
- ``weight_sources``: where the initial weights came from (``modules.weights`` records: path,
  origin, SHA-256), with the ``--init_model`` file it started from, if any;
- ``git``: the code revision; ``file``, ``epoch``, ``step``: which checkpoint of the run;
- ``LEAKING``: present when the run used the leaking paired_block protocol.

Rules (``resolve_flags``): reading a checkpoint (``--init_model``, ``--resume_model``), an
architecture flag given on the command line must equal the record's value (else an error
naming both); a flag left out takes the record's value. The one exception is the warm start
of a text-guided model from a text-agnostic (AVIGATE) checkpoint (docs/design.md §4a): the
text flags (``architecture.TEXT_FLAG_NAMES``) may then differ, and the missing text terms
start at their residual init. A checkpoint without a record (older runs, the released code's
files) loads with the flags as given.

Standard library only (``modules.architecture`` is too): the entry point reads records before
its torch imports, so flag errors answer at once.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import typing
from typing import Any, Iterable, Optional

from atomic_io import write_json
from modules import architecture

FORMAT = "avigate-checkpoint-record"
VERSION = 1
SUFFIX = ".json"
# Recorded for provenance and for the checks they allow, not compared as architecture.
WEIGHT_FLAGS = ("pretrained_clip_name", "ast_checkpoint", "train_ast")
# Where the checkpoint's initial CLIP / AST weights came from: left out, they take the recorded
# values (args.json then names the files behind the model); given, they may name another copy
# of the same weights (their sizes are checked against the record when the model is built).
SOURCE_FLAGS = ("pretrained_clip_name", "ast_checkpoint")


class RecordError(ValueError):
    """A checkpoint record that cannot be used, or flags that contradict it."""


def record_path(checkpoint: str) -> str:
    """The record beside ``checkpoint``: ``<checkpoint>.json``."""
    return os.fspath(checkpoint) + SUFFIX


def make_record(model_config: dict, flags: dict, weight_sources: dict, git: dict, **extra) -> dict:
    """A record (module docstring); ``extra`` adds fields such as file, epoch, step, LEAKING."""
    return {"format": FORMAT, "version": VERSION, "model_config": model_config, "flags": flags,
            "weight_sources": weight_sources, "git": git, **extra}


def write_record(checkpoint: str, record: dict) -> None:
    """Atomic write of ``<checkpoint>.json``."""
    write_json(record_path(checkpoint), record)


def read_record(checkpoint: str, flag: str = "--init_model") -> Optional[dict]:
    """The record of ``checkpoint`` (None when it has none); errors name the file and ``flag``."""
    if not os.path.isfile(checkpoint):
        raise FileNotFoundError(f"{flag} {checkpoint!r} does not exist")
    path = record_path(checkpoint)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise RecordError(f"{path}: the record of {flag} {checkpoint} is unreadable ({err}); fix or delete "
                          f"it (then the checkpoint loads with the flags as given)") from err
    check_record(record, path)
    return record


def check_record(record: Any, source: str) -> None:
    """Raise RecordError unless ``record`` is a record of a version this code reads."""
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise RecordError(f"{source} is not a checkpoint record (no \"format\": \"{FORMAT}\")")
    if record.get("version") != VERSION:
        raise RecordError(f"{source}: record version {record.get('version')} is not {VERSION}, the one this "
                          f"code reads (written by other code?)")
    for key in ("model_config", "flags"):
        if not isinstance(record.get(key), dict):
            raise RecordError(f"{source}: the record has no {key!r} dict")


def explicit_flags(parser: argparse.ArgumentParser, argv: Optional[list[str]]) -> set[str]:
    """Destinations the command line sets (not left at their argparse default).

    The arguments are parsed once more into a namespace pre-filled with a marker: argparse
    fills in a default only where the namespace lacks the attribute, so whatever still holds
    the marker afterwards was not given.
    """
    unset = object()
    probe = argparse.Namespace(**{a.dest: unset for a in parser._actions if a.dest != argparse.SUPPRESS})
    parser.parse_args(argv, namespace=probe)
    return {name for name, value in vars(probe).items() if value is not unset}


def flag_text(name: str, value: Any) -> str:
    """How a flag value reads on the command line: "--text_gate", "(no --text_gate)", "--gate soft"."""
    if isinstance(value, bool):
        return f"--{name}" if value else f"(no --{name})"
    return f"--{name} {value}"


def resolve_flags(args: argparse.Namespace, explicit: Iterable[str], record: dict, source: str,
                  names: Iterable[str] = architecture.FLAG_NAMES) -> dict:
    """Make ``args`` agree with a checkpoint record (module docstring, "Rules").

    Args:
        args: parsed flags (changed in place: flags left out take the record's values).
        explicit: destinations given on the command line (``explicit_flags``).
        record: the checkpoint's record; source: the checkpoint path (for messages).
        names: the flags to resolve.
    The weight-source flags (``SOURCE_FLAGS``) left out also take the recorded values, without a
    comparison (another path may hold the same weights).
    Returns: {"from_record": {flag: value}, "warm_start": bool}.
    Raises RecordError naming the flag, both values and the file when an explicit flag
    disagrees with the record.
    """
    explicit = set(explicit)
    recorded = record["flags"]
    warm_start = (not architecture.is_text_guided(recorded)
                  and any(name in explicit and getattr(args, name) for name in architecture.GUIDING_FLAG_NAMES))
    conflicts, taken = [], {}
    for name in names:
        if name not in recorded:
            continue  # recorded by older code: the flag keeps its value
        value = recorded[name]
        if name not in explicit:
            if warm_start and name in architecture.TEXT_FLAG_NAMES:
                continue  # the text-guided model's own text flags (defaults where not given)
            if getattr(args, name) != value:
                taken[name] = value
            setattr(args, name, value)
        elif getattr(args, name) != value and not (warm_start and name in architecture.TEXT_FLAG_NAMES):
            conflicts.append(f"{flag_text(name, getattr(args, name))} given, but the checkpoint was trained "
                             f"with {flag_text(name, value)}")
    for name in SOURCE_FLAGS:
        if name in recorded and name not in explicit:
            setattr(args, name, recorded[name])
    if conflicts:
        raise RecordError(f"{source} (record {record_path(source)}): " + "; ".join(conflicts) +
                          ". Drop these flags to use the checkpoint's values (architecture flags are read "
                          "from its record).")
    return {"from_record": taken, "warm_start": warm_start}


def dataclass_from_dict(cls, data: dict, source: str):
    """Rebuild a (nested) config dataclass from ``dataclasses.asdict`` output; fields missing
    from ``data`` keep their defaults, unknown ones are an error naming ``source``."""
    if not isinstance(data, dict):
        raise RecordError(f"{source}: {cls.__name__} must be a dict, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise RecordError(f"{source}: {cls.__name__} has no fields {unknown} (a record written by newer code?)")
    values = {}
    for name, value in data.items():
        kind = hints.get(name)
        if dataclasses.is_dataclass(kind):
            value = dataclass_from_dict(kind, value, source)
        elif typing.get_origin(kind) is tuple and isinstance(value, list):
            value = tuple(value)
        values[name] = value
    return cls(**values)


# ----------------------------------------------------------------------------- output folders
# What a run writes into --output_dir; any of them means the folder already holds a run.
RUN_FILES = ("args.json", "run_info.json", "log.txt", "train_metrics.jsonl", "metrics.json", "sim_matrix.npy",
             "training_state.pt", "selected_checkpoint.json", "LEAKING")
MODEL_FILE_PREFIX = "pytorch_model.bin."


def existing_run_files(output_dir: str) -> list[str]:
    """Files of an earlier run in ``output_dir`` (empty when the folder is new or holds none)."""
    if not os.path.isdir(output_dir):
        return []
    return sorted(name for name in os.listdir(output_dir)
                  if name in RUN_FILES or name.startswith(MODEL_FILE_PREFIX))


# What a run writes before its first result: a folder holding only these is reusable.
STARTUP_FILES = ("args.json", "run_info.json", "log.txt", "LEAKING")
TRAINING_STATE_NAME = "training_state.pt"


def holds_no_results(output_dir: str) -> bool:
    """Whether the run in ``output_dir`` stopped before writing any result (model file, training
    state, metrics): only STARTUP_FILES are there, so a new run may replace them."""
    existing = existing_run_files(output_dir)
    return bool(existing) and set(existing) <= set(STARTUP_FILES)


def resumes_in_place(output_dir: str, resume_model: Optional[str]) -> bool:
    """Whether ``resume_model`` is the training state of the run in ``output_dir`` itself."""
    return bool(resume_model) and \
        os.path.abspath(os.path.dirname(resume_model)) == os.path.abspath(output_dir)
