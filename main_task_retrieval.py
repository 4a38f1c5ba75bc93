"""Train and evaluate (text-guided) AVIGATE for text-to-video retrieval.

The only place that reads command-line flags: they become the dataclass configs of the
model, data and optimizer, and the work is done by small functions in ``training.py``, ``evaluation.py`` and
``util.py``.

Runs as ``python main_task_retrieval.py ...`` (CPU or one GPU) and under ``torchrun``
(single or multi node; ``--batch_size`` is the global batch). Examples: run.sh (MSR-VTT
recipe and the paper's ablations as presets), run_eval.sh (evaluate a checkpoint),
run_vatex.sh, run_charades.sh.

Checkpoints describe themselves (checkpoint_record.py): ``--init_model`` / ``--resume_model``
read the architecture from the checkpoint's record, so architecture flags may be left out; an
architecture flag that contradicts the record is an error naming both values.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Optional

import checkpoint_record
import resume_contract
from modules import architecture, weights

# The other flags' choices (the architecture flags' are in modules/architecture.py), spelled out
# here so that --help and flag errors answer before the torch-heavy imports further down
# (tests/test_checkpoint_record.py checks each against its owner module).
DATATYPES = ("charades", "msrvtt", "vatex")                     # dataloaders.registry.DATASETS
DECODERS = ("opencv", "pyav")                                   # dataloaders.video.DECODERS
DEFAULT_DECODER = "opencv"                                      # dataloaders.video.DEFAULT_DECODER
PRECISIONS = ("fp32", "bf16", "fp16")                           # util.PRECISIONS
TRAINING_PAIRS = ("all", "hardest_k", "own_caption")            # modules.objective.TRAINING_PAIRS
OPTIMIZERS = ("bertadam", "adamw")                              # modules.optimization.OPTIMIZERS
BAD_AUDIO = ("error", "zero")
EVAL_PROTOCOLS = ("honest", "paired_block")
DEVICES = ("auto", "cpu", "cuda")
CLIP_SCOPES = ("group", "global")                               # modules.optimization.CLIP_SCOPES
DECAY_RULES = ("ndim", "released")                              # modules.optimization.DECAY_RULES
AUDIO_PERTURBATIONS = ("none", "silence", "noise", "swap")      # dataloaders.perturb.AUDIO_PERTURBATIONS
GATE_LOG_SPLITS = ("none", "val", "test")                       # gate_log.GATE_LOG_SPLITS
DEFAULT_NOISE_RMS = 0.1                                         # dataloaders.perturb.DEFAULT_NOISE_RMS
DEFAULT_MAX_MISSING_AUDIO = 0.05                                # dataloaders.audio_presence.DEFAULT_MAX_MISSING
DEFAULT_AST_CHECKPOINT = os.path.join(weights.MODULES_DIR, weights.AST_RELEASE.file_name)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every option's help ends with its default, once: "(default: X)" is added unless the
    help already states it; switches (off by default) and defaults of None, whose meaning
    each help spells out, get none."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        default = action.default
        if "%(default)" in help_text or "(default" in help_text or default is None or default is False \
                or default == argparse.SUPPRESS:
            return help_text
        return f"{help_text} (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """Flag errors are one line (plus where the flags are listed), not the 60-line usage."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n(python main_task_retrieval.py --help lists every flag)\n")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(description=__doc__, formatter_class=HelpFormatter)
    a = p.add_argument_group("run")
    a.add_argument("--do_train", action="store_true", help="train, then evaluate the selected checkpoint")
    a.add_argument("--do_eval", action="store_true", help="evaluate --init_model on the test split")
    a.add_argument("--skip_test", action="store_true",
                   help="with --do_train: stop after training, without the test-split evaluation "
                        "(evaluate the selected checkpoint later with --do_eval)")
    a.add_argument("--output_dir", required=True,
                   help="run directory (checkpoints, logs, outputs); a folder holding an earlier run is "
                        "refused (except when --resume_model continues the run in it)")
    a.add_argument("--seed", type=int, default=42, help="seed of the model init, data order and workers")
    a.add_argument("--device", choices=DEVICES, default="auto", help="auto: CUDA when available, else the CPU")
    a.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="training: bf16/fp16 autocast of the encoders and the fusion (fp16 adds a GradScaler); "
                        "similarities and the loss always run in fp32. Evaluation uses --eval_precision")
    a.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True,
                   help="TF32 tensor-core matmuls/convolutions for fp32 work on CUDA (scores stay IEEE fp32)")
    a.add_argument("--check_only", action="store_true",
                   help="check the flags, the data files (annotations, videos, wavs) and the weights (fetched into "
                        "the weights cache when missing), print a summary and exit without work; run.sh runs "
                        "this once before starting its ranks")
    a.add_argument("--n_display", type=int, default=100, help="log the loss every n optimizer steps")
    a.add_argument("--tensorboard", action="store_true", help="also write TensorBoard scalars")
    a.add_argument("--init_model", default=None,
                   help="model-only weights to start from / evaluate (pytorch_model.bin.N; its record "
                        "pytorch_model.bin.N.json supplies the architecture flags left out)")
    a.add_argument("--resume_model", default=None,
                   help="training state (training_state.pt) to continue, mid-epoch included; every flag that "
                        "shapes the run must equal the saved one (docs/training.md)")
    a.add_argument("--resume_override", nargs="+", default=[], metavar="FLAG",
                   help="with --resume_model: let these documented-safe flags differ from the saved run's "
                        f"({', '.join(sorted(resume_contract.OVERRIDABLE))})")
    a.add_argument("--save_every_steps", type=int, default=0,
                   help="write the full training state every n steps (0: at epoch ends only)")
    a.add_argument("--max_steps", type=int, default=0,
                   help="stop after n optimizer steps of the run, saving the training state and a model file "
                        "pytorch_model.bin.step<n> (0: no limit); the schedule still spans --epochs")

    d = p.add_argument_group("data")
    d.add_argument("--datatype", choices=DATATYPES, default="msrvtt", help="dataset format")
    d.add_argument("--data_path", required=True,
                   help="directory of the annotation files (MSRVTT_data.json may be named instead)")
    d.add_argument("--features_path", required=True, help="directory of <video_id>.mp4 files")
    d.add_argument("--audio_path", default=None, help="directory of <video_id>.wav files (or --audio_feature_cache)")
    d.add_argument("--audio_feature_cache", default=None,
                   help="AST token cache (preprocess/cache_audio_features.py) used instead of --audio_path")
    d.add_argument("--train_csv", default=None, help="training annotation file (default: the datatype's)")
    d.add_argument("--val_csv", default=None,
                   help="validation file that picks the best epoch (e.g. from preprocess/make_val_split.py); "
                        "without it the last epoch is tested. Passing the test file (MSR-VTT 1k-A) here "
                        "and as --test_csv reproduces the published recipes, which selected on the test set")
    d.add_argument("--test_csv", default=None, help="test annotation file (default: the datatype's)")
    d.add_argument("--max_words", type=int, default=32, help="caption tokens, start and end included")
    architecture.add_arguments(d, "data")  # --max_frames
    d.add_argument("--feature_framerate", type=float, default=1.0, help="frames sampled per second")
    d.add_argument("--slice_framepos", type=int, choices=(0, 1, 2), default=2,
                   help="more frames than --max_frames: 0 head, 1 tail, 2 uniform")
    d.add_argument("--expand_msrvtt_sentences", action="store_true",
                   help="every caption is a training sample (any datatype); else one random caption "
                        "per video per epoch")
    d.add_argument("--decoder", choices=DECODERS, default=DEFAULT_DECODER, help="video decoding library")
    d.add_argument("--frame_cache", default=None,
                   help="frame cache (python -m preprocess.cache_frames, same frame flags): frames read, not "
                        "decoded; refused if built with other flags or from changed videos")
    d.add_argument("--skip_bad_videos", action="store_true",
                   help="drop missing/unreadable videos (counted) instead of failing")
    d.add_argument("--on_bad_audio", choices=BAD_AUDIO, default="error",
                   help="unreadable wav: fail or use the zero fbank (counted)")
    d.add_argument("--max_missing_audio", type=float, default=DEFAULT_MAX_MISSING_AUDIO,
                   help="stop before any work when more than this fraction of a split's videos have no wav in "
                        "--audio_path (videos listed as without soundtrack by preprocess/extract_audio.py "
                        "do not count); 1 = never stop")
    d.add_argument("--num_thread_reader", type=int, default=1, help="DataLoader workers")
    d.add_argument("--batch_size", type=int, default=128, help="GLOBAL training batch (all ranks)")
    d.add_argument("--batch_size_val", type=int, default=16,
                   help="evaluation encoding batch per rank; also the block of --eval_protocol paired_block")

    m = p.add_argument_group("model")
    m.add_argument("--pretrained_clip_name", default="ViT-B/32",
                   help="ViT-B/32, ViT-B/16 (modules/ViT-B-*.pt, else the weights cache, else downloaded "
                        "and SHA-256-checked) or a CLIP checkpoint path (OpenAI or open_clip format)")
    m.add_argument("--ast_checkpoint", default=DEFAULT_AST_CHECKPOINT,
                   help="AST AudioSet checkpoint (released .pth or transformers ASTModel .bin/.safetensors); "
                        "the default file is taken from the weights cache or downloaded when missing")
    m.add_argument("--weights_cache", default=None,
                   help=weights.WEIGHTS_CACHE_HELP)
    m.add_argument("--offline", action="store_true",
                   help=f"{weights.OFFLINE_HELP}; a missing file is an error naming its URL and where to put it")
    m.add_argument("--allow_unlisted_weights", action="store_true",
                   help="use a local file named like a release (modules/ViT-B-32.pt) although its SHA-256 is "
                        "not the published one (e.g. a re-saved copy); recorded with its own SHA-256")
    architecture.add_arguments(m, "model")  # the architecture flags (modules/architecture.py)
    m.add_argument("--grad_checkpointing", action="store_true", help="recompute CLIP blocks in backward")

    o = p.add_argument_group("optimization")
    o.add_argument("--optimizer", choices=OPTIMIZERS, default="bertadam",
                   help="bertadam (the released recipe's Adam without bias correction) or adamw")
    o.add_argument("--lr", type=float, default=1e-4, help="lr of new modules and audio_projection")
    o.add_argument("--coef_lr", type=float, default=1e-3, help="CLIP lr = lr x coef_lr")
    o.add_argument("--query_lr_scale", type=float, default=100.0,
                   help="resampler query tokens' lr = lr x query_lr_scale (the released recipe's rate)")
    o.add_argument("--epochs", type=int, default=5, help="training epochs")
    o.add_argument("--warmup_proportion", type=float, default=0.1, help="fraction of the steps in linear warmup")
    o.add_argument("--gradient_accumulation_steps", type=int, default=1,
                   help="micro-batches per step (each a smaller contrastive batch)")
    o.add_argument("--freeze_layer_num", type=int, default=0, help="leading CLIP blocks frozen per tower")
    o.add_argument("--freeze_clip", action="store_true",
                   help="freeze both CLIP towers (their logit_scale still trains); the paper's Table 11 (f)")
    o.add_argument("--train_ast", action="store_true",
                   help="fine-tune the AST trunk at lr x coef_lr (needs --audio_path: a token cache holds the "
                        "frozen trunk's output); the paper's Table 11 (e)")
    o.add_argument("--grad_clip_scope", choices=CLIP_SCOPES, default="group",
                   help="clip each parameter group's gradient norm at 1.0 or the global norm (the released "
                        "training loop, docs/design.md §7)")
    o.add_argument("--weight_decay_rule", choices=DECAY_RULES, default="ndim",
                   help="decay tensors with >= 2 dims or every tensor whose name lacks 'bias' "
                        "(released: LayerNorm weights and logit_scale decay too, docs/design.md §7)")
    o.add_argument("--freeze_agnostic", action="store_true",
                   help="text-guided models: train only the text terms; the text-agnostic model (e.g. "
                        "the AVIGATE checkpoint of --init_model) stays exactly as it is")
    o.add_argument("--beta", type=float, default=0.2, help="adaptive-margin slope")
    o.add_argument("--margin_BD", type=float, default=0.1, help="adaptive-margin cap (VATEX 0.05)")
    o.add_argument("--margin_fixed", action="store_true",
                   help="every negative pair's margin = --margin_BD instead of the adaptive margin "
                        "(the paper's fixed-margin row of Table 4; --beta is then unused)")
    o.add_argument("--training_pairs", choices=TRAINING_PAIRS, default="all",
                   help="text-guided training pairs; own_caption is a LEAKING diagnostic")
    o.add_argument("--hardest_k", type=int, default=8, help="negatives per text for hardest_k")
    o.add_argument("--train_pairs_per_chunk", type=int, default=0,
                   help="text-guided training: pairs fused per chunk, each recomputed in backward "
                        "(0: all of a rank's pairs at once); see docs/precision_memory.md")

    e = p.add_argument_group("evaluation")
    e.add_argument("--eval_protocol", choices=EVAL_PROTOCOLS, default="honest",
                   help="paired_block reproduces a LEAKING public protocol (labelled in outputs)")
    e.add_argument("--eval_chunk", type=int, nargs="+", default=None, metavar="N",
                   help="texts [videos] per fusion chunk (default: from a memory budget)")
    e.add_argument("--eval_precision", choices=PRECISIONS, default="fp32",
                   help="autocast of the encoders and the fusion in validation and test; fp32 reproduces the "
                        "published numbers (bf16 moves some ranks, docs/first_hour.md); scores are fp32 always")
    e.add_argument("--dsl", action="store_true", help="also report dual-softmax metrics")
    e.add_argument("--rerank_topk", type=int, default=0, metavar="K",
                   help="text-guided models: rank every pair with the agnostic view, then fuse only each "
                        "text's top-K videos and each video's top-K texts (0: fuse every pair)")
    e.add_argument("--audio_perturb", choices=AUDIO_PERTURBATIONS, default="none",
                   help="replace every test video's audio: silence (the all-zero AST input), noise (white "
                        "noise at --audio_noise_rms) or swap (another test video's audio, a derangement "
                        "fixed by --seed); frames and texts stay as they are (docs/evaluation.md 'Is a "
                        "text-conditioned number real?')")
    e.add_argument("--audio_noise_rms", type=float, default=DEFAULT_NOISE_RMS,
                   help="--audio_perturb noise: RMS of the Gaussian noise waveform (full scale 1; 0.1 = -20 dBFS)")
    e.add_argument("--eval_order_seed", type=int, default=None,
                   help="evaluate the test texts and videos in an order permuted by this seed (scores must "
                        "not change; tools/audit_protocol.py uses it)")
    e.add_argument("--gate_log_split", choices=GATE_LOG_SPLITS, default="none",
                   help="before training and after every epoch, write gates_per_epoch.json and .png to --output_dir: "
                        "mean |g_att| and |g_ff| per layer for informative vs noise videos of this split (val: "
                        "--val_csv, test: --test_csv) and their AUC, from the agnostic video encoder "
                        "(docs/diagnostics.md); the training numbers do not change")
    e.add_argument("--gate_labels", default=None,
                   help="per-video labels for --gate_log_split, {\"videos\": {id: {\"informative_audio\": bool}}} "
                        "(default: metadata.json in --data_path, as the synthetic benchmark writes it)")
    e.add_argument("--dump_topk", type=int, default=0, metavar="K",
                   help="write topk.jsonl: each text's K best videos with scores (and gates), and its "
                        "video's rank (tools/error_report.py renders the worst queries)")
    return p


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace, world_size: int) -> None:
    """Flag combinations that cannot work, reported before any process group starts (and, run
    as a script, before the torch imports)."""
    if not (args.do_train or args.do_eval):
        parser.error("nothing to do: pass --do_train and/or --do_eval")
    if args.batch_size % world_size:
        parser.error(f"--batch_size {args.batch_size} is the GLOBAL batch and must be divisible by the "
                     f"world size {world_size} (torchrun processes)")
    if args.batch_size % (world_size * args.gradient_accumulation_steps):
        parser.error(f"--batch_size {args.batch_size} must be divisible by world size {world_size} x "
                     f"--gradient_accumulation_steps {args.gradient_accumulation_steps}")
    if args.skip_test and not args.do_train:
        parser.error("--skip_test skips the test after training: it needs --do_train")
    if args.resume_model and not args.do_train:
        parser.error("--resume_model continues training: add --do_train")
    if args.resume_override and not args.resume_model:
        parser.error("--resume_override lets a resumed run differ from its saved flags: it needs --resume_model")
    problems = resume_contract.check_overrides(args.resume_override, vars(args))
    if problems:
        parser.error("; ".join(problems))
    if not args.no_audio and not (args.audio_path or args.audio_feature_cache):
        parser.error("the model fuses audio: pass --audio_path or --audio_feature_cache (or --no_audio)")
    if args.eval_chunk is not None and len(args.eval_chunk) > 2:
        parser.error("--eval_chunk takes one (texts = videos) or two (texts videos) numbers")
    if args.n_display < 1:
        parser.error("--n_display must be >= 1")
    if args.query_lr_scale < 0:
        parser.error(f"--query_lr_scale must be >= 0, got {args.query_lr_scale}")
    text_guided = architecture.is_text_guided(vars(args))
    if args.rerank_topk < 0:
        parser.error(f"--rerank_topk must be >= 1 (or 0 to fuse every pair), got {args.rerank_topk}")
    if args.rerank_topk and not text_guided:
        parser.error("--rerank_topk re-ranks with text-guided pair fusion: add the text-guided flags "
                     "(--text_gate/--text_query/--query_gate) or drop --rerank_topk")
    if args.rerank_topk and args.eval_protocol != "honest":
        parser.error("--rerank_topk and --eval_protocol paired_block exclude each other")
    if args.freeze_agnostic and not text_guided:
        parser.error("--freeze_agnostic trains only the text terms of a text-guided model: add the "
                     "text-guided flags or drop --freeze_agnostic")
    if args.freeze_agnostic and (args.freeze_clip or args.train_ast):
        parser.error("--freeze_agnostic trains only the text terms: --freeze_clip / --train_ast would have no "
                     "effect; drop one of them")
    if args.train_ast and args.no_audio:
        parser.error("--train_ast fine-tunes the AST trunk, which --no_audio does not build: drop one of them")
    if args.train_ast and args.audio_feature_cache:
        parser.error("--train_ast fine-tunes the AST trunk, but --audio_feature_cache holds the frozen trunk's "
                     "tokens and skips it: pass --audio_path (the wavs) instead of --audio_feature_cache")
    if args.audio_perturb == "noise" and not args.audio_noise_rms > 0:
        parser.error(f"--audio_noise_rms must be > 0, got {args.audio_noise_rms}")
    if args.gate_log_split != "none" and not args.do_train:
        parser.error("--gate_log_split logs the gates during training: add --do_train")
    if args.gate_log_split == "val" and not args.val_csv:
        parser.error("--gate_log_split val logs the gates on the validation split: pass --val_csv "
                     "(or use --gate_log_split test)")
    if args.dump_topk < 0:
        parser.error(f"--dump_topk must be >= 0 (0: no dump), got {args.dump_topk}")
    for problem in ineffective_flags(parser, args):
        parser.error(problem)
    check_output_dir(parser, args)


