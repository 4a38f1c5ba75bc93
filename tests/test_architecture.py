"""One table of architecture flags (modules/architecture.py) that the parser, model_config and
the checkpoint record read (issue 21, deliverable 4): the table and AVIGATEConfig cover each
other, each flag sets its field, the parser's flags are the table's."""
import dataclasses
import typing

import pytest

import main_task_retrieval
from modules import architecture, fusion, similarity
from modules.ast import ASTConfig
from modules.clip import CLIPConfig
from modules.modeling import AVIGATEConfig
from modules.resampler import ResamplerConfig

REQUIRED = ["--output_dir", "o", "--data_path", "d", "--features_path", "v"]
# The flags that records written so far carry: renaming or dropping one would make an older
# record's value be ignored (checkpoint_record.resolve_flags reads only the table's names).
RECORDED_SINCE_VERSION_1 = {"max_frames", "cross_num_hidden_layers", "audio_query_layers", "temperature",
                            "alignment", "gate", "fusion_residual", "no_audio", "padding_rule",
                            "text_gate", "text_query", "query_gate", "text_init"}


def config_leaves(cls, prefix: str = "") -> set[str]:
    """Dotted paths of ``cls``'s fields, entering nested config dataclasses unless the whole
    nested config is listed in FIELDS_WITHOUT_FLAG (clip, ast: read from their weights)."""
    hints = typing.get_type_hints(cls)
    paths = set()
    for f in dataclasses.fields(cls):
        path = prefix + f.name
        if dataclasses.is_dataclass(hints[f.name]) and path not in architecture.FIELDS_WITHOUT_FLAG:
            paths |= config_leaves(hints[f.name], path + ".")
        else:
            paths.add(path)
    return paths


def tiny_model_config(argv: list[str]) -> AVIGATEConfig:
    args = main_task_retrieval.build_parser().parse_args(REQUIRED + argv)
    return main_task_retrieval.model_config(args, CLIPConfig.tiny(), ASTConfig.tiny())


def other_value(flag: architecture.ArchitectureFlag) -> tuple[list[str], object]:
    """Command-line words giving ``flag`` a value other than its default, and that value."""
    if flag.is_switch:
        return [f"--{flag.name}"], True
    if flag.choices is not None:
        value = next(choice for choice in flag.choices if choice != flag.default)
    else:
        value = flag.type(flag.default * 0.5 if flag.type is float else flag.default + 1)
    return [f"--{flag.name}", str(value)], value


def test_table_and_model_config_cover_each_other():
    flag_fields = [flag.field for flag in architecture.FLAGS]
    assert len(set(flag_fields)) == len(flag_fields), "two architecture flags set the same config field"
    assert not set(flag_fields) & set(architecture.FIELDS_WITHOUT_FLAG)
    leaves = config_leaves(AVIGATEConfig)
    missing = leaves - set(flag_fields) - set(architecture.FIELDS_WITHOUT_FLAG)
    assert not missing, (f"AVIGATEConfig fields {sorted(missing)} have no entry in modules/architecture.py: add a "
                         f"flag to FLAGS or say where the value comes from in FIELDS_WITHOUT_FLAG")
    unknown = (set(flag_fields) | set(architecture.FIELDS_WITHOUT_FLAG)) - leaves
    assert not unknown, f"modules/architecture.py names fields AVIGATEConfig lacks: {sorted(unknown)}"


def test_table_defaults_are_the_config_defaults():
    default = AVIGATEConfig()
    for flag in architecture.FLAGS:
        assert flag.config_value(flag.default) == architecture.get_field(default, flag.field), flag.name
    width = CLIPConfig.tiny().embed_dim
    assert tiny_model_config([]) == AVIGATEConfig(clip=CLIPConfig.tiny(), ast=ASTConfig.tiny(),
                                                  resampler=ResamplerConfig(width=width),
                                                  fusion=fusion.FusionConfig(width=width))


@pytest.mark.parametrize("flag", architecture.FLAGS, ids=lambda flag: flag.name)
def test_each_flag_sets_its_field_and_only_it(flag):
    base = tiny_model_config([])
    words, value = other_value(flag)
    cfg = tiny_model_config(words)
    assert architecture.get_field(cfg, flag.field) == flag.config_value(value)
    assert architecture.get_field(base, flag.field) != flag.config_value(value)
    assert cfg == architecture.set_fields(base, {flag.field: flag.config_value(value)})


def test_parser_flags_are_the_table():
    parser = main_task_retrieval.build_parser()
    actions = {action.dest: action for action in parser._actions}
    for flag in architecture.FLAGS:
        action = actions[flag.name]
        assert action.option_strings == [f"--{flag.name}"]
        assert (action.default, action.choices, action.help) == (flag.default, flag.choices, flag.help), flag.name
        assert (action.nargs == 0) == flag.is_switch, flag.name
        group = next(g for g in parser._action_groups if action in g._group_actions)
        assert group.title == flag.group, flag.name


def test_recorded_flag_names_stay_and_text_flags_are_the_text_fields():
    assert RECORDED_SINCE_VERSION_1 <= set(architecture.FLAG_NAMES)
    assert set(architecture.GUIDING_FLAG_NAMES) < set(architecture.TEXT_FLAG_NAMES)
    text_fields = {flag.field.split(".")[-1] for flag in architecture.TEXT_FLAGS}
    assert text_fields == {"text_gate", "text_query", "query_gate", "text_init"}
    assert architecture.is_text_guided({"query_gate": True}) and not architecture.is_text_guided({"text_init": "normal"})


def test_modules_check_the_table_choices():
    assert fusion.GATE_MODES is architecture.GATE_MODES and fusion.PADDING_RULES is architecture.PADDING_RULES
    assert fusion.TEXT_INITS is architecture.TEXT_INITS and similarity.ALIGNMENTS is architecture.ALIGNMENTS
    with pytest.raises(ValueError, match="--gate"):
        fusion.FusionConfig(gate="sometimes")


def test_set_fields_replaces_each_config_once():
    cfg = AVIGATEConfig.tiny()
    changed = architecture.set_fields(cfg, {"temperature": 0.5, "fusion.gate": "hard", "fusion.layers": 3})
    assert (changed.temperature, changed.fusion.gate, changed.fusion.layers) == (0.5, "hard", 3)
    assert changed.resampler == cfg.resampler and cfg.fusion.gate == "soft"  # a copy
    # Both fields reach FusionConfig's own check together (text guidance needs the audio fusion).
    with pytest.raises(ValueError, match="--no_audio"):
        architecture.set_fields(cfg, {"fusion.use_audio": False, "fusion.text_gate": True})


def test_a_bad_table_entry_is_an_error_naming_the_flag():
    with pytest.raises(ValueError, match="--x.*group"):
        architecture.ArchitectureFlag("x", "fusion.layers", "h", type=int, default=1, group="optimization")
    with pytest.raises(ValueError, match="--y.*switch"):
        architecture.ArchitectureFlag("y", "fusion.layers", "h", type=int, default=1, negated=True)
    with pytest.raises(ValueError, match="--z.*off by default"):
        architecture.ArchitectureFlag("z", "fusion.text_gate", "h", default=True)
