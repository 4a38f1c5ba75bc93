"""exact_fp32 in both directions: the backward of the similarity (matrix products and the
log-sum-exp) runs with IEEE fp32 matmuls and fp32 operands even when TF32 is on for the rest
of the step and the forward ran under bf16 autocast, and its gradients equal those of the plain
fp32 computation.

TF32 is a process-wide flag that the CPU ignores, so the test records the flag each matrix
product of the backward saw (a TorchDispatchMode); the control shows that the forward-only
context leaves the backward under TF32.
"""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from modules.modeling import AVIGATE, AVIGATEConfig
from modules.similarity import exact_fp32, exact_fp32_call, index_scores, video_index

MATMULS = {"mm", "bmm", "addmm", "baddbmm", "matmul", "dot"}
NT, NV, F, D = 3, 4, 5, 8


class MatmulFlags(TorchDispatchMode):
    """Records (op, TF32 flag, operand dtypes) of every matrix product dispatched."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in MATMULS:
            dtypes = {a.dtype for a in args if isinstance(a, torch.Tensor)}
            self.seen.append((name, torch.backends.cuda.matmul.fp32_precision, dtypes))
        return func(*args, **(kwargs or {}))


@pytest.fixture
def tf32_on():
    matmul = torch.backends.cuda.matmul
    previous = matmul.fp32_precision
    matmul.fp32_precision = "tf32"  # what --tf32 sets for the encoders
    yield
    matmul.fp32_precision = previous


def _inputs():
    g = torch.Generator().manual_seed(0)
    text = torch.randn(NT, D, generator=g, requires_grad=True)
    frames = torch.randn(NV, F, D, generator=g, requires_grad=True)
    mask = torch.ones(NV, F, dtype=torch.bool)
    mask[1, 3:] = False
    scale = torch.tensor(4.0, requires_grad=True)
    return text, frames, mask, scale


def _score_matrix(text, frames, mask, scale):
    return index_scores(text, video_index(frames, mask), mask, scale, 1.0)


def _backward_flags(wrapped: bool) -> list:
    text, frames, mask, scale = _inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the step's autocast around the forward
        if wrapped:
            scores = exact_fp32_call(lambda t, f, s: _score_matrix(t, f, mask, s), text, frames, scale)
        else:
            with exact_fp32(text.device):
                scores = _score_matrix(text, frames, mask, scale)
    with MatmulFlags() as mode:
        scores.square().sum().backward()
    return mode.seen


def test_backward_of_the_similarity_is_ieee_fp32(tf32_on):
    seen = _backward_flags(wrapped=True)
    assert seen, "the backward ran no matrix product: nothing was checked"
    assert {flag for _, flag, _ in seen} == {"ieee"}, seen
    assert set().union(*(dtypes for _, _, dtypes in seen)) == {torch.float32}, seen
    assert torch.backends.cuda.matmul.fp32_precision == "tf32"  # restored for the rest of the step
    # The control: a forward-only context leaves the backward under the step's TF32.
    assert {flag for _, flag, _ in _backward_flags(wrapped=False)} == {"tf32"}


def test_gradients_equal_the_plain_fp32_computation():
    text, frames, mask, scale = _inputs()
    plain = torch.autograd.grad(_score_matrix(text, frames, mask, scale).square().sum(), (text, frames, scale))
    wrapped = exact_fp32_call(lambda t, f, s: _score_matrix(t, f, mask, s), text, frames, scale)
    got = torch.autograd.grad(wrapped.square().sum(), (text, frames, scale))
    for a, b in zip(got, plain):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("guided", [False, True], ids=["agnostic", "text_guided"])
def test_model_scores_backward_is_ieee_fp32(guided, tf32_on):
    """Both of the model's differentiable scorers (index and pair scores) use it."""
    torch.manual_seed(0)
    flags = {"text_gate": True, "text_query": True, "text_init": "normal"} if guided else {}
    model = AVIGATE(AVIGATEConfig.tiny(**flags))
    frames_n, width = model.cfg.fusion.max_frames, model.cfg.fusion.width
    text, frames = torch.randn(NT, width, requires_grad=True), torch.randn(NV, frames_n, width, requires_grad=True)
    mask = torch.ones(NV, frames_n, dtype=torch.bool)
    if guided:
        ctx = model.pair_context(text, frames, mask, torch.randn(NV, 2, model.cfg.fusion.width))
        fused = frames[torch.tensor([0, 1, 2])].detach().requires_grad_()
        scores = model._pair_similarity(ctx, torch.tensor([0, 1, 2]), torch.tensor([0, 1, 2]), fused)
    else:
        scores = model.similarity(text, video_index(frames, mask), mask)
    with MatmulFlags() as mode:
        scores.sum().backward()
    assert mode.seen and {flag for _, flag, _ in mode.seen} == {"ieee"}, mode.seen
    assert model.logit_scale.grad is not None and model.logit_scale.grad.abs() > 0
