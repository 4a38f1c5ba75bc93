"""Training and evaluation machinery used by ``main_task_retrieval.py``.

Nothing here parses flags: the entry point turns flags into configs and calls these small
functions. Everything works as one process without a process group; under ``torchrun`` the
process group is started by ``setup_distributed`` (called from ``main``).

Sections: distributed setup; determinism (seeds, RNG states, the resumable sampler); run
records (args, git revision, JSON-lines metrics, log file, TensorBoard); checkpoints.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import random
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Sampler
from tqdm import tqdm

from dataloaders.base import collate_items
from metrics import retrieval_metrics, retrieval_metrics_with_dsl

LOGGER_NAME = "avigate"
logger = logging.getLogger(LOGGER_NAME)

MODEL_FILE_PREFIX = "pytorch_model.bin."
TRAINING_STATE_FILE = "training_state.pt"
ARGS_FILE = "args.json"
RUN_INFO_FILE = "run_info.json"
TRAIN_METRICS_FILE = "train_metrics.jsonl"
LOG_FILE = "log.txt"
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
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                rank=rank, world_size=world_size)
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


class WorkerSeeder:
    """DataLoader ``worker_init_fn`` seeding python/numpy/torch from (seed, epoch, rank, worker).

    A plain object so it pickles into spawned workers.
    """

    def __init__(self, seed: int, epoch: int, rank: int):
        self.seed, self.epoch, self.rank = seed, epoch, rank

    def __call__(self, worker_id: int) -> None:
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
def git_revision() -> dict:
    """Commit hash of the code and whether the tree had local changes (None outside git)."""
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


def write_json(path: str, obj: Any) -> None:
    """Atomic JSON write (temp file + rename)."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False, default=str)
    os.replace(tmp, path)


class RunRecorder:
    """Writes what a run needs to be understood later; a no-op on ranks other than 0.

    ``output_dir`` gets ``args.json`` (resolved flags), ``run_info.json`` (git revision,
    command line, world size, versions), ``train_metrics.jsonl`` (one JSON object per
    record) and, with ``tensorboard``, TensorBoard scalars.

    Args:
        output_dir: run directory (created).
        info: this process's place in the job.
        tensorboard: also write TensorBoard event files.
    """

    def __init__(self, output_dir: str, info: DistInfo, tensorboard: bool = False):
        self.output_dir = output_dir
        self.active = info.is_main
        self.writer = None
        if self.active and tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # optional dependency, loaded on demand
            self.writer = SummaryWriter(os.path.join(output_dir, TENSORBOARD_DIR))

    def write_run_files(self, args: dict, info: DistInfo) -> None:
        if not self.active:
            return
        write_json(os.path.join(self.output_dir, ARGS_FILE), args)
        write_json(os.path.join(self.output_dir, RUN_INFO_FILE), {
            "git": git_revision(), "argv": sys.argv, "world_size": info.world_size,
            "device": str(info.device), "torch": torch.__version__,
            "started": time.strftime("%Y-%m-%d %H:%M:%S")})

    def log(self, record: dict, step: Optional[int] = None) -> None:
        """Append ``record`` to the JSON-lines file; numeric leaves also go to TensorBoard."""
        if not self.active:
            return
        with open(os.path.join(self.output_dir, TRAIN_METRICS_FILE), "a") as f:
            f.write(json.dumps(record, default=float) + "\n")
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


# --------------------------------------------------------------------------- checkpoints
def atomic_save(obj: Any, path: str) -> None:
    """torch.save to a temp file in the same directory, then rename over ``path``."""
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DistributedDataParallel wrapper (or the model itself)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def model_file(output_dir: str, epoch: int) -> str:
    """Path of the model-only file of ``epoch`` (1-based, as the released code names them)."""
    return os.path.join(output_dir, f"{MODEL_FILE_PREFIX}{epoch}")


def save_model_file(model: torch.nn.Module, path: str) -> None:
    """Model-only checkpoint (a plain state dict, loadable by ``--init_model``)."""
    atomic_save({k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}, path)


def load_model_weights(model: torch.nn.Module, path: str) -> None:
    """Strictly load a model-only file (``pytorch_model.bin.N``) into ``model``."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--init_model {path!r} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(f"--init_model {path!r} is not a model-only weights file (a training state? "
                         f"continue it with --resume_model, or pass a pytorch_model.bin.N file)") from err
    result = unwrap(model).load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"{path}: weights do not match the model built from the flags; "
                         f"missing keys {result.missing_keys[:10]}, unexpected keys "
                         f"{result.unexpected_keys[:10]} (check the architecture flags against "
                         f"the run's args.json)")
    logger.info("loaded model weights from %s", path)


def save_training_state(path: str, state: dict) -> None:
    """Atomic write of a full training state dict (see ``main_task_retrieval.training_state``)."""
    atomic_save(state, path)


def load_training_state(path: str) -> dict:
    """Read a training state written by this code (trusted: it holds RNG and numpy objects)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--resume_model {path!r} does not exist")
    return torch.load(path, map_location="cpu", weights_only=False)


