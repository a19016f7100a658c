"""``expert_gemv`` (each pair's product read from its expert where it lies) against a gather and
a matrix product, under Triton's interpreter on the CPU and compiled on a GPU where there is one;
and the mixture of experts' sync-free routing through it against the loop, in float64."""

from __future__ import annotations

import pytest
import torch

from tests.interpreter import DEVICE, guard, rerun

# isort: split

from runtime.layers.expert_gemv import BLOCK_K, BLOCK_N, expert_gemv
from tests.test_moe_routing import _moe


@pytest.fixture(autouse=True)
def _fresh_process_guard(request):
    guard(request)


def test_in_fresh_interpreter_process():
    """Rerun this file in a new process with the interpreter on from the start."""
    rerun(__file__)


# (experts, N, K, pairs): ragged N and K (partial output tiles, a partial last reduction step),
# several pairs on one expert, one pair
SHAPES = [(4, 96, 160, 5), (3, BLOCK_N, BLOCK_K, 1), (8, 130, 40, 7), (2, 17, 2 * BLOCK_K + 3, 4)]


@pytest.mark.parametrize("experts, n, k, pairs", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_matches_gather_and_matmul(experts, n, k, pairs, dtype):
    g = torch.Generator().manual_seed(experts * 100 + pairs)
    w = torch.randn(experts, n, k, generator=g).to(device=DEVICE, dtype=dtype)
    x = torch.randn(3, k, generator=g).to(device=DEVICE, dtype=dtype)
    ids = torch.randint(0, experts, (pairs,), generator=g).to(DEVICE)
    rows = torch.randint(0, 3, (pairs,), generator=g).to(DEVICE)
    got = expert_gemv(x, w, ids, rows)
    want = torch.einsum("pnk,pk->pn", w[ids].double(), x[rows].double())
    assert got.dtype == dtype and got.shape == (pairs, n)
    # float32 accumulation rounded once to the dtype (float64 inputs accumulate in float64)
    tol = {torch.float64: 1e-12, torch.float32: 1e-4, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * k**0.5)


def test_no_pairs_and_bad_shapes():
    w = torch.randn(2, 8, 16, device=DEVICE)
    x = torch.randn(1, 16, device=DEVICE)
    none = torch.zeros(0, dtype=torch.long, device=DEVICE)
    assert expert_gemv(x, w, none, none).shape == (0, 8)
    one = torch.zeros(1, dtype=torch.long, device=DEVICE)
    with pytest.raises(ValueError, match="expert_gemv"):
        expert_gemv(torch.randn(1, 15, device=DEVICE), w, one, one)


# (experts, top_k, tokens) with fewer pairs than experts: the form that reads picked experts
@pytest.mark.parametrize("experts, top_k, tokens", [(8, 2, 1), (8, 2, 3), (6, 3, 1)])
def test_routing_through_the_kernel_equals_the_loop(experts, top_k, tokens):
    moe = _moe(experts, top_k).to(DEVICE)
    g = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, 32, generator=g, dtype=torch.float64).to(DEVICE)
    looped = moe(x.cpu().double()) if DEVICE.type == "cpu" else None
    probs = torch.softmax(torch.nn.functional.linear(x, moe.gate).float(), dim=-1)
    weights, picked = torch.topk(probs, top_k, dim=-1)
    weights /= weights.sum(dim=-1, keepdim=True)
    routed = moe.route_on_device(x, weights, picked, gemv=True)
    gathered = moe.route_on_device(x, weights, picked, gemv=False)
    torch.testing.assert_close(routed, gathered, rtol=1e-12, atol=1e-12)
    if looped is not None:
        torch.testing.assert_close(routed, looped, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("env, want", [(None, True), ("1", True), ("0", False)])
def test_on_by_default_where_the_triton_kernels_run(monkeypatch, env, want):
    """Measured faster than the gathered form (scripts/bench_moe_decode.py), so it is the
    picked-expert path wherever the Triton kernels run; TILERUN_EXPERT_GEMV=0 turns it off,
    and where they do not run (the CPU) it stays off whatever the variable says."""
    from runtime.layers import expert_gemv as mod
    from runtime.layers import fused_ops

    if env is None:
        monkeypatch.delenv("TILERUN_EXPERT_GEMV", raising=False)
    else:
        monkeypatch.setenv("TILERUN_EXPERT_GEMV", env)
    x = torch.zeros(1, 4)
    monkeypatch.setattr(fused_ops, "fused_enabled", lambda t: True)
    assert mod.expert_gemv_enabled(x) is want
    monkeypatch.setattr(fused_ops, "fused_enabled", lambda t: False)
    assert mod.expert_gemv_enabled(x) is False
