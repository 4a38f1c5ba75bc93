"""The architecture flags: one table that the command line, the model configuration and the
checkpoint record all read.

Each entry (``ArchitectureFlag``) names a flag, its type, default, choices and help, and the
``AVIGATEConfig`` field it sets. From this table:

- ``main_task_retrieval.build_parser`` adds the flags (``add_arguments``);
- ``main_task_retrieval.model_config`` sets their config fields (``apply_flags``);
- ``checkpoint_record`` records them beside every checkpoint and checks a flag given on the
  command line against the record (``FLAG_NAMES``); the text flags (``TEXT_FLAG_NAMES``) may
  differ in the warm start of a text-guided model (docs/design.md §4a).

The fields of ``AVIGATEConfig`` that no flag sets are listed in ``FIELDS_WITHOUT_FLAG`` with
where their value comes from (tests/test_architecture.py checks that the two lists cover the
configuration). Standard library only: the entry point parses flags before its torch imports.
"""
from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Mapping, Optional

# Allowed values of the str-valued architecture fields (the config classes check them too).
GATE_MODES = ("soft", "hard", "none")               # FusionConfig.gate
PADDING_RULES = ("masked", "released")               # FusionConfig.padding_rule
TEXT_INITS = ("zero", "normal")                      # FusionConfig.text_init
ALIGNMENTS = ("both", "global", "local")             # AVIGATEConfig.alignment (docs/design.md §5)
# The --help groups that list architecture flags (main_task_retrieval.build_parser).
HELP_GROUPS = ("data", "model")


@dataclasses.dataclass(frozen=True)
class ArchitectureFlag:
    """One architecture flag.

    Args:
        name: the flag without "--"; also its argparse destination and its key in a record.
        field: the AVIGATEConfig field it sets, "section.name" for a nested config
            ("fusion.layers") or the name of AVIGATEConfig's own field ("temperature").
        help: its --help text.
        type: int, float or str for a flag that takes a value; None for a switch (store_true).
        default: the value when the flag is left out (False for a switch).
        choices: the values it accepts (None: any value of ``type``).
        negated: the field holds the switch's negation (--no_audio sets fusion.use_audio).
        text: a flag of the text-guided extension (docs/design.md §4): it may differ from a
            text-agnostic checkpoint's record in the warm start.
        guiding: a text flag that makes the model text-guided (text_init only sets how the
            text terms start).
        group: the --help group that lists it (HELP_GROUPS).
    """

    name: str
    field: str
    help: str
    type: Optional[type] = None
    default: Any = False
    choices: Optional[tuple] = None
    negated: bool = False
    text: bool = False
    guiding: bool = False
    group: str = "model"

    def __post_init__(self):
        if self.group not in HELP_GROUPS:
            raise ValueError(f"architecture flag --{self.name}: group {self.group!r} is not one of {HELP_GROUPS}")
        if self.type is None and self.default is not False:
            raise ValueError(f"architecture flag --{self.name}: a switch (type None) is off by default")
        if self.negated and self.type is not None:
            raise ValueError(f"architecture flag --{self.name}: only a switch can be negated")
        if self.guiding and not self.text:
            raise ValueError(f"architecture flag --{self.name}: a guiding flag is a text flag")

    @property
    def is_switch(self) -> bool:
        return self.type is None

    def argparse_options(self) -> dict:
        """The keyword arguments of its ``add_argument`` call."""
        if self.is_switch:
            return {"action": "store_true", "help": self.help}
        options = {"type": self.type, "default": self.default, "help": self.help}
        if self.choices is not None:
            options["choices"] = self.choices
        return options

    def config_value(self, flag_value: Any) -> Any:
        """The config field's value for the flag's value."""
        return not flag_value if self.negated else flag_value