# --------------------------------------------------------------------------- training
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, precision: str):
    """Autocast context for ``--precision`` (a no-op for fp32)."""
    if precision not in PRECISIONS:
        raise ValueError(f"--precision {precision!r} is unknown; use one of {list(PRECISIONS)}")
    dtype = PRECISIONS[precision]
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype is not None)


def video_inputs(batch: dict, device: torch.device) -> dict:
    """Collated video keys (dataloaders.base) -> keyword arguments of ``AVIGATE.encode_video``.

    The audio is the fbank (wav files), the cached AST tokens, or None (no audio source).
    """
    audio = batch.get("fbank", batch.get("audio_tokens"))
    return {"frames": batch["frames"].to(device), "frame_mask": batch["frame_mask"].to(device),
            "audio": None if audio is None else audio.to(device)}


def model_inputs(batch: dict, device: torch.device) -> dict:
    """Collated training items -> keyword arguments of ``AVIGATE.forward``."""
    return {"text_ids": batch["text_ids"].to(device), "text_mask": batch["text_mask"].to(device),
            **video_inputs(batch, device)}


@dataclass
class Progress:
    """Where training stands; saved in every training state.

    Args:
        epoch: current epoch (0-based).
        step: optimizer steps done in the whole run.
        epoch_step: optimizer steps done in the current epoch.
        best_metric: best validation score so far (None before the first validation).
        best_epoch: 0-based epoch of that score (the N of pytorch_model.bin.N).
    """

    epoch: int = 0
    step: int = 0
    epoch_step: int = 0
    best_metric: Optional[float] = None
    best_epoch: Optional[int] = None


@dataclass
class Trainer:
    """What a training step needs.

    Args:
        model: the model, wrapped in DistributedDataParallel when distributed.
        optimizer: BertAdam or AdamW over the named groups.
        scheduler: LambdaLR with the warmup-cosine multiplier.
        scaler: GradScaler (active only for fp16).
        info: process placement.
        precision: "fp32", "bf16" or "fp16".
        accumulation: micro-batches per optimizer step.
    """

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    info: DistInfo
    precision: str = "fp32"
    accumulation: int = 1


def train_step(trainer: Trainer, micro_batches: list[dict]) -> dict:
    """One optimizer step over ``accumulation`` micro-batches; returns the loss and the mean
    |gate| per layer of each gate.

    Gradients are synchronized over ranks only on the last micro-batch. The loss is the
    global (all-gathered) batch loss, identical on every rank.
    """
    model, info = trainer.model, trainer.info
    model.train()
    losses, gates = [], {}
    for k, batch in enumerate(micro_batches):
        last = k == len(micro_batches) - 1
        sync = model.no_sync() if info.distributed and not last else contextlib.nullcontext()
        with sync:
            with autocast(info.device, trainer.precision):
                out = model(**model_inputs(batch, info.device))
            trainer.scaler.scale(out.loss / len(micro_batches)).backward()
        losses.append(out.loss.detach().float())
        for name, value in out.gate_stats.items():
            gates.setdefault(name, []).append(value.detach().float())
    trainer.scaler.step(trainer.optimizer)
    trainer.scaler.update()
    trainer.scheduler.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    return {"loss": torch.stack(losses).mean().item(),
            "gates": {name: torch.stack(v).mean(0).tolist() for name, v in gates.items()}}


def group_lrs(optimizer: torch.optim.Optimizer) -> dict:
    """Current learning rate of every named group."""
    return {g.get("name", str(k)): g["lr"] for k, g in enumerate(optimizer.param_groups)}


def grouped(loader, size: int) -> Iterator[list]:
    """Consecutive lists of ``size`` items (an incomplete tail is dropped)."""
    group = []
    for item in loader:
        group.append(item)
        if len(group) == size:
            yield group
            group = []


