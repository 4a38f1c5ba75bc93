"""Run machinery shared by training and evaluation (``training.py``, ``evaluation.py``).

Nothing here parses flags: the entry point turns flags into configs and calls these small
functions. Everything works as one process without a process group; under ``torchrun`` the
process group is started by ``setup_distributed`` (called from ``main``).

Sections: distributed setup; determinism (seeds, RNG states, the resumable sampler); run
records (args, git revision, JSON-lines metrics, log file, TensorBoard); precision;
checkpoints; data-issue reports.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import pickle
import random
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Sampler

import checkpoint_record
from atomic_io import save_torch, stale_temporaries, write_json
from modules import released_checkpoint


LOGGER_NAME = "avigate"
logger = logging.getLogger(LOGGER_NAME)

MODEL_FILE_PREFIX = checkpoint_record.MODEL_FILE_PREFIX
TRAINING_STATE_FILE = "training_state.pt"
ARGS_FILE = "args.json"
RUN_INFO_FILE = "run_info.json"
TRAIN_METRICS_FILE = "train_metrics.jsonl"
LOG_FILE = "log.txt"
LEAKING_FILE = "LEAKING"
LEAKING_KEY = "LEAKING"
TENSORBOARD_DIR = "tensorboard"
# Seeds of different streams (ranks, epochs, workers) are spread by these strides so they
# never coincide for realistic run sizes.
EPOCH_SEED_STRIDE = 1_000_003
RANK_SEED_STRIDE = 10_007
WORKER_SEED_STRIDE = 101
SEED_MODULUS = 2 ** 32


# --------------------------------------------------------------------------- distributed
@dataclass
class DistInfo:
    """Where this process sits in the job.

    Args:
        rank: global rank (0 when not distributed).
        world_size: number of processes.
        local_rank: rank on this node (picks the CUDA device).
        device: torch device of this process.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str, local_rank: int) -> torch.device:
    """``--device`` ("auto", "cpu", "cuda") -> this process's device."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda was requested but CUDA is not available; "
                               "use --device cpu")
        return torch.device("cuda", local_rank)
    if name != "cpu":
        raise ValueError(f"--device {name!r} is unknown; use auto, cpu or cuda")
    return torch.device("cpu")


def setup_distributed(device_name: str) -> DistInfo:
    """Read torchrun's RANK/WORLD_SIZE/LOCAL_RANK and start the process group when > 1 process.

    gloo on CPU, nccl on CUDA. On CPU under torchrun each rank runs one thread unless
    OMP_NUM_THREADS says otherwise (ranks would otherwise oversubscribe the cores).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    if device.type == "cpu" and world_size > 1:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        # device_id binds NCCL's communicator to this rank's GPU at start-up (no guessing and no
        # lazy per-collective initialization).
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                rank=rank, world_size=world_size,
                                device_id=device if device.type == "cuda" else None)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def cleanup_distributed() -> None:
    """Destroy the process group if this process started one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """Every rank's ``obj`` in rank order (``[obj]`` as one process)."""
    if not info.distributed:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, info: DistInfo) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not info.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


SHARED_DIR_MARKER = ".avigate_shared_dir_check"


def check_shared_output_dir(output_dir: str, info: DistInfo) -> None:
    """Multi-node runs need ``output_dir`` on a filesystem every rank sees: rank 0 alone writes
    the model files and every rank reads the selected one back for the test. Rank 0 writes a
    marker with a fresh token, every rank looks for it; a rank that does not see it stops the
    run on every rank, before training, with a RuntimeError naming the ranks and hosts."""
    if not info.distributed:
        return
    marker = os.path.join(output_dir, SHARED_DIR_MARKER)
    token = None
    if info.is_main:
        token = f"{socket.gethostname()}:{os.getpid()}:{time.time_ns()}"
        with open(marker, "w") as f:
            f.write(token)
    token = broadcast_object(token, info)
    try:
        with open(marker) as f:
            seen = f.read() == token
    except OSError:
        seen = False
    views = gather_objects((seen, socket.gethostname()), info)
    barrier(info)
    if info.is_main:
        os.remove(marker)
    blind = [f"rank {rank} on {host}" for rank, (ok, host) in enumerate(views) if not ok]
    if blind:
        raise RuntimeError(f"--output_dir {output_dir} is not shared by every rank: {', '.join(blind)} do not see "
                           f"the marker rank 0 ({views[0][1]}) wrote there. Rank 0 alone writes the model files and "
                           f"every rank reads them back, so multi-node training needs --output_dir on a filesystem "
                           f"all nodes mount (docs/training.md, 'Multi-node')")


