"""Optimizer, learning-rate schedule and parameter groups of the training recipe (docs/design.md §7).

* ``BertAdam``: the released recipe's Adam variant: no bias correction, decoupled weight
  decay (``p -= lr * (m / (sqrt(v) + eps) + wd * p)``), and the gradients of each
  parameter group clipped to a total norm before the moments are updated.
* ``GroupClippedAdamW``: ``torch.optim.AdamW`` with the same per-group clipping
  (``--optimizer adamw``).
* ``WarmupCosine``: the multiplier on progress x = step / total: x / warmup for
  x < warmup, else 0.5 (1 + cos(pi x)); used through ``LambdaLR`` so its state is
  checkpointed with the scheduler. Like the released code, step 0 has multiplier 0.
* ``parameter_groups``: named groups from the model's parameter names (no argparse).

Parameter roles (``parameter_role``):
    frozen  AST trunk (all of ``ast.*`` except its final LayerNorm ``ast.norm.*``) unless
            ``train_ast``;
            CLIP's embeddings: ``visual.conv1``, ``visual.class_embedding``,
            ``visual.positional_embedding``, ``visual.ln_pre``, ``token_embedding``,
            ``positional_embedding``; and resblocks 0..freeze_layer_num-1 of both
            CLIP towers (``--freeze_layer_num``; 0 freezes no block); with ``freeze_clip``
            both CLIP towers whole (``--freeze_clip``; only ``logit_scale``, the similarity's
            temperature, which belongs to no tower, keeps training).
    clip    every other CLIP parameter (lr x coef_lr).
    ast     with ``train_ast`` (``--train_ast``), the AST trunk: lr x coef_lr, the rate of the
            other pretrained encoder.
    query   the resampler's learned query tokens (lr x query_lr_scale, ``--query_lr_scale``).
    new     everything else, including ``audio_projection`` and ``ast.norm`` (lr).
With ``freeze_agnostic`` every parameter but the text terms of a text-guided fusion
(``modules.fusion.is_text_term``) is frozen: only the text guidance learns (docs/design.md §4a).
``freeze_parameters`` sets ``requires_grad`` from the role, for every parameter (trainable
roles on, frozen off), so it alone decides what trains.
Weight decay rule: tensors with fewer than two dimensions (biases, LayerNorm weights and
biases, ``logit_scale``, CLIP's class embedding) get none; matrices and embedding tables
get ``weight_decay``.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

from modules.fusion import is_text_term

OPTIMIZERS = ("bertadam", "adamw")
# Gradient clipping: each parameter group on its own (docs/design.md §7) or the global norm of every
# gradient at once (the released CLIP4Clip/AVIGATE training loop).
CLIP_SCOPES = ("group", "global")
# Which tensors get weight decay: those with >= 2 dimensions (docs/design.md §7) or every tensor whose
# name lacks "bias" (the released code's no-decay list, which matches none of CLIP's LayerNorms).
DECAY_RULES = ("ndim", "released")
ROLES = ("clip", "ast", "new", "query")

CLIP_PREFIX = "clip."
AST_PREFIX = "ast."
AST_TRAINABLE_PREFIX = "ast.norm."
QUERY_PARAM_NAMES = ("resampler.queries",)
# CLIP's input embeddings, relative to the CLIP module (OpenAI key names).
CLIP_FROZEN_PREFIXES = ("visual.conv1.", "visual.class_embedding", "visual.positional_embedding",
                        "visual.ln_pre.", "token_embedding.", "positional_embedding")
CLIP_RESBLOCK = re.compile(r"^(?:visual\.)?transformer\.resblocks\.(\d+)\.")
# The one CLIP parameter outside the towers: the similarity's learned temperature.
CLIP_TEMPERATURE = "logit_scale"


@dataclass
class OptimConfig:
    """Optimizer settings.

    Args:
        name: "bertadam" (released recipe) or "adamw".
        lr: learning rate of the new modules and ``audio_projection`` (``--lr``).
        coef_lr: multiplier of ``lr`` for CLIP parameters (``--coef_lr``).
        query_lr_scale: multiplier of ``lr`` for the resampler's query tokens
            (``--query_lr_scale``; the released recipe's 100).
        weight_decay: decoupled weight decay on matrices.
        betas: Adam moment coefficients.
        eps: Adam epsilon (added to sqrt(v)).
        max_grad_norm: gradient-norm clip per parameter group (<= 0 disables).
        warmup_proportion: fraction of the steps spent in linear warmup (``--warmup_proportion``).
        freeze_layer_num: number of leading resblocks frozen in each CLIP tower.
        freeze_agnostic: train only the text terms (``--freeze_agnostic``).
        freeze_clip: freeze both CLIP towers (``--freeze_clip``; Table 11 (f)).
        train_ast: train the AST trunk at lr x coef_lr (``--train_ast``; Table 11 (e)).
        clip_scope: "group" (each group clipped to max_grad_norm) or "global" (the norm of all
            gradients together, as released) (``--grad_clip_scope``).
        decay_rule: "ndim" or "released" (module docstring; ``--weight_decay_rule``).
    """

    name: str = "bertadam"
    lr: float = 1e-4
    coef_lr: float = 1e-3
    query_lr_scale: float = 100.0
    weight_decay: float = 0.2
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    max_grad_norm: float = 1.0
    warmup_proportion: float = 0.1
    freeze_layer_num: int = 0
    freeze_agnostic: bool = False
    freeze_clip: bool = False
    train_ast: bool = False
    clip_scope: str = "group"
    decay_rule: str = "ndim"

    def __post_init__(self):
        if self.clip_scope not in CLIP_SCOPES:
            raise ValueError(f"--grad_clip_scope must be one of {CLIP_SCOPES}, got {self.clip_scope!r}")
        if self.decay_rule not in DECAY_RULES:
            raise ValueError(f"--weight_decay_rule must be one of {DECAY_RULES}, got {self.decay_rule!r}")
        if self.freeze_agnostic and (self.freeze_clip or self.train_ast):
            raise ValueError("--freeze_agnostic trains only the text terms; --freeze_clip / --train_ast "
                             "would have no effect: drop one of them")


def clip_group_gradients(params: Iterable[torch.Tensor], max_norm: float) -> None:
    """Scale the gradients of one parameter group so their joint L2 norm is <= max_norm."""
    with_grad = [p for p in params if p.grad is not None]
    if max_norm > 0 and with_grad:
        torch.nn.utils.clip_grad_norm_(with_grad, max_norm)


def clip_gradients(param_groups: list[dict]) -> None:
    """Each group's gradients to its ``max_grad_norm`` (clip_scope "group"), or all of them
    together to the first group's (clip_scope "global")."""
    if param_groups and param_groups[0].get("clip_scope", "group") == "global":
        clip_group_gradients([p for g in param_groups for p in g["params"]], param_groups[0]["max_grad_norm"])
        return
    for group in param_groups:
        clip_group_gradients(group["params"], group["max_grad_norm"])


class BertAdam(torch.optim.Optimizer):
    """Adam without bias correction and with decoupled weight decay (the released "BertAdam").

    For each parameter p with gradient g (after the group's norm clip):
        m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
        p = p - lr * (m / (sqrt(v) + eps) + weight_decay * p)
    The learning rate is the group's ``lr`` as set by the scheduler.

    Args:
        params: parameters or parameter-group dicts.
        lr: default learning rate.
        betas: moment coefficients (b1, b2).
        eps: added to sqrt(v).
        weight_decay: default decoupled weight decay.
        max_grad_norm: default per-group gradient clip (<= 0 disables).
    """

    def __init__(self, params, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.98),
                 eps: float = 1e-6, weight_decay: float = 0.0, max_grad_norm: float = 1.0):
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise ValueError(f"BertAdam: lr ({lr}), eps ({eps}) and weight_decay ({weight_decay}) "
                             "must be >= 0")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"BertAdam: betas {betas} must lie in [0, 1)")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        max_grad_norm=max_grad_norm)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        """One update of every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        clip_gradients(self.param_groups)
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("BertAdam does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.mul_(beta1).add_(p.grad, alpha=1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                update = exp_avg / (exp_avg_sq.sqrt() + group["eps"])
                if group["weight_decay"] > 0:
                    update.add_(p, alpha=group["weight_decay"])
                p.add_(update, alpha=-group["lr"])
        return loss


class GroupClippedAdamW(torch.optim.AdamW):
    """torch.optim.AdamW whose step first clips each group's gradient norm (as BertAdam does)."""

    def __init__(self, params, max_grad_norm: float = 1.0, **kwargs):
        super().__init__(params, **kwargs)
        for group in self.param_groups:
            group.setdefault("max_grad_norm", max_grad_norm)

    @torch.no_grad()
    def step(self, closure=None):
        clip_gradients(self.param_groups)
        return super().step(closure)