def training_state(trainer: Trainer, progress: Progress, args: dict) -> dict:
    """Everything a resumed run needs; gathers every rank's RNG state (call on all ranks)."""
    return {"model": unwrap(trainer.model).state_dict(), "optimizer": trainer.optimizer.state_dict(),
            "scheduler": trainer.scheduler.state_dict(), "scaler": trainer.scaler.state_dict(),
            "progress": vars(progress).copy(), "args": args,
            "rng": gather_objects(rng_state(), trainer.info), "world_size": trainer.info.world_size}


def restore_training_state(trainer: Trainer, state: dict) -> Progress:
    """Load a training state into a freshly built trainer; returns the progress to resume from."""
    unwrap(trainer.model).load_state_dict(state["model"])
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.scheduler.load_state_dict(state["scheduler"])
    trainer.scaler.load_state_dict(state["scaler"])
    if state["world_size"] == trainer.info.world_size:
        set_rng_state(state["rng"][trainer.info.rank])
    else:
        logger.warning("resuming on %d ranks a state saved on %d: RNG states are not restored",
                       trainer.info.world_size, state["world_size"])
    return Progress(**state["progress"])


@dataclass
class EpochHooks:
    """Per-step side effects of ``train_epoch`` (logging, saving, stopping).

    Args:
        recorder: JSON-lines / TensorBoard writer.
        save_state: called with no argument to write the full training state (all ranks).
        n_display: log every n steps.
        save_every_steps: write the training state every n steps (0 = only at epoch end).
        max_steps: stop the run after this many optimizer steps (0 = no limit).
    """

    recorder: RunRecorder
    save_state: Any
    n_display: int = 100
    save_every_steps: int = 0
    max_steps: int = 0


def train_epoch(trainer: Trainer, loader, progress: Progress, steps_in_epoch: int,
                hooks: EpochHooks) -> bool:
    """Run the rest of the current epoch; returns False when ``max_steps`` stopped the run."""
    bar = tqdm(total=steps_in_epoch, initial=progress.epoch_step, disable=not trainer.info.is_main,
               desc=f"epoch {progress.epoch + 1}", leave=False)
    window_start, window_steps = time.time(), 0
    for micro_batches in grouped(loader, trainer.accumulation):
        lrs = group_lrs(trainer.optimizer)
        result = train_step(trainer, micro_batches)
        progress.step += 1
        progress.epoch_step += 1
        window_steps += 1
        bar.update(1)
        if progress.step % hooks.n_display == 0:
            rate = window_steps / max(time.time() - window_start, 1e-9)
            window_start, window_steps = time.time(), 0
            hooks.recorder.log({"event": "train", "epoch": progress.epoch + 1, "step": progress.step,
                                "loss": result["loss"], "lr": lrs, "gate_abs_mean": result["gates"],
                                "steps_per_s": rate}, step=progress.step)
            logger.info("epoch %d step %d/%d loss %.6f lr %.3g", progress.epoch + 1, progress.epoch_step,
                        steps_in_epoch, result["loss"], max(lrs.values()))
        if hooks.max_steps and progress.step >= hooks.max_steps:
            hooks.save_state()
            bar.close()
            return False
        if hooks.save_every_steps and progress.step % hooks.save_every_steps == 0:
            hooks.save_state()
    bar.close()
    return True


# --------------------------------------------------------------------------- evaluation
# Texts per score_with_gates call: bounds the [rows, Nv, L] gate tensors of text-guided models.
EVAL_ROW_BLOCK = 1024
PROTOCOL_NAMES = {"honest": "pairs", "paired_block": "paired_block"}
LEAK_LABEL = ("LEAKING: paired_block fuses each video with the caption at its position in the "
              "evaluation batch (the public implementation's protocol); not a valid result")
SELECTION_METRIC = "t2v_R@1"


def eval_loader(dataset, batch_size: int, workers: int, collate_fn) -> torch.utils.data.DataLoader:
    """Sequential loader over an evaluation dataset (or a rank's subset of it)."""
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False,
                                       num_workers=workers, collate_fn=collate_fn,
                                       generator=torch.Generator())


def _cat(parts: list):
    """Concatenate feature objects (TextFeatures / VideoFeatures), skipping empty shards."""
    parts = [p for p in parts if p is not None]
    return type(parts[0]).cat(parts)