def shard_range(n: int, info: DistInfo) -> range:
    """Contiguous slice of ``range(n)`` owned by this rank; rank order concatenates to range(n)."""
    bounds = np.linspace(0, n, info.world_size + 1).round().astype(int)
    return range(int(bounds[info.rank]), int(bounds[info.rank + 1]))


# --------------------------------------------------------------------------- determinism
def seed_everything(seed: int, rank: int = 0) -> None:
    """Seed python, numpy and torch (all devices) for this rank."""
    s = (seed + RANK_SEED_STRIDE * rank) % SEED_MODULUS
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)


def rng_state() -> dict:
    """This process's RNG states (python, numpy, torch CPU and every CUDA device)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what ``rng_state`` returned."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def worker_seed(seed: int, epoch: int, rank: int, worker_id: int) -> int:
    """Seed of one DataLoader worker, a pure function of its place in the run."""
    return (seed + EPOCH_SEED_STRIDE * epoch + RANK_SEED_STRIDE * rank
            + WORKER_SEED_STRIDE * (worker_id + 1)) % SEED_MODULUS


def ignore_preemption_signals(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: a scheduler's SIGTERM / SIGUSR1 reaches the whole process
    group; the main process finishes its step and stops the workers itself
    (training.PreemptionGuard), so a worker must not die of it first."""
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


class WorkerSeeder:
    """DataLoader ``worker_init_fn`` seeding python/numpy/torch from (seed, epoch, rank, worker).

    A plain object so it pickles into spawned workers.
    """

    def __init__(self, seed: int, epoch: int, rank: int):
        self.seed, self.epoch, self.rank = seed, epoch, rank

    def __call__(self, worker_id: int) -> None:
        ignore_preemption_signals(worker_id)
        s = worker_seed(self.seed, self.epoch, self.rank, worker_id)
        random.seed(s)
        np.random.seed(s)
        torch.manual_seed(s)


class ShardedBatchSampler(Sampler[list[int]]):
    """Deterministic, resumable training order sharded over ranks.

    Each epoch draws one permutation of the dataset from (seed, epoch) and cuts it into
    global batches of ``global_batch`` samples (the incomplete tail is dropped); each
    global batch is split into ``accumulation`` micro-batches, and each micro-batch into
    one contiguous share per rank. This rank's shares are yielded in order. Concatenating
    the shares in rank order gives exactly the micro-batch one process would see, so a run
    is the same on any number of ranks. ``set_epoch(epoch, start_batch)`` skips the
    micro-batches a resumed run already consumed.

    Args:
        num_samples: dataset length.
        global_batch: samples per optimizer step over all ranks (``--batch_size``).
        accumulation: micro-batches per optimizer step (``--gradient_accumulation_steps``).
        rank: this rank.
        world_size: number of ranks.
        seed: run seed.
    """

    def __init__(self, num_samples: int, global_batch: int, accumulation: int, rank: int,
                 world_size: int, seed: int):
        if global_batch % (accumulation * world_size):
            raise ValueError(f"--batch_size {global_batch} is the global batch and must be divisible by "
                             f"--gradient_accumulation_steps ({accumulation}) x world size ({world_size})")
        if num_samples < global_batch:
            raise ValueError(f"the training set has {num_samples} samples, fewer than one batch of "
                             f"{global_batch}; lower --batch_size")
        self.num_samples = num_samples
        self.micro_batch = global_batch // accumulation
        self.local_batch = self.micro_batch // world_size
        self.micro_batches_per_epoch = (num_samples // global_batch) * accumulation
        self.rank = rank
        self.seed = seed
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self) -> int:
        return self.micro_batches_per_epoch - self.start_batch

    def __iter__(self) -> Iterator[list[int]]:
        g = torch.Generator().manual_seed((self.seed + EPOCH_SEED_STRIDE * self.epoch) % SEED_MODULUS)
        order = torch.randperm(self.num_samples, generator=g).tolist()
        for b in range(self.start_batch, self.micro_batches_per_epoch):
            start = b * self.micro_batch + self.rank * self.local_batch
            yield order[start:start + self.local_batch]


