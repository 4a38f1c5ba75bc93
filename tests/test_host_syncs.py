"""A training step waits for the device only where it must (issue 10, deliverable 5).

On a GPU every operation that needs a device value on the host (``.item()``, ``bool(t)``,
a boolean-mask gather, ``nonzero``, ``repeat_interleave`` without ``output_size``, ...) stalls
the CPU until the queue drains. The CPU has no queue to drain, so these tests count the
operations that WOULD synchronize, with a CPU stand-in: a TorchDispatchMode sees every aten
call made in the step, forward and backward (including those inside library code), and a
TorchFunctionMode sees the Python-level conversions that never reach the dispatcher
(``tolist``, ``numpy``, ``cpu``). The real-device check is ``torch.cuda.set_sync_debug_mode``
in tools/gpu_check.py.

Documented unavoidable synchronizations of a step (objective forward + backward + optimizer
step + logit-scale clamp), per micro-batch: one under ``--padding_rule masked`` (the default):
``AVIGATE.frame_embeddings`` finds the real frames (``nonzero``), whose count sizes CLIP's
batch; none under ``--padding_rule released`` (CLIP sees every slot). fp16's GradScaler adds
one more (its inf check), CUDA only.

Not visible to the stand-in: ``.to(device)`` copies (on the CPU the training device is the
host) and the DistributedDataParallel reducer (NCCL, asynchronous).
"""
from __future__ import annotations

import collections
import traceback

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import training
import util
from modules import loss as loss_module
from modules.modeling import AVIGATE, AVIGATEConfig
from modules.objective import ContrastiveObjective, ObjectiveConfig
from modules.optimization import OptimConfig, build_optimizer, build_scheduler
from tests.test_learning import pair_batch

aten = torch.ops.aten
# aten calls that wait for a device value: scalar reads (item / bool / int / float / index),
# data-dependent output sizes, and value comparisons returning a Python bool.
SYNCING_OPS = {aten._local_scalar_dense, aten.nonzero, aten.masked_select, aten._unique2, aten.unique_dim,
               aten.unique_consecutive, aten.equal, aten.is_nonzero, aten.bincount, aten.histc}
# Indexing ops whose boolean-mask indices are turned into positions (nonzero) first.
INDEXING_OPS = {aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_}
# Python-level conversions to host values that do not reach the dispatcher on the CPU.
HOST_CONVERSIONS = {torch.Tensor.tolist: "tolist", torch.Tensor.numpy: "numpy", torch.Tensor.cpu: "cpu"}
STEP_SYNCS_MASKED = 1
STEP_SYNCS_RELEASED = 0
BATCH = 4


def _has_bool_index(indices) -> bool:
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices if i is not None)


class _DispatchCounter(TorchDispatchMode):
    def __init__(self, record):
        super().__init__()
        self.record = record

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func.overloadpacket
        if packet in SYNCING_OPS:
            self.record(str(packet))
        elif packet in INDEXING_OPS and _has_bool_index(args[1]):
            self.record(f"{packet} with a boolean mask")
        elif packet is aten.repeat_interleave and isinstance(args[1] if len(args) > 1 else args[0], torch.Tensor) \
                and kwargs.get("output_size") is None and (len(args) < 4 or args[3] is None):
            self.record(f"{packet} without output_size")
        return func(*args, **kwargs)


class _FunctionCounter(TorchFunctionMode):
    def __init__(self, record):
        super().__init__()
        self.record = record

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in HOST_CONVERSIONS:
            self.record(HOST_CONVERSIONS[func])
        return func(*args, **(kwargs or {}))


class HostSyncCounter:
    """Context manager counting would-be host synchronizations; ``counts`` name -> n, ``where``
    name -> the first call site (a stack excerpt), for the failure message."""

    def __init__(self):
        self.counts: collections.Counter = collections.Counter()
        self.where: dict[str, str] = {}

    def _record(self, name: str) -> None:
        self.counts[name] += 1
        if name not in self.where:
            frames = [f for f in traceback.extract_stack()[:-3] if "/site-packages/" not in f.filename]
            self.where[name] = "".join(traceback.format_list(frames[-4:]))

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def report(self) -> str:
        return "\n".join(f"{name} x{n}, first at:\n{self.where[name]}" for name, n in self.counts.items())

    def __enter__(self):
        self._modes = [_DispatchCounter(self._record), _FunctionCounter(self._record)]
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc):
        for mode in reversed(self._modes):
            mode.__exit__(*exc)
        return False