@torch.no_grad()
def encode_dataset(model: torch.nn.Module, dataset, kind: str, batch_size: int, workers: int,
                   collate_fn, info: DistInfo, precision: str, desc: str):
    """Encode every item once: each rank encodes its contiguous shard, all ranks get all features.

    Args:
        kind: "text" (TextDataset items -> TextFeatures) or "video" (VideoDataset -> VideoFeatures).
    Returns: the features of all N items in dataset order, fp32 on the CPU.
    """
    model = unwrap(model).eval()
    shard = torch.utils.data.Subset(dataset, list(shard_range(len(dataset), info)))
    parts = []
    for batch in tqdm(eval_loader(shard, batch_size, workers, collate_fn), desc=desc, leave=False,
                      disable=not info.is_main):
        with autocast(info.device, precision):
            if kind == "text":
                feats = model.encode_text(batch["text_ids"].to(info.device),
                                          batch["text_mask"].to(info.device))
            else:
                feats = model.encode_video(**video_inputs(batch, info.device))
        parts.append(feats.to(device="cpu", dtype=torch.float32))
    local = _cat(parts) if parts else None
    return _cat(gather_objects(local, info))


@dataclass
class ScoredSplit:
    """Scores of an evaluation split and the gates used (rank 0 holds the full result).

    Args:
        sim: plain scores [Nt, Nv] (fp32 numpy).
        video_gates: name -> [Nv, L] per-video gates (text-agnostic models).
        own_caption_gates: name -> [Nt, L], text i's gates on its own video (text-guided).
        mean_text_gates: name -> [Nv, L], each video's gates averaged over all Nt texts (text-guided).
    """

    sim: np.ndarray
    video_gates: dict
    own_caption_gates: dict
    mean_text_gates: dict


def _scored_rows(info: DistInfo, num_texts: int, protocol: str) -> range:
    """Texts this rank scores: its shard ("pairs": a score depends only on its pair), or, for
    the order-dependent paired_block protocol, every text on rank 0."""
    if protocol == "paired_block":
        return range(num_texts) if info.is_main else range(0)
    return shard_range(num_texts, info)


