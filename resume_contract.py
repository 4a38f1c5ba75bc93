"""What ``--resume_model`` may and may not change (docs/training.md, "Resume contract").

A training state (training.py) saves the resolved flags of the run that wrote it. Resuming
compares every flag with the saved one:

- ``PER_INVOCATION`` flags say what this invocation does (where to write, when to stop); they
  may differ freely.
- ``OVERRIDABLE`` flags do not change what is trained when they differ as documented (logging,
  loader workers, evaluation-only settings, data and weight files that moved); a difference is
  still an error unless the flag is named with ``--resume_override FLAG``.
- Every other flag (data order, model, objective, schedule, precision, and any flag this table
  does not know yet) must be equal: a difference is an error naming the flag, the saved value
  and the given value.

A flag the saved state lacks (added to the code after the state was written) counts as saved
at its default. Standard library only: the entry point checks flags before its torch imports.
"""
from __future__ import annotations

import argparse
from typing import Iterable

# Flags that describe one invocation, not the run.
PER_INVOCATION = ("do_eval", "skip_test", "output_dir", "resume_model", "max_steps", "resume_override")
# flag -> why a difference is safe (shown by --help and docs/training.md).
OVERRIDABLE = {
    "n_display": "logging only",
    "tensorboard": "logging only",
    "save_every_steps": "when states are written, not what they hold",
    "num_thread_reader": "items and worker seeds are a function of (seed, epoch, rank, index), not of the "
                         "worker count",
    "batch_size_val": "evaluation encoding batch (and paired_block's block: a LEAKING diagnostic)",
    "eval_chunk": "evaluation fusion chunk: scores depend only on their pair",
    "dsl": "an extra report beside the plain metrics",
    "dump_topk": "an extra test output",
    "eval_order_seed": "test order: scores must not depend on it",
    "audio_perturb": "test split only",
    "audio_noise_rms": "test split only",
    "test_csv": "test split only",
    "device": "another device of the same kind of run (rounding may differ)",
    "tf32": "fp32 matmul precision on CUDA (rounding differs)",
    "grad_checkpointing": "recomputes CLIP blocks in backward: the same math",
    "train_pairs_per_chunk": "pairs fused per chunk: the same math, other rounding",
    "weights_cache": "where released weights are looked up",
    "offline": "whether weights may be downloaded",
    "data_path": "the same annotation files in another place",
    "features_path": "the same videos in another place",
    "audio_path": "the same wav files in another place",
    "audio_feature_cache": "the same AST token cache in another place (its trunk is still checked)",
    "pretrained_clip_name": "the same CLIP weights in another place (the state holds the trained weights)",
    "ast_checkpoint": "the same AST weights in another place (the state holds the trained weights)",
}


class ResumeMismatch(ValueError):
    """Flags of a resumed run that differ from those of the state it continues."""


def check_overrides(names: Iterable[str], valid: Iterable[str]) -> list[str]:
    """Problems with ``--resume_override`` names: unknown flags, or flags that may not differ."""
    valid = set(valid)
    problems = []
    for name in names:
        flag = name.lstrip("-")
        if flag not in valid:
            problems.append(f"--resume_override {name}: there is no flag --{flag}")
        elif flag not in OVERRIDABLE:
            problems.append(f"--resume_override {name}: --{flag} shapes the data order, the model, the objective "
                            f"or the schedule, so a resumed run cannot change it (overridable: "
                            f"{', '.join(sorted(OVERRIDABLE))})")
    return problems


def differences(saved: dict, given: dict, defaults: dict) -> dict:
    """{flag: (saved value, given value)} of the flags that are not per-invocation and differ."""
    out = {}
    for name, value in given.items():
        if name in PER_INVOCATION:
            continue
        before = saved.get(name, defaults.get(name))
        if _normalized(before) != _normalized(value):
            out[name] = (before, value)
    return out


def _normalized(value):
    """Lists and tuples compare equal (JSON round trips turn tuples into lists)."""
    return list(value) if isinstance(value, tuple) else value


def check_resume(saved: dict, args: argparse.Namespace, defaults: dict, source: str) -> dict:
    """Compare the flags of a resumed run with the saved ones.

    Args:
        saved: the flags saved in the training state (``vars(args)`` of the run that wrote it).
        args: this run's resolved flags; ``args.resume_override`` the flags allowed to differ.
        defaults: the parser's defaults (for flags the saved state lacks).
        source: the training state file (for messages).
    Returns: {flag: (saved, given)} of the allowed (overridden) differences.
    Raises ResumeMismatch naming each refused flag with both values.
    """
    allowed = {name.lstrip("-") for name in (args.resume_override or [])}
    changed = differences(saved, vars(args), defaults)
    refused = {k: v for k, v in changed.items() if k not in allowed}
    if refused:
        lines = "; ".join(f"--{k}: saved {v[0]!r}, given {v[1]!r}" + (" (overridable with --resume_override "
                                                                          f"{k}: {OVERRIDABLE[k]})"
                                                                          if k in OVERRIDABLE else "")
                          for k, v in sorted(refused.items()))
        raise ResumeMismatch(f"--resume_model {source} was written with other flags than this run's: {lines}. "
                             f"Repeat the saved values (the run's args.json) or start a new run.")
    return {k: v for k, v in changed.items() if k in allowed}