class WarmupCosine:
    """LR multiplier for step s of ``total_steps``: x = s / total; x / warmup if x < warmup,
    else 0.5 (1 + cos(pi x)).

    A plain object (not a closure) so ``LambdaLR.state_dict`` records its fields.

    Args:
        total_steps: optimizer steps of the whole run.
        warmup: warmup fraction of the run.
    """

    def __init__(self, total_steps: int, warmup: float):
        if total_steps <= 0:
            raise ValueError(f"total_steps must be positive, got {total_steps}")
        self.total_steps = total_steps
        self.warmup = warmup

    def __call__(self, step: int) -> float:
        x = step / self.total_steps
        if x < self.warmup:
            return x / self.warmup
        return 0.5 * (1.0 + math.cos(math.pi * x))


def parameter_role(name: str, freeze_layer_num: int, freeze_agnostic: bool = False, freeze_clip: bool = False,
                   train_ast: bool = False) -> str:
    """Role of a model parameter, from its name: "frozen", "clip", "ast", "query" or "new"
    (module doc)."""
    if freeze_agnostic:
        return "new" if is_text_term(name) else "frozen"
    if name.startswith(AST_PREFIX):
        if name.startswith(AST_TRAINABLE_PREFIX):
            return "new"
        return "ast" if train_ast else "frozen"
    if name.startswith(CLIP_PREFIX):
        clip_name = name[len(CLIP_PREFIX):]
        if freeze_clip and clip_name != CLIP_TEMPERATURE:
            return "frozen"
        if clip_name.startswith(CLIP_FROZEN_PREFIXES):
            return "frozen"
        block = CLIP_RESBLOCK.match(clip_name)
        if block is not None and int(block.group(1)) < freeze_layer_num:
            return "frozen"
        return "clip"
    if name in QUERY_PARAM_NAMES:
        return "query"
    return "new"