@torch.no_grad()
def score_split(model: torch.nn.Module, texts, videos, caption_video: np.ndarray, info: DistInfo,
                protocol: str = "honest", block_size: int = 1,
                chunk: Optional[tuple[int, int]] = None, precision: str = "fp32") -> Optional[ScoredSplit]:
    """Score all texts against all videos with the model's ``score_with_gates``.

    Rows are split over ranks and scored in blocks of texts; a text-guided model's
    [rows, Nv, L] gates are reduced per block to each text's own-video gates and to per-video
    sums. Returns the full result on rank 0 and None elsewhere.

    Args:
        texts: TextFeatures of all Nt texts; videos: VideoFeatures of all Nv videos.
        caption_video: int [Nt], the ground-truth video of each text.
        protocol: "honest" or "paired_block" (leaking diagnostic; blocks of ``block_size``).
        chunk: (texts, videos) per fusion chunk; None = the model's memory budget.
        precision: autocast precision of the scoring (scores are returned in fp32).
    """
    model = unwrap(model).eval()
    rows = _scored_rows(info, len(texts), protocol)
    # paired_block blocks must start at multiples of block_size.
    step = block_size * max(1, EVAL_ROW_BLOCK // block_size) if protocol == "paired_block" else EVAL_ROW_BLOCK
    sims, own, totals, video_gates = [], {}, {}, {}
    for start in range(rows.start, rows.stop, step):
        index = torch.arange(start, min(start + step, rows.stop))
        with autocast(info.device, precision):
            out = model.score_with_gates(texts.select(index), videos, chunk=chunk,
                                         protocol=PROTOCOL_NAMES[protocol], block_size=block_size)
        sims.append(out.scores.float().cpu().numpy())
        own_video = torch.as_tensor(caption_video[index.numpy()])
        for name, g in out.gates.items():
            g = g.float().cpu()
            if g.dim() == 2:  # text-agnostic: [Nv, L], the same for every text
                video_gates[name] = g.numpy()
                continue
            own.setdefault(name, []).append(g[torch.arange(len(index)), own_video].numpy())
            totals[name] = totals.get(name, 0) + g.sum(0).numpy()
    parts = gather_objects((sims, own, totals, video_gates), info)
    if not info.is_main:
        return None
    sim = np.concatenate([s for p in parts for s in p[0]] or [np.zeros((0, len(videos)), np.float32)])
    names = {name for p in parts for name in p[1]}
    own_all = {n: np.concatenate([o for p in parts for o in p[1].get(n, [])]) for n in names}
    mean_all = {n: sum(p[2][n] for p in parts if n in p[2]) / len(texts) for n in names}
    video_gates = {n: g for p in parts for n, g in p[3].items()}
    return ScoredSplit(sim, video_gates, own_all, mean_all)


def split_metrics(sim: np.ndarray, caption_video: np.ndarray, dsl: bool) -> dict:
    """{"plain": metrics} and, with ``dsl``, "dsl" beside it (metrics.py)."""
    if dsl:
        return retrieval_metrics_with_dsl(sim, caption_video)
    return {"plain": retrieval_metrics(sim, caption_video)}


def _floats(values: np.ndarray) -> list:
    return [float(v) for v in np.asarray(values).reshape(-1)]


def gates_report(scored: ScoredSplit, split) -> dict:
    """gates.json content: per-video gate values per layer (signed; analyses use |g|).

    Text-agnostic models: ``videos[k]["gates"][name]`` = [L]. Text-guided models:
    ``videos[k]["own_captions"]`` lists, for each caption of the video, its gates [L] on
    that video; ``own_caption_mean`` averages them; ``all_texts_mean`` averages the video's
    gates over every text of the split.
    """
    text_guided = bool(scored.own_caption_gates)
    names = sorted(scored.own_caption_gates or scored.video_gates)
    videos = []
    for v, video_id in enumerate(split.video_ids):
        entry: dict = {"video_id": video_id}
        if not text_guided:
            entry["gates"] = {n: _floats(scored.video_gates[n][v]) for n in names}
        else:
            captions = split.captions_of(v)
            entry["own_captions"] = [{"text_index": int(t), "caption": split.captions[t],
                                      **{n: _floats(scored.own_caption_gates[n][t]) for n in names}}
                                     for t in captions]
            entry["own_caption_mean"] = {n: _floats(scored.own_caption_gates[n][captions].mean(0))
                                         for n in names}
            entry["all_texts_mean"] = {n: _floats(scored.mean_text_gates[n][v]) for n in names}
        videos.append(entry)
    return {"text_guided": text_guided, "gate_names": names, "videos": videos}


def write_eval_outputs(output_dir: str, split, scored: ScoredSplit, metrics: dict) -> None:
    """metrics.json, sim_matrix.npy [Nt, Nv], sim_rows.json, sim_cols.json and gates.json."""
    os.makedirs(output_dir, exist_ok=True)
    write_json(os.path.join(output_dir, "metrics.json"), metrics)
    tmp = os.path.join(output_dir, f"sim_matrix.tmp{os.getpid()}.npy")
    np.save(tmp, scored.sim.astype(np.float32))
    os.replace(tmp, os.path.join(output_dir, "sim_matrix.npy"))
    write_json(os.path.join(output_dir, "sim_rows.json"),
               [{"video_id": split.video_ids[v], "caption": c}
                for c, v in zip(split.captions, split.caption_video)])
    write_json(os.path.join(output_dir, "sim_cols.json"), list(split.video_ids))
    if scored.video_gates or scored.own_caption_gates:
        write_json(os.path.join(output_dir, "gates.json"), gates_report(scored, split))


@dataclass
class EvalOptions:
    """How an evaluation pass runs.

    Args:
        batch_size: items per encoding batch (per rank).
        workers: DataLoader workers.
        precision: autocast precision of the encoders.
        protocol: "honest" or "paired_block" (LEAKING diagnostic).
        block_size: block length of "paired_block".
        chunk: (texts, videos) per fusion chunk; None = the model's memory budget.
        dsl: also compute dual-softmax metrics.
    """

    batch_size: int = 16
    workers: int = 0
    precision: str = "fp32"
    protocol: str = "honest"
    block_size: int = 16
    chunk: Optional[tuple[int, int]] = None
    dsl: bool = False


def evaluate(model: torch.nn.Module, data, options: EvalOptions, info: DistInfo, desc: str = "eval"):
    """Encode every text and video of ``data`` (EvalDatasets) once, score, compute metrics.

    Returns (metrics, ScoredSplit) on rank 0 and (None, None) elsewhere. metrics holds
    "plain" (and "dsl") retrieval metrics and the protocol; a paired_block evaluation is
    labelled "LEAKING".
    """
    common = dict(batch_size=options.batch_size, workers=options.workers, collate_fn=collate_items,
                  info=info, precision=options.precision)
    texts = encode_dataset(model, data.texts, "text", desc=f"{desc} texts", **common)
    videos = encode_dataset(model, data.videos, "video", desc=f"{desc} videos", **common)
    scored = score_split(model, texts, videos, data.split.caption_video, info, options.protocol,
                         options.block_size, options.chunk, options.precision)
    if not info.is_main:
        return None, None
    metrics = split_metrics(scored.sim, data.split.caption_video, options.dsl)
    metrics["protocol"] = options.protocol
    if options.protocol == "paired_block":
        metrics["LEAKING"] = LEAK_LABEL
        logger.warning(LEAK_LABEL)
    return metrics, scored


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
