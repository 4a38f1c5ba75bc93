"""Training steps and epochs for ``main_task_retrieval.py``: precision, batches -> model
inputs, the optimizer step with gradient accumulation, the resumable epoch loop and
the training state it saves.
"""
from __future__ import annotations

import contextlib
import signal
import time
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist
from tqdm import tqdm

from dataloaders.base import video_inputs
from util import DistInfo, RunRecorder, autocast, gather_objects, logger, rng_state, set_rng_state, unwrap


# Signals schedulers send before killing a job (SLURM: SIGTERM, or SIGUSR1 with --signal).
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
# Exit status of a run stopped by one of them after writing its training state (EX_TEMPFAIL:
# "try again", i.e. resume); a requeue script tells it from a crash by this value.
PREEMPTED_EXIT = 75


class Preempted(Exception):
    """Training stopped on a preemption signal after writing a resumable training state."""


class PreemptionGuard:
    """Turns SIGTERM / SIGUSR1 into a request to stop after the current optimizer step.

    ``requested()`` is asked once per step; under torch.distributed the ranks agree (any rank
    signalled stops all, at the same step) through a CPU (gloo) group, so the check never waits
    for the GPU. Use as a context manager: the previous handlers come back on exit. Signals
    are only caught in the main thread (elsewhere the guard stays inactive).

    Args:
        info: process placement.
    """

    def __init__(self, info):
        self.info = info
        self.signal_name: Optional[str] = None
        self._previous = {}
        self._group = dist.new_group(backend="gloo") if info.distributed else None

    def _handle(self, signum, frame) -> None:
        self.signal_name = signal.Signals(signum).name

    def __enter__(self) -> "PreemptionGuard":
        with contextlib.suppress(ValueError):  # not the main thread: signals cannot be caught here
            for sig in PREEMPTION_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
        if self._group is not None:
            dist.destroy_process_group(self._group)
            self._group = None

    def requested(self) -> bool:
        """Whether this rank (or, distributed, any rank) was signalled to stop."""
        if self._group is None:
            return self.signal_name is not None
        flag = torch.tensor([int(self.signal_name is not None)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        return bool(flag.item())


def model_inputs(batch: dict, device: torch.device) -> dict:
    """Collated training items -> keyword arguments of ``AVIGATE.forward``."""
    return {"text_ids": batch["text_ids"].to(device, non_blocking=True),
            "text_mask": batch["text_mask"].to(device, non_blocking=True), **video_inputs(batch, device)}


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
        objective: the ContrastiveObjective (holding the model), wrapped in
            DistributedDataParallel when distributed.
        optimizer: BertAdam or AdamW over the named groups.
        scheduler: LambdaLR with the warmup-cosine multiplier.
        scaler: GradScaler (active only for fp16).
        info: process placement.
        precision: "fp32", "bf16" or "fp16".
        accumulation: micro-batches per optimizer step.
    """

    objective: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    info: DistInfo
    precision: str = "fp32"
    accumulation: int = 1

    @property
    def model(self) -> torch.nn.Module:
        """The AVIGATE model inside the (possibly DDP-wrapped) objective."""
        return unwrap(self.objective).model


def train_step(trainer: Trainer, micro_batches: list[dict]) -> dict:
    """One optimizer step over ``accumulation`` micro-batches; returns the loss and the mean
    |gate| per layer of each gate as tensors (read them only when logging: converting to
    Python numbers waits for the device).

    Gradients are synchronized over ranks only on the last micro-batch. The loss is the
    global (all-gathered) batch loss, identical on every rank. After the update the logit
    scale is clamped at ln 100 (docs/design.md §5).
    """
    objective, info = trainer.objective, trainer.info
    objective.train()
    losses, gates = [], {}
    try:
        for k, batch in enumerate(micro_batches):
            last = k == len(micro_batches) - 1
            sync = objective.no_sync() if info.distributed and not last else contextlib.nullcontext()
            with sync:
                with autocast(info.device, trainer.precision):
                    out = objective(**model_inputs(batch, info.device))
                trainer.scaler.scale(out.loss / len(micro_batches)).backward()
            losses.append(out.loss.detach().float())
            for name, value in out.gate_stats.items():
                gates.setdefault(name, []).append(value.detach().float())
    except torch.OutOfMemoryError as err:
        hint = unwrap(objective).memory_hint(trainer.precision)
        raise torch.OutOfMemoryError(f"out of memory in a training step: {hint}; ({err})") from err
    trainer.scaler.step(trainer.optimizer)
    trainer.scaler.update()
    trainer.scheduler.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.model.clamp_logit_scale_()
    return {"loss": torch.stack(losses).mean(),
            "gates": {name: torch.stack(v).mean(0) for name, v in gates.items()}}


def group_lrs(optimizer: torch.optim.Optimizer) -> dict:
    """Current learning rate of every named group."""
    return {g.get("name", str(k)): g["lr"] for k, g in enumerate(optimizer.param_groups)}


def lr_summary(lrs: dict) -> str:
    """"lr 1e-04 (clip 1e-07, new 1e-04, query 0.01)": the base lr (--lr after the schedule: the
    "new" groups') and each parameter role's lr (its decay / no_decay groups share it)."""
    roles = {}
    for name, lr in lrs.items():
        roles.setdefault(name.split("/")[0], lr)
    base = f"lr {roles['new']:.3g}" if "new" in roles else "lr (no base group)"
    return f"{base} ({', '.join(f'{role} {lr:.3g}' for role, lr in roles.items())})"


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
    return {"model": trainer.model.state_dict(), "optimizer": trainer.optimizer.state_dict(),
            "scheduler": trainer.scheduler.state_dict(), "scaler": trainer.scaler.state_dict(),
            "progress": vars(progress).copy(), "args": args,
            "rng": gather_objects(rng_state(), trainer.info), "world_size": trainer.info.world_size}


def restore_training_state(trainer: Trainer, state: dict) -> Progress:
    """Load a training state into a freshly built trainer; returns the progress to resume from."""
    trainer.model.load_state_dict(state["model"])
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
        preemption: asked after every step; when it reports a signal the state is written and
            ``Preempted`` raised (None: no signal handling).
    """

    recorder: RunRecorder
    save_state: Any
    n_display: int = 100
    save_every_steps: int = 0
    max_steps: int = 0
    preemption: Optional[PreemptionGuard] = None

    def stop_if_preempted(self, progress: Progress, saved: bool) -> None:
        """After a step (or an epoch end, ``saved``: its state is written): write the state and
        raise ``Preempted`` when a preemption signal arrived."""
        if self.preemption is None or not self.preemption.requested():
            return
        if not saved:
            self.save_state()
        raise Preempted(f"stopped by {self.preemption.signal_name or 'another rank'} after step {progress.step} "
                        f"(epoch {progress.epoch + 1}); the training state is written: continue with "
                        f"--resume_model")


def train_epoch(trainer: Trainer, loader, progress: Progress, steps_in_epoch: int,
                hooks: EpochHooks) -> bool:
    """Run the rest of the current epoch; returns False when ``max_steps`` stopped the run.
    Raises ``Preempted`` (after writing the state) when ``hooks.preemption`` was signalled."""
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
            loss = result["loss"].item()
            gates = {name: value.tolist() for name, value in result["gates"].items()}
            hooks.recorder.log({"event": "train", "epoch": progress.epoch + 1, "step": progress.step,
                                "loss": loss, "lr": lrs, "gate_abs_mean": gates,
                                "steps_per_s": rate}, step=progress.step)
            logger.info("epoch %d step %d/%d loss %.6f %s", progress.epoch + 1, progress.epoch_step,
                        steps_in_epoch, loss, lr_summary(lrs))
        if hooks.max_steps and progress.step >= hooks.max_steps:
            hooks.save_state()
            bar.close()
            return False
        saved = bool(hooks.save_every_steps) and progress.step % hooks.save_every_steps == 0
        if saved:
            hooks.save_state()
        hooks.stop_if_preempted(progress, saved)
    bar.close()
    return True