def test_counter_sees_every_kind_of_sync():
    """The instrument itself: each known synchronizing call is counted once, plain math is not."""
    x = torch.arange(6.0, requires_grad=True)
    v = x.detach()
    mask = x > 2
    reps = torch.tensor([1, 2, 0, 1, 1, 1])
    cases = {"item": lambda: v[0].item(), "bool": lambda: bool(v[1]),
             "int": lambda: int(v[1]), "float": lambda: float(v[1]), "index": lambda: [0, 1][v[1].long()],
             "tolist": lambda: v.tolist(), "numpy": lambda: v.numpy(), "cpu": lambda: x.cpu(),
             "nonzero": lambda: mask.nonzero(), "mask gather": lambda: x[mask],
             "mask scatter": lambda: x.detach().clone().index_put_((mask,), torch.tensor(0.0)),
             "masked_select": lambda: x.masked_select(mask), "unique": lambda: torch.unique(reps),
             "repeat_interleave": lambda: torch.repeat_interleave(x, reps),
             "equal": lambda: torch.equal(x, x)}
    for name, call in cases.items():
        with HostSyncCounter() as counter:
            call()
        assert counter.total == 1, f"{name}: counted {dict(counter.counts)}"
    with HostSyncCounter() as counter:
        y = (x * 2).softmax(0) @ x + torch.repeat_interleave(x, reps, output_size=6).sum()
        y.backward()
        torch.where(mask, x, 0.0).topk(2)
        torch._assert_async(x.detach().sum() > 0)  # a device-side assert waits for nothing
    assert counter.total == 0, counter.report()


def _trainer(model: AVIGATE, precision: str, **objective_fields) -> training.Trainer:
    objective = ContrastiveObjective(model, ObjectiveConfig(**objective_fields))
    optimizer = build_optimizer(model, OptimConfig())
    return training.Trainer(objective, optimizer, build_scheduler(optimizer, 10, 0.1),
                            torch.amp.GradScaler("cpu", enabled=False), util.DistInfo(), precision)


def _batch(model: AVIGATE, seed: int, fbank: bool = False) -> dict:
    return pair_batch(model, BATCH, seed, fbank=fbank)  # as the loader gives it; video 1 has padded frames


STEP_CASES = {
    "agnostic": ({}, {}),
    "text_guided_all_chunked": (dict(text_gate=True, text_query=True, query_gate=True), dict(pairs_per_chunk=6)),
    "text_guided_all_at_once": (dict(text_gate=True), {}),
    "text_guided_hardest_k": (dict(text_gate=True, text_query=True), dict(training_pairs="hardest_k", hardest_k=1,
                                                                          pairs_per_chunk=3)),
    "own_caption": (dict(text_query=True), dict(training_pairs="own_caption")),
}


# (case, precision, padding rule): every case once, both padding rules and both precisions.
STEP_RUNS = [("agnostic", "fp32", "masked"), ("agnostic", "bf16", "released"),
             ("text_guided_all_chunked", "fp32", "masked"), ("text_guided_all_chunked", "bf16", "masked"),
             ("text_guided_all_chunked", "fp32", "released"), ("text_guided_all_at_once", "bf16", "released"),
             ("text_guided_hardest_k", "fp32", "masked"), ("own_caption", "bf16", "masked")]


@pytest.mark.parametrize("case,precision,padding_rule", STEP_RUNS)
def test_training_step_syncs_only_where_documented(case, precision, padding_rule):
    flags, objective_fields = STEP_CASES[case]
    model = AVIGATE(AVIGATEConfig.tiny(padding_rule=padding_rule, **flags))
    trainer = _trainer(model, precision, **objective_fields)
    training.train_step(trainer, [_batch(model, 0)])  # optimizer state exists from here on
    micro_batches = [_batch(model, 1), _batch(model, 2)]
    trainer.accumulation = len(micro_batches)
    with HostSyncCounter() as counter:
        result = training.train_step(trainer, micro_batches)
    per_micro_batch = STEP_SYNCS_MASKED if padding_rule == "masked" else STEP_SYNCS_RELEASED
    assert counter.total == per_micro_batch * len(micro_batches), counter.report()
    if padding_rule == "masked":
        assert set(counter.counts) == {"aten.nonzero"}
    assert torch.isfinite(result["loss"])  # read after the step, as logging does