def ineffective_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[str]:
    """Flag combinations in which a flag would silently do nothing (each one an error)."""
    def changed(name: str) -> bool:
        return getattr(args, name) != parser.get_default(name)

    text_guided = architecture.is_text_guided(vars(args))
    problems = []
    if args.dsl and args.rerank_topk:
        problems.append("--dsl post-processes the plain score matrix, which --rerank_topk replaces by two rankings "
                        "(no DSL is computed on them): drop one of them")
    if not text_guided:
        for name in ("training_pairs", "hardest_k", "train_pairs_per_chunk", "text_init"):
            if changed(name):
                problems.append(f"--{name} {getattr(args, name)} applies to text-guided models (pair fusion, text "
                                f"terms); this one is text-agnostic: add --text_gate/--text_query/--query_gate or "
                                f"drop --{name}")
    elif changed("hardest_k") and args.training_pairs != "hardest_k":
        problems.append(f"--hardest_k {args.hardest_k} is read only with --training_pairs hardest_k (given: "
                        f"{args.training_pairs})")
    if changed("audio_noise_rms") and args.audio_perturb != "noise":
        problems.append(f"--audio_noise_rms {args.audio_noise_rms} is read only with --audio_perturb noise (given: "
                        f"{args.audio_perturb})")
    if args.no_audio and args.audio_feature_cache:
        problems.append("--no_audio builds no audio branch, so --audio_feature_cache would not be read: drop one")
    if not args.do_train:
        for name in ("max_steps", "save_every_steps", "val_csv"):
            if changed(name):
                problems.append(f"--{name} applies to training: add --do_train or drop it")
    return problems


