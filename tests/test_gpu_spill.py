"""On a CUDA GPU: the copy-stream paths of the two-tier KV cache at bf16 (skipped without one).

The same random mixed placements as ``test_kv_spill`` (``tests.spill_setup``), with pinned host
blocks, swaps and staging on the copy stream, double-buffered per layer, and the CPU part of
``cooperate`` overlapping the device kernel: stream equals the same backend over an all-device
cache bit for bit (``efficient_cuda``, whose calls follow runs of blocks, and the triton default
on sm_90, whose Gluon prefill kernel takes only consecutive pages, within twice their error; the
TMA kernel, which sums as its gather fallback does, bit for bit again); cooperate (by every CPU
method) and rounds are within twice the plain kernel's bf16 error of the float64 reference;
8-bit host blocks within their bound.
"""

from __future__ import annotations

import pytest
import torch

from runtime.attention import triton_backend
from runtime.attention.registry import get_backend
from tests.spill_setup import build, max_err, run_step, within_twice_plain

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CASES = {
    "decode": ([1, 1, 1, 1], [4096, 17, 1000, 8191]),
    "chunk": ([512], [8192]),
    "mixed": ([1, 113, 1], [2048, 4096, 300]),
}
# the 8B shape's heads (32 query, 8 KV, head dim 128), bf16, on the GPU
SHAPE = dict(bs=16, hq=32, hkv=8, d=128, device="cuda", dtype=torch.bfloat16)


@pytest.mark.parametrize(
    "fraction,method",
    [(0.0, "fused"), (0.5, "fused"), (0.5, "fused-f32"), (0.5, "tiled")],
    ids=["stream", "cooperate", "cooperate-f32", "cooperate-tiled"],
)
@pytest.mark.parametrize("backend_name", ["triton", "triton-tma", "torch", "efficient_cuda"])
@pytest.mark.parametrize("case", CASES)
def test_mixed_tables_on_gpu(case, backend_name, fraction, method):
    qlens, slens = CASES[case]
    spill = build(qlens, slens, layers=4, seed=7, p_host=0.7, **SHAPE)
    if backend_name == "triton-tma":  # the TMA kernel and its gather fallback sum alike
        if torch.cuda.get_device_capability() < (9, 0):
            pytest.skip("the TMA prefill kernel needs compute capability 9.0+")
        backend = get_backend("triton", "cuda", prefill_path="hopper")
    else:
        backend = get_backend(backend_name, "cuda")
    figs, results = run_step(spill, backend, fraction, cpu_method=method)
    assert figs.host_blocks > 0 and figs.bytes_moved > 0 and figs.exposed_s >= 0
    # The all-device placement has each sequence's blocks in order, the staged one scattered.
    # efficient_cuda splits its calls at runs of consecutive blocks, and the Gluon prefill kernel
    # (the triton default on sm_90 at head dim 128) takes consecutive pages while scattered ones
    # go to the gather kernel: the same sums in another order, not the same bits
    gluon = (
        backend_name == "triton"
        and triton_backend.GLUON_BY_DEFAULT
        and torch.cuda.get_device_capability() == (9, 0)
    )
    bitwise = backend_name != "efficient_cuda" and not (gluon and case != "decode")
    for out, _, plain in results:
        assert torch.isfinite(out).all()
        if fraction == 0 and bitwise:
            assert torch.equal(out, plain)
    if fraction > 0 or not bitwise:
        # the merge rounds once more than the plain kernel: within twice its bf16 error
        for err, bound in within_twice_plain(results):
            assert err <= bound


@pytest.mark.parametrize("staging", [1, 16, 64])
@pytest.mark.parametrize("backend_name", ["triton", "torch", "efficient_cuda"])
@pytest.mark.parametrize("case", CASES)
def test_rounds_on_gpu(case, backend_name, staging):
    """A staging buffer far smaller than the step's host blocks: the rest streams in rounds on
    the copy stream (alternating halves of the buffer), non-causal partials merged by lse, no
    CPU; within twice the plain kernel's bf16 error of the float64 reference."""
    qlens, slens = CASES[case]
    spill = build(qlens, slens, layers=4, seed=11, p_host=0.9, staging=staging, **SHAPE)
    figs, results = run_step(spill, get_backend(backend_name, "cuda"), 0.0)
    assert figs.host_blocks > staging and figs.cpu_blocks == 0 and figs.mode == "stream"
    for (err, bound), (out, _, _) in zip(within_twice_plain(results), results):
        assert torch.isfinite(out).all()
        assert err <= bound


@pytest.mark.parametrize("kind", ["fp8", "int8"])
def test_8bit_host_blocks_on_gpu(kind):
    qlens, slens = CASES["mixed"]
    spill = build(qlens, slens, layers=2, seed=8, p_host=1.0, host_dtype=kind, **SHAPE)
    figs, results = run_step(spill, get_backend("triton", "cuda"), 0.0)
    for out, ref, _ in results:
        assert max_err(out, ref) < (0.1 if kind == "fp8" else 0.03)