def test_ast_trunk_on_fbank_adds_no_sync():
    model = AVIGATE(AVIGATEConfig.tiny(text_gate=True))
    trainer = _trainer(model, "fp32", pairs_per_chunk=8)
    training.train_step(trainer, [_batch(model, 0, fbank=True)])
    with HostSyncCounter() as counter:
        training.train_step(trainer, [_batch(model, 1, fbank=True)])
    assert counter.total == STEP_SYNCS_MASKED, counter.report()


class _FakeCollectives:
    """Stands in for NCCL at world size 2 in one process: the 'other rank' holds a copy of this
    rank's tensor. Records whether every input and output buffer was contiguous."""

    def __init__(self):
        self.calls: list[tuple[str, bool, bool]] = []

    def gather(self, out: torch.Tensor, x: torch.Tensor, *args, **kwargs):
        self.calls.append(("all_gather", x.is_contiguous(), out.is_contiguous()))
        out.copy_(torch.cat([x, x]))

    def reduce_scatter(self, out: torch.Tensor, grad: torch.Tensor, *args, **kwargs):
        self.calls.append(("reduce_scatter", grad.is_contiguous(), out.is_contiguous()))
        half = grad.shape[0] // 2
        out.copy_(grad[:half] + grad[half:])


# hardest_k gathers the same tensors as "all"; it is left out because the fake's second rank
# (a copy of the first) would put every other rank's positive where this rank's is.
@pytest.mark.parametrize("case", ["agnostic", "text_guided_all_chunked", "own_caption"])
def test_every_collective_gets_contiguous_buffers(case, monkeypatch):
    """Every all-gather and reduce-scatter of the objective (forward and backward) receives
    contiguous input and output buffers, as NCCL requires; ``transpose``-like views made by
    the model never reach a collective."""
    fake = _FakeCollectives()
    monkeypatch.setattr(loss_module, "_distributed_world_size", lambda: 2)
    monkeypatch.setattr(loss_module, "_gather_into", fake.gather)
    monkeypatch.setattr(loss_module, "_reduce_scatter_into", fake.reduce_scatter)
    flags, objective_fields = STEP_CASES[case]
    model = AVIGATE(AVIGATEConfig.tiny(**flags))
    objective = ContrastiveObjective(model, ObjectiveConfig(**objective_fields))
    batch = _batch(model, 0)
    out = objective(**training.model_inputs(batch, torch.device("cpu")))
    out.loss.backward()
    kinds = {name for name, _, _ in fake.calls}
    assert kinds == {"all_gather", "reduce_scatter"}, fake.calls
    assert out.logits.shape == (2 * BATCH, 2 * BATCH)
    bad = [(name, x_ok, out_ok) for name, x_ok, out_ok in fake.calls if not (x_ok and out_ok)]
    assert not bad, f"non-contiguous collective buffers: {bad}"


def test_gather_makes_strided_inputs_contiguous(monkeypatch):
    """The wrapper itself: a transposed (non-contiguous) tensor reaches NCCL as a contiguous copy."""
    fake = _FakeCollectives()
    monkeypatch.setattr(loss_module, "_distributed_world_size", lambda: 2)
    monkeypatch.setattr(loss_module, "_gather_into", fake.gather)
    monkeypatch.setattr(loss_module, "_reduce_scatter_into", fake.reduce_scatter)
    x = torch.randn(3, 4, requires_grad=True)
    gathered = loss_module.all_gather_with_grad(x.t())
    (gathered * torch.arange(gathered.numel()).view_as(gathered)).sum().backward()
    assert fake.calls == [("all_gather", True, True), ("reduce_scatter", True, True)]
    assert torch.equal(gathered, torch.cat([x.t(), x.t()]))