def role_of(name: str, cfg: OptimConfig) -> str:
    """``parameter_role`` with the settings of ``cfg``."""
    return parameter_role(name, cfg.freeze_layer_num, cfg.freeze_agnostic, cfg.freeze_clip, cfg.train_ast)


def freeze_parameters(model: nn.Module, freeze_layer_num: int, freeze_agnostic: bool = False,
                      freeze_clip: bool = False, train_ast: bool = False) -> list[str]:
    """Set requires_grad from each parameter's role (off for "frozen", on otherwise); returns
    the names of the frozen ones."""
    frozen = []
    for name, p in model.named_parameters():
        trainable = parameter_role(name, freeze_layer_num, freeze_agnostic, freeze_clip, train_ast) != "frozen"
        p.requires_grad_(trainable)
        if not trainable:
            frozen.append(name)
    return frozen


def parameter_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Named optimizer groups ``{"name", "params", "param_names", "lr", "weight_decay"}``.

    One group per (role, decay) pair that has parameters, named e.g. "clip/decay",
    "new/no_decay", "query/decay". Frozen parameters and those with requires_grad=False
    appear in no group.
    """
    lr_of_role = {"clip": cfg.lr * cfg.coef_lr, "ast": cfg.lr * cfg.coef_lr, "new": cfg.lr,
                  "query": cfg.lr * cfg.query_lr_scale}
    buckets: dict[str, dict] = {}
    for name, p in model.named_parameters():
        role = role_of(name, cfg)
        if role == "frozen" or not p.requires_grad:
            continue
        decay = p.ndim >= 2 if cfg.decay_rule == "ndim" else "bias" not in name
        key = f"{role}/{'decay' if decay else 'no_decay'}"
        group = buckets.setdefault(key, {"name": key, "params": [], "param_names": [],
                                         "lr": lr_of_role[role], "clip_scope": cfg.clip_scope,
                                         "weight_decay": cfg.weight_decay if decay else 0.0})
        group["params"].append(p)
        group["param_names"].append(name)
    order = [f"{r}/{d}" for r in ROLES for d in ("decay", "no_decay")]
    return [buckets[k] for k in order if k in buckets]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """Freeze the frozen parameters and build the optimizer over the named groups."""
    if cfg.name not in OPTIMIZERS:
        raise ValueError(f"--optimizer {cfg.name!r} is unknown; choose one of {OPTIMIZERS}")
    freeze_parameters(model, cfg.freeze_layer_num, cfg.freeze_agnostic, cfg.freeze_clip, cfg.train_ast)
    groups = parameter_groups(model, cfg)
    if not groups:
        raise ValueError("the model has no trainable parameters" +
                         (" (--freeze_agnostic on a model without text terms)" if cfg.freeze_agnostic else ""))
    if cfg.name == "bertadam":
        return BertAdam(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                        max_grad_norm=cfg.max_grad_norm)
    return GroupClippedAdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                             max_grad_norm=cfg.max_grad_norm)


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int,
                    warmup_proportion: float) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR applying ``WarmupCosine`` to every group's base lr; step it after each update."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(total_steps, warmup_proportion))