# --------------------------------------------------------------------------- run records
@functools.lru_cache(maxsize=None)
def git_revision() -> dict:
    """Commit hash of the code and whether the tree had local changes (None outside git), as
    first seen by this process (every record of a run names the same revision)."""
    root = os.path.dirname(os.path.abspath(__file__))

    def run(*cmd):
        try:
            return subprocess.run(["git", *cmd], cwd=root, capture_output=True, text=True,
                                  check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None

    commit = run("rev-parse", "HEAD")
    status = run("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def setup_logging(output_dir: Optional[str], info: DistInfo) -> None:
    """Rank 0 logs INFO to stderr and ``output_dir/log.txt``; other ranks log warnings only."""
    logger.setLevel(logging.INFO if info.is_main else logging.WARNING)
    logger.propagate = False
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    fmt = logging.Formatter(f"%(asctime)s [rank {info.rank}] %(levelname)s %(message)s",
                            datefmt="%Y-%m-%d %H:%M:%S")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if output_dir and info.is_main:
        handlers.append(logging.FileHandler(os.path.join(output_dir, LOG_FILE)))
    for handler in handlers:
        handler.setFormatter(fmt)
        logger.addHandler(handler)


class RunRecorder:
    """Writes what a run needs to be understood later; a no-op on ranks other than 0.

    ``output_dir`` gets ``args.json`` (resolved flags), ``run_info.json`` (git revision,
    command line, world size, versions), ``train_metrics.jsonl`` (one JSON object per
    record) and, with ``tensorboard``, TensorBoard scalars. A run under a leaking protocol
    (``leaking``: its label) also gets a ``LEAKING`` file holding the label, and every JSON
    object it writes through the recorder carries ``"LEAKING": label``.

    Args:
        output_dir: run directory (created).
        info: this process's place in the job.
        tensorboard: also write TensorBoard event files.
        leaking: the LEAKING label of the run's protocol, or None.
    """

    def __init__(self, output_dir: str, info: DistInfo, tensorboard: bool = False,
                 leaking: Optional[str] = None):
        self.output_dir = output_dir
        self.active = info.is_main
        self.leaking = leaking
        self.writer = None
        if self.active and tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # optional dependency, loaded on demand
            self.writer = SummaryWriter(os.path.join(output_dir, TENSORBOARD_DIR))

    def labelled(self, obj: dict) -> dict:
        """``obj`` with the run's LEAKING label first (unchanged for an honest run)."""
        return {LEAKING_KEY: self.leaking, **obj} if self.leaking else obj

    def write_json(self, name: str, obj: dict) -> None:
        """Atomic write of ``output_dir/name`` (labelled)."""
        if self.active:
            write_json(os.path.join(self.output_dir, name), self.labelled(obj))

    def write_run_files(self, args: dict, info: DistInfo, resume: Optional[dict] = None) -> None:
        """args.json and run_info.json. A resumed run (``resume``: what it continues) keeps the
        files of the run it continues and appends its own invocation to run_info.json's
        ``"resumes"`` list (its flags equal the saved ones but for the overrides it lists)."""
        if not self.active:
            return
        if self.leaking:
            with open(os.path.join(self.output_dir, LEAKING_FILE), "w") as f:
                f.write(self.leaking + "\n")
        invocation = {"git": git_revision(), "argv": sys.argv, "world_size": info.world_size,
                      "device": str(info.device), "torch": torch.__version__,
                      "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        info_path = os.path.join(self.output_dir, RUN_INFO_FILE)
        if resume is not None and os.path.isfile(info_path):  # continuing the run of this folder
            with open(info_path) as f:
                run_info = json.load(f)
            run_info.setdefault("resumes", []).append({**invocation, **resume})
            self.write_json(RUN_INFO_FILE, run_info)
            return
        self.write_json(ARGS_FILE, args)
        self.write_json(RUN_INFO_FILE, invocation if resume is None else {**invocation, "resumes": [resume]})

    def log(self, record: dict, step: Optional[int] = None) -> None:
        """Append ``record`` (labelled) to the JSON-lines file; numeric leaves also go to TensorBoard."""
        if not self.active:
            return
        with open(os.path.join(self.output_dir, TRAIN_METRICS_FILE), "a") as f:
            f.write(json.dumps(self.labelled(record), default=float) + "\n")
        if self.writer is not None and step is not None:
            for key, value in _flatten(record).items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _flatten(record: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1, "c": [2, 3]}} -> {"a/b": 1, "a/c/0": 2, "a/c/1": 3}"""
    out = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, list):
            value = {str(k): v for k, v in enumerate(value)}
        if isinstance(value, dict):
            out.update(_flatten(value, f"{name}/"))
        else:
            out[name] = value
    return out


# --------------------------------------------------------------------------- precision
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def setup_precision(device: torch.device, precision: str, tf32: bool) -> None:
    """Check that ``device`` can run ``--precision`` (before any work) and set TF32 for fp32
    CUDA matmuls and convolutions (``--tf32``; scores opt out, modules.similarity.exact_fp32).

    Raises ValueError for fp16 on the CPU (no GradScaler-backed fp16 training there) and for
    bf16 on a GPU without bf16 support (pre-Ampere).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"--precision {precision!r} is unknown; use one of {list(PRECISIONS)}")
    if precision == "fp16" and device.type == "cpu":
        raise ValueError("--precision fp16 needs a CUDA device; on the CPU use --precision bf16 or fp32")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"--precision bf16: {torch.cuda.get_device_name(device)} has no bf16 support; "
                         f"use --precision fp16 or fp32")
    if device.type == "cuda":
        matmul = torch.backends.cuda.matmul
        if hasattr(matmul, "fp32_precision"):  # torch >= 2.9
            matmul.fp32_precision = "tf32" if tf32 else "ieee"
            torch.backends.cudnn.conv.fp32_precision = "tf32" if tf32 else "ieee"
        else:
            matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32


