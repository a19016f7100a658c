"""The Triton lightning-attention prefill kernel against the float64 definition.

Without a GPU the kernel runs in Triton's interpreter (``TRITON_INTERPRET=1``) at tiny shapes;
on a GPU the same tests run at real shapes."""

from __future__ import annotations

import pytest
import torch

from tests.interpreter import DEVICE, ON_GPU, guard, rerun

# isort: split

from runtime.attention.lightning import lightning_decode, lightning_forward
from runtime.attention.lightning_reference import reference_lightning
from runtime.attention.triton_lightning import (
    lightning_decode_triton,
    lightning_prefill_triton,
)

if ON_GPU:
    H, DIMS, MIXES = 8, [(128, 128), (64, 64)], [[1], [63], [4096 + 17], [1, 500, 64, 2000]]
else:
    H, DIMS, MIXES = 2, [(16, 16), (16, 32)], [[1], [17], [130], [1, 64, 17, 100]]
# the error allowed, relative to the output's largest magnitude: float32 products are exact
# float32; half products round their operands (the scores and the state too) to the input dtype,
# measured at 0.5-0.7 % for bfloat16 in the interpreter (the float32 torch path: 0.2-0.3 %)
TOL = {torch.float32: 1e-5, torch.bfloat16: 1.5e-2, torch.float16: 2e-3}


@pytest.fixture(autouse=True)
def _fresh_process_guard(request):
    guard(request)


@pytest.mark.slow
def test_in_fresh_interpreter_process():
    """Rerun this file in a new process with the interpreter on from the start."""
    rerun(__file__)


def _case(lens, D, E, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    T = sum(lens)
    q, k = (torch.randn(T, H, D, generator=g) / D**0.25 for _ in range(2))
    v = torch.randn(T, H, E, generator=g)
    states = torch.randn(len(lens), H, D, E, generator=g)
    # rates as MiniMax's heads have them: from fast forgetting to almost none
    slopes = 2.0 ** (-8.0 * torch.arange(1, H + 1) / H)
    return (*(x.to(DEVICE, dtype) for x in (q, k, v)), states.to(DEVICE), slopes.to(DEVICE))


@pytest.mark.parametrize("lens", MIXES)
@pytest.mark.parametrize("dims", DIMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_prefill_kernel_matches_float64_definition(lens, dims, dtype):
    q, k, v, states, slopes = _case(lens, *dims, dtype)
    start_states = states.clone()
    out = lightning_prefill_triton(q, k, v, slopes, lens, states)
    assert out.dtype == dtype and out.shape == v.shape
    a = 0
    for b, n in enumerate(lens):
        ref_out, ref_state = reference_lightning(
            q[a : a + n], k[a : a + n], v[a : a + n], slopes, start_states[b]
        )
        scale = ref_out.abs().max().item()
        assert (out[a : a + n].double() - ref_out).abs().max().item() <= TOL[dtype] * scale
        sscale = ref_state.abs().max().item()
        assert (states[b].double() - ref_state).abs().max().item() <= TOL[dtype] * sscale
        a += n


def test_kernel_equals_torch_path_in_float32():
    lens = MIXES[-1]
    q, k, v, states, slopes = _case(lens, *DIMS[0], torch.float32, seed=5)
    s_torch = states.clone()
    want = lightning_forward(q, k, v, slopes, lens, s_torch)
    got = lightning_prefill_triton(q, k, v, slopes, lens, states)
    assert (got - want).abs().max().item() <= 1e-5 * want.abs().max().item()
    assert (states - s_torch).abs().max().item() <= 1e-5 * s_torch.abs().max().item()


@pytest.mark.parametrize("dims", DIMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_kernel_matches_definition_and_torch(dims, dtype):
    N = 5
    q, k, v, states, slopes = _case([1] * N, *dims, dtype, seed=2)
    s_torch = states.clone()
    start = states.clone()
    got = lightning_decode_triton(q, k, v, slopes, states)
    want = lightning_decode(q, k, v, slopes, s_torch)
    # both do float32 arithmetic on the same inputs: equal to float32 rounding
    assert (got.float() - want.float()).abs().max().item() <= TOL[dtype] * want.abs().max().item()
    assert (states - s_torch).abs().max().item() <= 1e-5 * s_torch.abs().max().item()
    for b in range(N):
        ref_out, ref_state = reference_lightning(
            q[b : b + 1], k[b : b + 1], v[b : b + 1], slopes, start[b]
        )
        assert (got[b : b + 1].double() - ref_out).abs().max() <= TOL[dtype] * ref_out.abs().max()
        assert (states[b].double() - ref_state).abs().max() <= 1e-5 * ref_state.abs().max()


def test_prefill_then_decode_kernels_equal_one_prefill():
    """A prompt through the prefill kernel, then tokens one at a time through the decode kernel:
    the outputs and the state of one prefill of the whole text."""
    n, extra = MIXES[-1][-1], 4
    q, k, v, states, slopes = _case([n + extra], *DIMS[0], torch.float32, seed=9)
    whole_state = states.clone()
    whole = lightning_prefill_triton(q, k, v, slopes, [n + extra], whole_state)
    parts = [lightning_prefill_triton(q[:n], k[:n], v[:n], slopes, [n], states)]
    for t in range(n, n + extra):
        parts.append(
            lightning_decode_triton(q[t : t + 1], k[t : t + 1], v[t : t + 1], slopes, states)
        )
    got = torch.cat(parts)
    assert (got - whole).abs().max().item() <= 1e-5 * whole.abs().max().item()
    assert (states - whole_state).abs().max().item() <= 1e-5 * whole_state.abs().max().item()


def test_bad_shapes_are_one_clear_line():
    q, k, v, states, slopes = _case([5], 16, 16, torch.float32)
    with pytest.raises(ValueError, match="value dim E=24"):
        v24 = v[..., :12].repeat(1, 1, 2)
        lightning_prefill_triton(q, k, v24, slopes, [5], torch.zeros(1, H, 16, 24, device=DEVICE))
    with pytest.raises(ValueError, match="states are float32"):
        lightning_prefill_triton(q, k, v, slopes, [5], states.double())
    with pytest.raises(ValueError, match="contiguous float32"):
        lightning_prefill_triton(q, k, v, slopes, [5], states.transpose(-1, -2))
    with pytest.raises(ValueError, match="2 sequences but 1 states"):
        lightning_prefill_triton(q, k, v, slopes, [2, 3], states)