# In the order --help lists them within their group.
FLAGS = (
    ArchitectureFlag("max_frames", "fusion.max_frames", "frames per video F (architecture: frame positions)",
                     type=int, default=12, group="data"),
    ArchitectureFlag("cross_num_hidden_layers", "fusion.layers", "fusion transformer blocks", type=int, default=4),
    ArchitectureFlag("audio_query_layers", "resampler.layers", "audio resampler blocks", type=int, default=4),
    ArchitectureFlag("temperature", "temperature", "tau of the local log-sum-exp score", type=float, default=1.0),
    ArchitectureFlag("gate", "fusion.gate",
                     "fusion gates: soft (tanh), hard (open/closed), none (fixed at 1, ungated fusion)",
                     type=str, default="soft", choices=GATE_MODES),
    ArchitectureFlag("fusion_residual", "fusion.fusion_residual",
                     "V = r x_L + (1 - r) v0 (1.0 = the paper's plain output)", type=float, default=0.05),
    ArchitectureFlag("no_audio", "fusion.use_audio", "visual-only baseline (V = v0)", negated=True),
    ArchitectureFlag("text_gate", "fusion.text_gate", "gates see the text embedding", text=True, guiding=True),
    ArchitectureFlag("text_query", "fusion.text_query", "text injected into the cross-attention query",
                     text=True, guiding=True),
    ArchitectureFlag("query_gate", "fusion.query_gate", "gate the text injection", text=True, guiding=True),
    ArchitectureFlag("padding_rule", "fusion.padding_rule",
                     "padded frames: masked (excluded from gate means and self-attention keys) or "
                     "released (the released code: blank-frame embeddings, means over all frames)",
                     type=str, default="masked", choices=PADDING_RULES),
    ArchitectureFlag("alignment", "alignment",
                     "similarity: the mean of the global and local (log-sum-exp) terms, or one alone",
                     type=str, default="both", choices=ALIGNMENTS),
    ArchitectureFlag("text_init", "fusion.text_init",
                     "text-guided terms start at zero (the model starts as text-agnostic AVIGATE) "
                     "or normal (the earlier random start)",
                     type=str, default="zero", choices=TEXT_INITS, text=True),
)
BY_NAME = {flag.name: flag for flag in FLAGS}
FLAG_NAMES = tuple(BY_NAME)
# The text-guided extension's flags (docs/design.md §4); they may differ in the documented warm start.
TEXT_FLAGS = tuple(flag for flag in FLAGS if flag.text)
TEXT_FLAG_NAMES = tuple(flag.name for flag in TEXT_FLAGS)
# The flags that make a model text-guided.
GUIDING_FLAG_NAMES = tuple(flag.name for flag in FLAGS if flag.guiding)

# AVIGATEConfig fields that no flag sets, and where their values come from.
FIELDS_WITHOUT_FLAG = {
    "clip": "the CLIP weights (--pretrained_clip_name) or the checkpoint's record",
    "ast": "the AST weights (--ast_checkpoint) or the checkpoint's record",
    "resampler.width": "the CLIP embedding width D",
    "resampler.num_queries": "the released model's 12 audio queries",
    "resampler.heads": "width // 64",
    "resampler.mlp_ratio": "the released model's 4",
    "resampler.ln_eps": "the released recipe's 1e-12",
    "fusion.width": "the CLIP embedding width D",
    "fusion.heads": "width // 64",
    "fusion.mlp_ratio": "the released model's 4",
    "fusion.hard_gate_threshold": "0, the midpoint of tanh's range (FusionConfig)",
    "fusion.ln_eps": "the released recipe's 1e-12",
}


def add_arguments(group: argparse._ActionsContainer, help_group: str) -> None:
    """Add the architecture flags that --help lists in ``help_group`` to ``group`` (a parser or
    one of its argument groups)."""
    if help_group not in HELP_GROUPS:
        raise ValueError(f"help group {help_group!r} is not one of {HELP_GROUPS}")
    for flag in FLAGS:
        if flag.group == help_group:
            group.add_argument(f"--{flag.name}", **flag.argparse_options())


def is_text_guided(flags: Mapping[str, Any]) -> bool:
    """Whether flag values ({name: value}, e.g. a record's or ``vars(args)``) make the model text-guided."""
    return any(bool(flags.get(name)) for name in GUIDING_FLAG_NAMES)


def get_field(config: Any, path: str) -> Any:
    """The value at ``path`` ("fusion.layers", "temperature") of a config dataclass."""
    for part in path.split("."):
        config = getattr(config, part)
    return config


def set_fields(config: Any, values: Mapping[str, Any]) -> Any:
    """A copy of ``config`` with ``values`` ({path: value}) set: one ``dataclasses.replace`` per
    nested config, so each config's own checks see all of its new values at once."""
    top, nested = {}, {}
    for path, value in values.items():
        head, _, rest = path.partition(".")
        if rest:
            nested.setdefault(head, {})[rest] = value
        else:
            top[head] = value
    for section, fields in nested.items():
        top[section] = set_fields(getattr(config, section), fields)
    return dataclasses.replace(config, **top)


def apply_flags(config: Any, values: Mapping[str, Any]) -> Any:
    """A copy of ``config`` (an AVIGATEConfig) with every flag's field set from the flag's value
    in ``values`` ({flag name: value}, e.g. ``vars(args)``)."""
    return set_fields(config, {flag.field: flag.config_value(values[flag.name]) for flag in FLAGS})