def autocast(device: torch.device, precision: str):
    """Autocast context for ``--precision`` (a no-op for fp32)."""
    if precision not in PRECISIONS:
        raise ValueError(f"--precision {precision!r} is unknown; use one of {list(PRECISIONS)}")
    dtype = PRECISIONS[precision]
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype is not None)


# --------------------------------------------------------------------------- checkpoints
def remove_stale_temporaries(output_dir: str) -> None:
    """Delete the temporary files of atomic writes a killed run left in ``output_dir`` (the
    files they were to replace are intact)."""
    for name in stale_temporaries(output_dir):
        os.remove(os.path.join(output_dir, name))
        logger.info("removed %s, left by an interrupted write", name)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DistributedDataParallel wrapper (or the model itself)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def model_file(output_dir: str, epoch: int) -> str:
    """Path of the model-only file of ``epoch`` (1-based, as the released code names them)."""
    return os.path.join(output_dir, f"{MODEL_FILE_PREFIX}{epoch}")


def step_model_file(output_dir: str, step: int) -> str:
    """Path of the model-only file of a run stopped after ``step`` optimizer steps (--max_steps)."""
    return os.path.join(output_dir, f"{MODEL_FILE_PREFIX}step{step}")


def save_model_file(model: torch.nn.Module, path: str, record: Optional[dict] = None) -> None:
    """Model-only checkpoint: a plain state dict (``torch.load(path, weights_only=True)`` ->
    {name: tensor}, loadable by ``--init_model`` and by ``load_state_dict``), and its record
    ``<path>.json`` (checkpoint_record) when given."""
    save_torch({k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}, path)
    if record is not None:
        checkpoint_record.write_record(path, {**record, "file": os.path.basename(path)})