def check_output_dir(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse a --output_dir that holds an earlier run's results: its logs, metrics and model files
    would mix with this run's. Continuing the run in it (--resume_model of its training state) is
    allowed, and a folder left by a run that stopped before any result (only its start-up files,
    checkpoint_record.holds_no_results) is reused: run() replaces those files."""
    existing = checkpoint_record.existing_run_files(args.output_dir)
    if not existing or checkpoint_record.resumes_in_place(args.output_dir, args.resume_model) \
            or checkpoint_record.holds_no_results(args.output_dir):
        return
    shown = ", ".join(existing[:6]) + (", ..." if len(existing) > 6 else "")
    state = os.path.join(args.output_dir, checkpoint_record.TRAINING_STATE_NAME)
    resume = f", or continue its training with --resume_model {state}" if os.path.isfile(state) else ""
    parser.error(f"--output_dir {args.output_dir} already holds a run's results ({shown}); its files would mix "
                 f"with this run's. Pass a new --output_dir or delete the old run{resume}")


def clear_startup_files(output_dir: str) -> list[str]:
    """Delete the start-up files of an earlier run that stopped before any result (see
    check_output_dir); returns their names."""
    if not checkpoint_record.holds_no_results(output_dir):
        return []
    stale = checkpoint_record.existing_run_files(output_dir)
    for name in stale:
        os.remove(os.path.join(output_dir, name))
    return stale


@dataclasses.dataclass
class CheckpointContext:
    """What the command line says about the checkpoint a run reads.

    Args:
        checkpoint: --resume_model, else --init_model (None: neither).
        record: its record (checkpoint_record), None when it has none.
        explicit: the flags given on the command line (argparse destinations).
        from_record: flags that took the record's values, {flag: value}.
        warm_start: a text-guided model warm-started from a text-agnostic checkpoint.
    """

    checkpoint: Optional[str] = None
    record: Optional[dict] = None
    explicit: frozenset = frozenset()
    from_record: dict = dataclasses.field(default_factory=dict)
    warm_start: bool = False


def apply_checkpoint_record(parser: argparse.ArgumentParser, args: argparse.Namespace,
                            explicit: set[str]) -> CheckpointContext:
    """Read the record of the checkpoint this run reads (--resume_model, else --init_model) and
    take the architecture flags from it (checkpoint_record.resolve_flags): flags left out take its
    values, an explicit flag that disagrees is an error naming both."""
    checkpoint = args.resume_model or args.init_model
    context = CheckpointContext(checkpoint=checkpoint, explicit=frozenset(explicit))
    if not checkpoint:
        return context
    flag = "--resume_model" if args.resume_model else "--init_model"
    try:
        context.record = checkpoint_record.read_record(checkpoint, flag)
        if context.record is not None:
            resolved = checkpoint_record.resolve_flags(args, explicit, context.record, checkpoint)
            context.from_record, context.warm_start = resolved["from_record"], resolved["warm_start"]
    except (OSError, checkpoint_record.RecordError) as err:
        parser.error(str(err))
    if context.record is not None and context.record["flags"].get("train_ast") and args.audio_feature_cache:
        parser.error(f"{checkpoint} fine-tuned its AST trunk (--train_ast): --audio_feature_cache holds the "
                     f"original trunk's tokens, not this model's; pass --audio_path (the wavs) instead")
    return context


# Numeric flags and the values they accept: (flag, lowest, highest, lowest allowed itself).
# None = unbounded on that side. Checked at parse time, before any download or decoding
# (--n_display, --query_lr_scale, --rerank_topk, --dump_topk, --audio_noise_rms: in check_args).
VALUE_RANGES = (
    ("seed", 0, None, True), ("save_every_steps", 0, None, True),
    ("max_steps", 0, None, True), ("max_words", 3, None, True), ("max_frames", 1, None, True),
    ("feature_framerate", 0, None, False), ("num_thread_reader", 0, None, True),
    ("batch_size", 1, None, True), ("batch_size_val", 1, None, True),
    ("max_missing_audio", 0, 1, True), ("cross_num_hidden_layers", 1, None, True),
    ("audio_query_layers", 1, None, True), ("temperature", 0, None, False), ("fusion_residual", 0, 1, True),
    ("lr", 0, None, False), ("coef_lr", 0, None, True),
    ("epochs", 1, None, True), ("warmup_proportion", 0, 1, True), ("gradient_accumulation_steps", 1, None, True),
    ("freeze_layer_num", 0, None, True), ("beta", 0, None, True), ("margin_BD", 0, None, True),
    ("hardest_k", 1, None, True), ("train_pairs_per_chunk", 0, None, True),
)


def range_text(low, high, low_inclusive: bool) -> str:
    """'>= 1', '> 0', 'in [0, 1]'."""
    if high is None:
        return f"{'>=' if low_inclusive else '>'} {low}"
    return f"in {'[' if low_inclusive else '('}{low}, {high}]"


def check_value_ranges(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Every numeric flag inside its range (VALUE_RANGES), so that e.g. --max_frames 0 stops here
    instead of in a tensor shape after a download."""
    for name, low, high, low_inclusive in VALUE_RANGES:
        value = getattr(args, name)
        below = value < low if low_inclusive else value <= low
        if below or (high is not None and value > high):
            parser.error(f"--{name} must be {range_text(low, high, low_inclusive)}, got {value}")
    for value in args.eval_chunk or ():
        if value < 1:
            parser.error(f"--eval_chunk takes counts >= 1, got {value}")


def check_eval_precision(parser: argparse.ArgumentParser, args: argparse.Namespace, explicit: set[str]) -> None:
    """--precision sets the training autocast; an evaluation-only run given a lower one would
    silently evaluate in fp32 (--eval_precision), so it is an error saying which flag to use."""
    if args.do_train or args.precision == "fp32" or "precision" not in explicit or "eval_precision" in explicit:
        return
    parser.error(f"--precision {args.precision} sets the TRAINING autocast and --do_eval alone does not train: "
                 f"evaluation runs at --eval_precision (fp32 by default, which reproduces the published "
                 f"numbers). Pass --eval_precision {args.precision} to evaluate in {args.precision}, or drop "
                 f"--precision")


def parse_and_check(argv: Optional[list[str]]) -> tuple[argparse.Namespace, CheckpointContext]:
    """Parse the flags, take the architecture from the checkpoint's record and check the result.
    Needs no torch: run as a script, this answers --help and flag errors before the heavy imports."""
    parser = build_parser()
    args = parser.parse_args(argv)
    explicit = checkpoint_record.explicit_flags(parser, argv)
    context = apply_checkpoint_record(parser, args, explicit)
    check_value_ranges(parser, args)
    check_eval_precision(parser, args, explicit)
    check_args(parser, args, int(os.environ.get("WORLD_SIZE", "1")))
    return args, context


if __name__ == "__main__":
    parse_and_check(sys.argv[1:])  # fast answers; main() below parses again after the imports

# The torch-heavy imports (seconds on a loaded machine) come after the flags were checked.
import torch  # noqa: E402

import evaluation  # noqa: E402
import gate_log  # noqa: E402
import training  # noqa: E402
import util  # noqa: E402
from dataloaders import audio_cache  # noqa: E402
from dataloaders.audio_presence import MissingAudioError  # noqa: E402
from dataloaders.base import AnnotationError, VideoIssueCounter, collate_items, prepare_videos  # noqa: E402
from dataloaders.perturb import AudioPerturbation  # noqa: E402
from dataloaders.registry import (DataConfig, build_eval_datasets, build_eval_split, build_train_dataset,  # noqa: E402
                                  build_train_split, check_split_audio)
from dataloaders.video import FrameSamplingConfig, VideoReadError  # noqa: E402
from modules import released_checkpoint  # noqa: E402
from modules.ast import ASTConfig, checkpoint_to_trunk, config_from_weights, load_audioset_checkpoint  # noqa: E402
from modules.clip import CLIPConfig, config_from_state_dict, load_clip_state_dict  # noqa: E402
from modules.diagnostics import LEAK_LABEL  # noqa: E402
from modules.fusion import FusionConfig  # noqa: E402
from modules.loss import LossConfig  # noqa: E402
from modules.modeling import AVIGATE, AVIGATEConfig  # noqa: E402
from modules.objective import ContrastiveObjective, ObjectiveConfig  # noqa: E402
from modules.optimization import OptimConfig, build_optimizer, build_scheduler  # noqa: E402
from modules.resampler import ResamplerConfig  # noqa: E402
from modules.tokenization_clip import ClipTokenizer  # noqa: E402


def annotation_file(path: Optional[str]) -> Optional[str]:
    """A file given relative to the working directory (the released scripts' habit) becomes
    absolute; other names stay relative to --data_path."""
    return os.path.abspath(path) if path and os.path.exists(path) else path


def data_dir(args: argparse.Namespace) -> str:
    """--data_path as a folder (it may name MSRVTT_data.json itself)."""
    return os.path.dirname(args.data_path) if os.path.isfile(args.data_path) else args.data_path


def data_config(args: argparse.Namespace, image_size: int, eval_file: Optional[str] = None,
                test_split: bool = False) -> DataConfig:
    """Data settings; ``test_split``: the test evaluation, which alone gets --audio_perturb and
    --eval_order_seed (validation always sees the real audio)."""
    data_path = data_dir(args)
    use_cache = bool(args.audio_feature_cache) and not args.no_audio
    return DataConfig(
        datatype=args.datatype, data_path=data_path, features_path=args.features_path,
        audio_path=None if args.no_audio or use_cache else args.audio_path,
        audio_cache_dir=args.audio_feature_cache if use_cache else None,
        train_file=annotation_file(args.train_csv), eval_file=annotation_file(eval_file),
        max_words=args.max_words,
        frames=FrameSamplingConfig(max_frames=args.max_frames, framerate=args.feature_framerate,
                                   slice_framepos=args.slice_framepos, image_size=image_size,
                                   decoder=args.decoder),
        frame_cache_dir=args.frame_cache,
        on_bad_audio=args.on_bad_audio, max_missing_audio=args.max_missing_audio,
        skip_bad_videos=args.skip_bad_videos,
        expand_sentences=args.expand_msrvtt_sentences, seed=args.seed,
        audio_perturbation=audio_perturbation(args) if test_split else AudioPerturbation(),
        eval_order_seed=args.eval_order_seed if test_split else None)


def audio_perturbation(args: argparse.Namespace) -> AudioPerturbation:
    return AudioPerturbation(kind=args.audio_perturb, noise_rms=args.audio_noise_rms, seed=args.seed)


def model_trunk_file(model: AVIGATE, context: CheckpointContext) -> str:
    """The AST checkpoint file the model's trunk weights come from: the one recorded by the
    checkpoint it reads (its trunk weights override any --ast_checkpoint), else --ast_checkpoint's."""
    recorded = ((context.record or {}).get("weight_sources") or {}).get("ast")
    if recorded is None:
        return model.weight_sources["ast"]["path"]
    if os.path.isfile(recorded["path"]):
        return recorded["path"]
    given = model.weight_sources.get("ast")  # --ast_checkpoint given beside the record
    if given is not None and given.get("sha256") == recorded.get("sha256"):
        return given["path"]
    raise FileNotFoundError(f"{context.checkpoint}'s AST trunk came from {recorded['path']} (sha256 "
                            f"{recorded.get('sha256')}), which is not on this machine: pass --ast_checkpoint with "
                            f"a copy of it, so that --audio_feature_cache can be checked against it")


def check_cache_trunk(args: argparse.Namespace, model: AVIGATE, context: CheckpointContext) -> None:
    """--audio_feature_cache must hold the tokens of the trunk this model uses (also the trunk that
    computes the perturbed clips of --audio_perturb silence / noise)."""
    if args.audio_feature_cache and not args.no_audio:
        trunk = model_trunk_file(model, context)
        audio_cache.check_cache_trunk(args.audio_feature_cache, trunk)
        util.logger.info("AST feature cache %s: built with this model's trunk %s", args.audio_feature_cache, trunk)


def model_config(args: argparse.Namespace, clip_cfg: CLIPConfig, ast_cfg: ASTConfig) -> AVIGATEConfig:
    """The architecture: what the weights of a checkpoint mean. CLIP and AST sizes come from
    their weights or from a checkpoint's record, the joint width from CLIP, every other field
    from its architecture flag (modules/architecture.py) or its config default."""
    width = clip_cfg.embed_dim
    base = AVIGATEConfig(clip=clip_cfg, ast=ast_cfg, resampler=ResamplerConfig(width=width),
                         fusion=FusionConfig(width=width))
    return architecture.apply_flags(base, vars(args))


def objective_config(args: argparse.Namespace) -> ObjectiveConfig:
    """The training objective: margins, pair selection, pair chunking."""
    return ObjectiveConfig(loss=LossConfig(beta=args.beta, margin_cap=args.margin_BD, fixed=args.margin_fixed),
                           training_pairs=args.training_pairs, hardest_k=args.hardest_k,
                           pairs_per_chunk=args.train_pairs_per_chunk)


def build_model(args: argparse.Namespace, device: torch.device,
                context: Optional[CheckpointContext] = None) -> AVIGATE:
    """The model, then --init_model's weights if given.

    Without a checkpoint record: CLIP + AST weights from their released files (docs/design.md §7 init);
    missing released files are fetched into --weights_cache (modules/weights.py). With the
    record of --init_model / --resume_model (``context.record``) every weight comes from that
    checkpoint, so the model is built from the record's configuration (``args`` already agree
    with it, see apply_checkpoint_record) and no released file is read, unless
    --pretrained_clip_name / --ast_checkpoint are given: then their sizes must match the
    record's. ``model.weight_sources`` keeps where the weights came from, with SHA-256, for the
    run's records.
    """
    context = context or CheckpointContext()
    record = context.record
    if not uses_released_weights(context):
        model, sources = model_from_record(args, context)
    else:
        model, sources = model_from_released_weights(args)
        if record is not None:
            check_sizes_against_record(args, model.cfg, context)
    model.set_grad_checkpointing(args.grad_checkpointing)
    if args.init_model:
        util.load_model_weights(model, args.init_model)
        sources["init_model"] = {"path": os.path.abspath(args.init_model),
                                 "sha256": weights.file_sha256(args.init_model)}
        if record is not None:
            sources["init_model"]["weight_sources"] = record.get("weight_sources")
    model.weight_sources = sources
    return model.to(device)


def resolve_released_weights(args: argparse.Namespace) -> dict[str, weights.ResolvedWeights]:
    """The CLIP (and AST) files of the flags, through the one resolver and its cache (modules/weights.py)."""
    cache, offline = args.weights_cache, args.offline or weights.offline_by_default()
    resolved = {"clip": weights.resolve_clip_checkpoint(args.pretrained_clip_name, cache, offline,
                                                        args.allow_unlisted_weights)}
    if not args.no_audio:
        resolved["ast"] = weights.resolve_ast_checkpoint(args.ast_checkpoint, cache, offline)
    return resolved


def uses_released_weights(context: CheckpointContext) -> bool:
    """Whether build_model reads the released CLIP/AST files (not only a checkpoint's record)."""
    return context.record is None or bool(context.explicit & {"pretrained_clip_name", "ast_checkpoint"})


def model_from_released_weights(args: argparse.Namespace) -> tuple[AVIGATE, dict]:
    """CLIP (and AST) from their released files, new modules at their docs/design.md §7 init."""
    resolved = resolve_released_weights(args)
    clip_state = load_clip_state_dict(resolved["clip"].path)
    ast_weights = checkpoint_to_trunk(load_audioset_checkpoint(resolved["ast"].path)) if "ast" in resolved else None
    ast_cfg = config_from_weights(ast_weights) if ast_weights is not None else ASTConfig()
    model = AVIGATE.from_pretrained(model_config(args, config_from_state_dict(clip_state), ast_cfg),
                                    clip_state, ast_weights)
    for name, source in resolved.items():
        util.logger.info("%s weights: %s (%s, sha256 %s)", name, source.path, source.source, source.sha256)
    return model, {name: source.record() for name, source in resolved.items()}


def model_from_record(args: argparse.Namespace, context: CheckpointContext) -> tuple[AVIGATE, dict]:
    """The model of a checkpoint's record, before its weights are loaded: the recorded
    configuration, with this run's text flags in the warm start of a text-guided model from an
    AVIGATE checkpoint (its text terms then start at their init, docs/design.md §4a)."""
    source = checkpoint_record.record_path(context.checkpoint)
    recorded = checkpoint_record.dataclass_from_dict(AVIGATEConfig, context.record["model_config"], source)
    cfg = model_config(args, recorded.clip, recorded.ast)
    expected = architecture.set_fields(recorded, {flag.field: architecture.get_field(cfg, flag.field)
                                                  for flag in architecture.TEXT_FLAGS})
    if cfg != expected:
        raise ValueError(f"{source}: the recorded model configuration disagrees with its own flags "
                         f"(recorded {dataclasses.asdict(expected)}, from the flags {dataclasses.asdict(cfg)}); "
                         f"was the record edited?")
    util.logger.info("model built from the checkpoint record %s (no released weight file read)", source)
    return AVIGATE(expected), dict(context.record.get("weight_sources") or {})


def check_sizes_against_record(args: argparse.Namespace, cfg: AVIGATEConfig, context: CheckpointContext) -> None:
    """--pretrained_clip_name / --ast_checkpoint given with a recorded checkpoint: the sizes of
    their weights must be the checkpoint's."""
    source = checkpoint_record.record_path(context.checkpoint)
    recorded = checkpoint_record.dataclass_from_dict(AVIGATEConfig, context.record["model_config"], source)
    for name, flag in (("clip", "pretrained_clip_name"), ("ast", "ast_checkpoint")):
        if name == "ast" and not cfg.fusion.use_audio:
            continue
        if getattr(cfg, name) != getattr(recorded, name):
            raise ValueError(f"--{flag} {getattr(args, flag)} has weights of another size ({getattr(cfg, name)}) "
                             f"than {context.checkpoint} was trained with ({getattr(recorded, name)}, its record "
                             f"{source}); drop --{flag} to build the model from the record")


def checkpoint_record_of(args: argparse.Namespace, model: AVIGATE, **extra) -> dict:
    """The record written beside every model file and training state of this run."""
    flags = {name: getattr(args, name) for name in architecture.FLAG_NAMES + checkpoint_record.WEIGHT_FLAGS}
    if args.eval_protocol == "paired_block":
        extra[util.LEAKING_KEY] = LEAK_LABEL
    return checkpoint_record.make_record(dataclasses.asdict(model.cfg), flags, model.weight_sources,
                                         util.git_revision(), **extra)


def optim_config(args: argparse.Namespace) -> OptimConfig:
    return OptimConfig(name=args.optimizer, lr=args.lr, coef_lr=args.coef_lr, query_lr_scale=args.query_lr_scale,
                       warmup_proportion=args.warmup_proportion, freeze_layer_num=args.freeze_layer_num,
                       freeze_agnostic=args.freeze_agnostic, freeze_clip=args.freeze_clip,
                       train_ast=args.train_ast, clip_scope=args.grad_clip_scope,
                       decay_rule=args.weight_decay_rule)


def eval_options(args: argparse.Namespace) -> evaluation.EvalOptions:
    chunk = None if args.eval_chunk is None else (args.eval_chunk[0], args.eval_chunk[-1])
    return evaluation.EvalOptions(batch_size=args.batch_size_val, workers=args.num_thread_reader,
                                  precision=args.eval_precision, protocol=args.eval_protocol,
                                  block_size=args.batch_size_val, chunk=chunk, dsl=args.dsl,
                                  rerank_topk=args.rerank_topk, dump_topk=args.dump_topk)


def build_trainer(args, info: util.DistInfo, model: AVIGATE, total_steps: int) -> training.Trainer:
    """Freeze, group and optimize the parameters (docs/design.md §7); wrap the objective in DDP when
    distributed."""
    optimizer = build_optimizer(model, optim_config(args))
    scheduler = build_scheduler(optimizer, total_steps, args.warmup_proportion)
    objective = ContrastiveObjective(model, objective_config(args))
    if info.distributed:
        # Every trainable parameter gets a gradient in every configuration (the model builds
        # no module it does not use), so DDP needs no unused-parameter search.
        objective = torch.nn.parallel.DistributedDataParallel(
            objective, device_ids=[info.device.index] if info.device.type == "cuda" else None)
    scaler = torch.amp.GradScaler(info.device.type, enabled=args.precision == "fp16")
    return training.Trainer(objective, optimizer, scheduler, scaler, info, args.precision,
                            args.gradient_accumulation_steps)


def train(args, info: util.DistInfo, model: AVIGATE, recorder: util.RunRecorder, tokenizer,
          image_size: int, resume_state: Optional[dict] = None) -> Optional[int]:
    """Train for --epochs (continuing ``resume_state``, the --resume_model training state, if
    given); returns the 0-based epoch whose weights to test (None if --max_steps stopped it)."""
    train_set = build_train_dataset(data_config(args, image_size), tokenizer)
    val_data = (build_eval_datasets(data_config(args, image_size, args.val_csv), tokenizer)
                if args.val_csv else None)
    sampler = util.ShardedBatchSampler(len(train_set), args.batch_size, args.gradient_accumulation_steps,
                                       info.rank, info.world_size, args.seed)
    steps_per_epoch = sampler.micro_batches_per_epoch // args.gradient_accumulation_steps
    trainer = build_trainer(args, info, model, steps_per_epoch * args.epochs)
    progress = training.Progress()
    if resume_state is not None:
        progress = training.restore_training_state(trainer, resume_state)
        util.logger.info("resumed %s at epoch %d, step %d", args.resume_model, progress.epoch + 1,
                         progress.step)
    state_path = os.path.join(args.output_dir, util.TRAINING_STATE_FILE)

    def save_state():
        state = training.training_state(trainer, progress, vars(args))
        state["record"] = checkpoint_record_of(args, model, epoch=progress.epoch, step=progress.step)
        if info.is_main:
            util.save_training_state(state_path, state)
        util.barrier(info)

    if args.training_pairs == "own_caption":
        util.logger.warning("--training_pairs own_caption is a LEAKING diagnostic: each video is fused only "
                            "with its own caption in training (the public implementation's pairing)")
    util.logger.info("training: %d samples, %d steps per epoch, %d epochs, global batch %d on %d rank(s)",
                     len(train_set), steps_per_epoch, args.epochs, args.batch_size, info.world_size)
    with training.PreemptionGuard(info) as guard:
        hooks = training.EpochHooks(recorder, save_state, args.n_display, args.save_every_steps, args.max_steps,
                                    guard)
        gates = build_gate_log(args, model, tokenizer, image_size, val_data, recorder)
        if gates is not None:
            if resume_state is not None:
                gates.resume(os.path.dirname(os.path.abspath(args.resume_model)), progress.epoch)
            if progress.step == 0:
                record_gates(gates, model, 0, progress.step, info, recorder)
        return train_epochs(args, info, model, trainer, train_set, sampler, val_data, progress, hooks, recorder,
                            gates)


def train_epochs(args, info: util.DistInfo, model: AVIGATE, trainer: training.Trainer, train_set, sampler,
                 val_data, progress: training.Progress, hooks: training.EpochHooks,
                 recorder: util.RunRecorder, gates: Optional[gate_log.GateLog]) -> Optional[int]:
    """The epoch loop of ``train`` (from ``progress``); returns what ``train`` returns."""
    steps_per_epoch = sampler.micro_batches_per_epoch // args.gradient_accumulation_steps
    state_path = os.path.join(args.output_dir, util.TRAINING_STATE_FILE)
    for epoch in range(progress.epoch, args.epochs):
        progress.epoch = epoch
        sampler.set_epoch(epoch, progress.epoch_step * args.gradient_accumulation_steps)
        train_set.set_epoch(epoch)
        if not training.train_epoch(trainer, train_loader(args, train_set, sampler, info, epoch),
                                    progress, steps_per_epoch, hooks):
            path = util.step_model_file(args.output_dir, progress.step)
            if info.is_main:
                util.save_model_file(model, path, checkpoint_record_of(args, model, epoch=epoch, step=progress.step))
            util.logger.info("stopped after --max_steps %d: model file %s (evaluate it with --do_eval "
                             "--init_model %s), training state %s", args.max_steps, path, path, state_path)
            return None
        if info.is_main:
            util.save_model_file(model, util.model_file(args.output_dir, epoch),
                                 checkpoint_record_of(args, model, epoch=epoch, step=progress.step))
        if val_data is not None:
            select_on_validation(args, info, model, val_data, progress, recorder)
        if gates is not None:
            record_gates(gates, model, epoch + 1, progress.step, info, recorder)
        progress.epoch, progress.epoch_step = epoch + 1, 0
        hooks.save_state()
        hooks.stop_if_preempted(progress, saved=True)
    util.report_data_issues("training data", train_set.counter, train_set.media.audio.counter, info, recorder)
    return progress.best_epoch if progress.best_epoch is not None else args.epochs - 1


def build_gate_log(args, model: AVIGATE, tokenizer, image_size: int, val_data,
                   recorder: util.RunRecorder) -> Optional[gate_log.GateLog]:
    """The per-epoch gate log of --gate_log_split (gate_log.py); None without the flag or when
    the model has no gates (said in the log and train_metrics.jsonl)."""
    if args.gate_log_split == "none":
        return None
    if not model.gate_names():
        why = "--no_audio builds no fusion" if args.no_audio else "--gate none fixes every gate at 1"
        util.logger.warning("--gate_log_split %s: no gates to log (%s); %s is not written", args.gate_log_split, why,
                            gate_log.GATE_LOG_FILE)
        recorder.log({"event": "gate_log", "written": False, "reason": why})
        return None
    data = val_data if args.gate_log_split == "val" else build_eval_datasets(
        data_config(args, image_size, args.test_csv), tokenizer)
    labels = args.gate_labels or os.path.join(data_dir(args), "metadata.json")
    informative = gate_log.read_informative_labels(labels, data.split.video_ids)
    view = "agnostic view (text := 0)" if model.text_guided else "text-agnostic model"
    header = {"split": args.gate_log_split, "annotation": data.split.name, "labels": os.path.abspath(labels),
              "view": view, "num_videos": int(len(informative)),
              "counts": {gate_log.INFORMATIVE: int(informative.sum()), gate_log.NOISE: int((~informative).sum())}}
    return gate_log.GateLog(data.videos, informative, args.output_dir, header, args.batch_size_val,
                            args.num_thread_reader, args.precision)


def record_gates(gates: gate_log.GateLog, model: AVIGATE, epoch: int, step: int, info: util.DistInfo,
                 recorder: util.RunRecorder) -> None:
    """One gate-log entry (all ranks encode), with its last-layer AUCs in train_metrics.jsonl."""
    entry = gates.record(model, epoch, step, info)
    if entry is not None:
        recorder.log({"event": "gate_log", "epoch": epoch, "step": step,
                      "last_layer_auc": {k: v["last_layer_auc"] for k, v in entry["gates"].items()}}, step=step)


def train_loader(args, train_set, sampler, info: util.DistInfo, epoch: int) -> torch.utils.data.DataLoader:
    """Loader of one epoch; its own generator and seeded workers leave the global RNG untouched.

    Batches are pinned on CUDA (``dataloaders.base.video_inputs`` copies them ``non_blocking``).
    Workers are deliberately not persistent: a worker holds the copy of ``train_set`` made
    when it started, so ``train_set.set_epoch`` (the per-epoch caption draw without
    --expand_msrvtt_sentences) and the per-epoch worker seeds would not reach a worker kept
    from an earlier epoch. A fresh loader per epoch keeps every item and worker RNG a
    function of (seed, epoch, rank, index), also after a resume; it costs one worker
    start per epoch (bench/decode_bench.py measures it).
    """
    generator = torch.Generator().manual_seed(util.worker_seed(args.seed, epoch, info.rank, -1))
    return torch.utils.data.DataLoader(train_set, batch_sampler=sampler, num_workers=args.num_thread_reader,
                                       collate_fn=collate_items, generator=generator,
                                       pin_memory=info.device.type == "cuda",
                                       worker_init_fn=util.WorkerSeeder(args.seed, epoch, info.rank))


def select_on_validation(args, info, model, val_data, progress: training.Progress, recorder) -> None:
    """Evaluate on the validation split and remember the best epoch (by plain t2v R@1)."""
    metrics, _ = evaluation.evaluate(model, val_data, eval_options(args), info, desc="validation")
    if info.is_main:
        value = metrics["plain"][evaluation.SELECTION_METRIC]
        if progress.best_metric is None or value > progress.best_metric:
            progress.best_metric, progress.best_epoch = value, progress.epoch
        recorder.log({"event": "validation", "epoch": progress.epoch + 1, "step": progress.step,
                      "metrics": metrics, "best_epoch": progress.best_epoch + 1}, step=progress.step)
        util.logger.info("validation epoch %d: %s = %.2f (best: epoch %d)", progress.epoch + 1,
                         evaluation.SELECTION_METRIC, value, progress.best_epoch + 1)
    progress.best_metric, progress.best_epoch = util.broadcast_object(
        (progress.best_metric, progress.best_epoch), info)


def test(args, info, model: AVIGATE, recorder, tokenizer, image_size: int, checkpoint: Optional[str]) -> None:
    """Evaluate the test split and write metrics.json, the score matrix and gates to --output_dir."""
    if checkpoint is not None:
        util.load_model_weights(model, checkpoint)
    test_data = build_eval_datasets(data_config(args, image_size, args.test_csv, test_split=True), tokenizer)
    options = eval_options(args)
    perturbation = test_data.audio_perturbation()
    if perturbation["kind"] != "none":
        util.logger.info("test audio perturbed: %s", {k: v for k, v in perturbation.items() if k != "swap_sources"})
    metrics, scored = evaluation.evaluate(model, test_data, options, info, desc="test")
    util.report_data_issues("test data", test_data.counter, test_data.videos.media.audio.counter, info,
                            recorder)
    if not info.is_main:
        return
    metrics.update({"split": test_data.split.name, "checkpoint": checkpoint or args.init_model,
                    "num_texts": test_data.split.num_texts, "num_videos": test_data.split.num_videos,
                    "eval_order_seed": args.eval_order_seed,
                    "audio_perturbation": {k: v for k, v in perturbation.items() if k != "swap_sources"}})
    evaluation.write_eval_outputs(args.output_dir, test_data.split, scored, metrics, perturbation,
                                  leaking=recorder.leaking)
    recorder.log({"event": "test", "metrics": metrics})
    plain = metrics["plain"]
    util.logger.info("test %s: t2v R@1 %.2f R@5 %.2f R@10 %.2f MdR %.1f | v2t R@1 %.2f R@5 %.2f R@10 %.2f",
                     test_data.split.name, plain["t2v_R@1"], plain["t2v_R@5"], plain["t2v_R@10"],
                     plain["t2v_MdR"], plain["v2t_R@1"], plain["v2t_R@5"], plain["v2t_R@10"])
    if options.protocol == "paired_block":
        util.logger.warning(LEAK_LABEL)


# Errors of the data and weight checks: each message names the file or flag at fault.
PREFLIGHT_ERRORS = (AnnotationError, VideoReadError, MissingAudioError, weights.WeightsError, FileNotFoundError)
PREFLIGHT_IMAGE_SIZE = 224  # frame size of the data checks' configs (no frame is decoded)


def splits_read(args: argparse.Namespace) -> list[tuple[str, Optional[str], bool]]:
    """(what, annotation file flag value, evaluation split?) of every split this run reads."""
    splits = [("training split (--train_csv)", args.train_csv, False)] if args.do_train else []
    if args.do_train and args.val_csv:
        splits.append(("validation split (--val_csv)", args.val_csv, True))
    if args.do_eval or (args.do_train and not args.skip_test):
        splits.append(("test split (--test_csv)", args.test_csv, True))
    return splits


def check_data(args: argparse.Namespace) -> list[str]:
    """Parse every split's annotations and find its video files and wavs (no decoding) before any
    weight is read; returns one summary line per split. Raises one of PREFLIGHT_ERRORS."""
    lines = []
    for what, file, is_eval in splits_read(args):
        cfg = data_config(args, PREFLIGHT_IMAGE_SIZE, file if is_eval else None)
        split = build_eval_split(cfg) if is_eval else build_train_split(cfg)
        split, _ = prepare_videos(split, cfg.features_path, cfg.skip_bad_videos, VideoIssueCounter())
        presence = check_split_audio(cfg, split)
        lines.append(f"{what}: {split.name}, {split.num_texts} captions, {split.num_videos} videos"
                     + (f"; {presence.summary()}" if presence else ""))
    return lines


def preflight(args: argparse.Namespace, context: CheckpointContext) -> None:
    """--check_only: the data, then the weights (fetched into the cache once, before any rank
    starts); one error message, exit status 2."""
    try:
        lines = check_data(args)
        if uses_released_weights(context):
            lines += [f"{name} weights: {found.path} ({found.source})"
                      for name, found in resolve_released_weights(args).items()]
        else:
            lines.append(f"weights: from {context.checkpoint} (its record)")
    except PREFLIGHT_ERRORS as err:
        print(f"main_task_retrieval.py: error: {err}", file=sys.stderr)
        sys.exit(2)
    print("preflight passed:\n  " + "\n  ".join(lines))


def main(argv: Optional[list[str]] = None) -> None:
    args, context = parse_and_check(argv)
    if args.check_only:
        preflight(args, context)
        return
    info = util.setup_distributed(args.device)
    try:
        util.setup_precision(info.device, args.precision, args.tf32)
        if args.eval_precision != args.precision:  # the device must run both (bf16/fp16 support)
            util.setup_precision(info.device, args.eval_precision, args.tf32)
        run(args, info, context)
    except training.Preempted as stop:
        util.logger.warning("%s; exit status %d", stop, training.PREEMPTED_EXIT)
        raise SystemExit(training.PREEMPTED_EXIT) from stop
    finally:
        util.cleanup_distributed()


def run(args: argparse.Namespace, info: util.DistInfo, context: Optional[CheckpointContext] = None) -> None:
    context = context or CheckpointContext()
    # Checks that read the checkpoints come before anything is written to --output_dir.
    implied_padding = apply_released_padding_rule(args, context)
    resume_state, resume_entry = load_resume_state(args)
    os.makedirs(args.output_dir, exist_ok=True)
    stale = clear_startup_files(args.output_dir) if info.is_main and not args.resume_model else []
    util.setup_logging(args.output_dir, info)
    if stale:
        util.logger.info("--output_dir %s held only the start-up files of a run that stopped before any result "
                         "(%s): replaced", args.output_dir, ", ".join(stale))
    if args.do_train:
        util.check_shared_output_dir(args.output_dir, info)
    leaking = LEAK_LABEL if args.eval_protocol == "paired_block" else None
    recorder = util.RunRecorder(args.output_dir, info, args.tensorboard, leaking=leaking)
    if resume_entry is not None:
        log_resume(args, info, resume_entry)
    recorder.write_run_files(vars(args), info, resume_entry)
    util.logger.info("command: %s", " ".join(sys.argv))
    if implied_padding:
        util.logger.info("--padding_rule %s: implied by the released AVIGATE layout of %s", args.padding_rule,
                         args.init_model)
    if leaking:
        util.logger.warning("%s (every output of this run is labelled; see the LEAKING file)", leaking)
    log_record_use(context)
    for line in check_data(args):  # annotations, videos and wavs are found before any weight is read
        util.logger.info("data: %s", line)
    util.seed_everything(args.seed)  # same on every rank: identical model initialization
    model = build_model(args, info.device, context)
    check_cache_trunk(args, model, context)
    util.seed_everything(args.seed, info.rank)
    tokenizer = ClipTokenizer()
    image_size = model.cfg.clip.image_resolution
    checkpoint = None
    if not args.do_train and not args.init_model:
        util.logger.warning("--do_eval without --init_model evaluates the untrained model (CLIP + new "
                            "modules at their initialization)")
    if args.do_train:
        epoch = train(args, info, model, recorder, tokenizer, image_size, resume_state)
        if epoch is None:
            recorder.close()
            return
        checkpoint = util.model_file(args.output_dir, epoch)
        selected = "best validation epoch" if args.val_csv else "last epoch: no --val_csv"
        if args.skip_test:
            util.logger.info("--skip_test: selected %s (%s); not testing it", checkpoint, selected)
            recorder.write_json("selected_checkpoint.json", {"checkpoint": checkpoint, "selection": selected})
            recorder.close()
            return
        util.logger.info("testing %s (%s)", checkpoint, selected)
    test(args, info, model, recorder, tokenizer, image_size, checkpoint)
    recorder.close()


def apply_released_padding_rule(args: argparse.Namespace, context: CheckpointContext) -> bool:
    """An --init_model in the released AVIGATE layout implies --padding_rule released: taken when the
    flag is left out (returns True), an error when it is given otherwise (a checkpoint with a
    record is native)."""
    if not args.init_model or context.record is not None:
        return False
    if not released_checkpoint.file_is_released_layout(args.init_model):
        return False
    if "padding_rule" in context.explicit:
        released_checkpoint.check_padding_rule(args.padding_rule, args.init_model)
        return False
    implied = args.padding_rule != released_checkpoint.PADDING_RULE
    args.padding_rule = released_checkpoint.PADDING_RULE
    return implied


def load_resume_state(args: argparse.Namespace) -> tuple[Optional[dict], Optional[dict]]:
    """The --resume_model training state, after checking the resume contract (resume_contract.py),
    and the entry that run_info.json's "resumes" list gets; (None, None) for a fresh run."""
    if not args.resume_model:
        return None, None
    state = util.load_training_state(args.resume_model)
    defaults = {a.dest: a.default for a in build_parser()._actions}
    overridden = resume_contract.check_resume(state["args"], args, defaults, args.resume_model)
    progress = state["progress"]
    return state, {"resume_model": os.path.abspath(args.resume_model), "epoch": progress["epoch"],
                   "step": progress["step"], "overrides": {k: list(v) for k, v in overridden.items()}}


def log_resume(args: argparse.Namespace, info: util.DistInfo, entry: dict) -> None:
    """Say what a resume overrides; in the run's own folder, remove the temporaries of killed writes."""
    for name, (saved, given) in entry["overrides"].items():
        util.logger.warning("--resume_override %s: saved %r, this run %r", name, saved, given)
    if info.is_main and checkpoint_record.resumes_in_place(args.output_dir, args.resume_model):
        util.remove_stale_temporaries(args.output_dir)


def log_record_use(context: CheckpointContext) -> None:
    """Say where the architecture came from (the checkpoint's record or the flags)."""
    checkpoint = context.checkpoint
    if checkpoint is None:
        return
    if context.record is None:
        util.logger.info("%s has no record (%s): its architecture is taken from the flags as given",
                         checkpoint, checkpoint_record.record_path(checkpoint))
        return
    taken = ", ".join(checkpoint_record.flag_text(k, v) for k, v in context.from_record.items())
    util.logger.info("architecture from the record of %s%s", checkpoint,
                     f": {taken}" if taken else " (the flags given agree with it)")
    if context.warm_start:
        util.logger.info("warm start of a text-guided model from the text-agnostic checkpoint %s (docs/design.md §4a): "
                         "its text terms are created at their init", checkpoint)


if __name__ == "__main__":
    main()