def load_model_weights(model: torch.nn.Module, path: str) -> list[str]:
    """Strictly load a model-only file (``pytorch_model.bin.N``, or one saved by the released
    AVIGATE code, converted by modules.released_checkpoint) into ``model``; returns the names of
    the parameters that the file lacks and that were created instead.

    The one tolerated difference is the warm start of a text-guided model from a checkpoint
    with fewer text terms (e.g. text-agnostic AVIGATE, docs/design.md §4a): the missing text terms keep
    their initialization and are reported. Anything else missing or unexpected, and any shape
    mismatch, is an error naming the keys.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--init_model {path!r} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(f"--init_model {path!r} is not a model-only weights file (a training state? "
                         f"continue it with --resume_model, or pass a pytorch_model.bin.N file)") from err
    module = unwrap(model)
    text_terms = set(module.text_term_names()) if hasattr(module, "text_term_names") else set()
    if released_checkpoint.is_released_layout(state):  # trained with the released AVIGATE code
        released_checkpoint.check_padding_rule(module.cfg.fusion.padding_rule, path)
        if not text_terms:
            released_checkpoint.load_released_checkpoint(module, state, source=path)
            logger.info("loaded model weights from %s (released AVIGATE layout, converted)", path)
            return []
        frames = module.fusion.frame_position.shape[0]
        state = released_checkpoint.released_to_native(state, num_frames=frames, source=path)
        logger.info("%s: released AVIGATE layout, converted for a text-guided warm start", path)
    own = module.state_dict()
    mismatched = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
                  for k, v in own.items() if k in state and state[k].shape != v.shape]
    missing = [k for k in own if k not in state]
    created = [k for k in missing if k in text_terms]
    missing = [k for k in missing if k not in text_terms]
    unexpected = [k for k in state if k not in own]
    if mismatched or missing or unexpected:
        hint = ("compare its record " + checkpoint_record.record_path(path)
                if os.path.isfile(checkpoint_record.record_path(path)) else
                "it has no record, so the architecture flags must repeat its training run's: compare with "
                "that run's args.json")
        raise ValueError(f"{path}: weights do not match the model built from the flags (width, depth, "
                         f"frames or text flags differ? {hint}): "
                         f"shape mismatches {mismatched[:10]}, missing keys {missing[:10]}, "
                         f"unexpected keys {unexpected[:10]}")
    module.load_state_dict(state, strict=False)
    if created:
        logger.info("warm start from %s: created %d text-guided parameters the file lacks, at their init "
                    "(every other key loaded): %s", path, len(created), ", ".join(created))
    logger.info("loaded model weights from %s", path)
    return created


def save_training_state(path: str, state: dict) -> None:
    """Atomic write of a full training state dict (see ``training.training_state``); its
    ``"record"`` (checkpoint_record), when present, is also written beside it as ``<path>.json``."""
    save_torch(state, path)
    if state.get("record") is not None:
        checkpoint_record.write_record(path, {**state["record"], "file": os.path.basename(path)})


def load_training_state(path: str) -> dict:
    """Read a training state written by this code (trusted: it holds RNG and numpy objects)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--resume_model {path!r} does not exist")
    return torch.load(path, map_location="cpu", weights_only=False)


def report_data_issues(label: str, video_counter, audio_counter, info: DistInfo,
                       recorder: RunRecorder) -> None:
    """Log, once per run, how many videos were dropped/replaced and clips used the zero fbank.

    Videos dropped while building a split are the same on every rank (rank 0's count);
    replacements and audio loads happen per rank (summed).
    """
    local = {f"video_{k}": video_counter.count(k) for k in video_counter.KINDS}
    local.update({f"audio_{k}": audio_counter.count(k) for k in audio_counter.KINDS})
    counts = gather_objects(local, info)
    total = {k: sum(c[k] for c in counts) for k in local}
    total["video_missing"], total["video_unreadable"] = counts[0]["video_missing"], counts[0]["video_unreadable"]
    recorder.log({"event": "data_issues", "data": label, **total})
    logger.info("%s: %s", label, ", ".join(f"{k} {v}" for k, v in total.items()))
