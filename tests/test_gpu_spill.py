"""On a CUDA GPU: the copy-stream paths of the two-tier KV cache at bf16 (skipped without one).

The same random mixed placements as ``test_kv_spill``, with pinned host blocks, swaps and staging
on the copy stream, double-buffered per layer, and the CPU part of ``cooperate`` overlapping the
device kernel: stream equals the same backend over an all-device cache bit for bit, cooperate
is within bf16 rounding of the float64 reference, and 8-bit host blocks within their bound.
"""

from __future__ import annotations

import pytest
import torch

from runtime.attention.registry import get_backend
from tests.test_kv_spill import build, run_step

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CASES = {
    "decode": ([1, 1, 1, 1], [4096, 17, 1000, 8191]),
    "chunk": ([512], [8192]),
    "mixed": ([1, 113, 1], [2048, 4096, 300]),
}


@pytest.mark.parametrize("fraction", [0.0, 0.5], ids=["stream", "cooperate"])
@pytest.mark.parametrize("backend_name", ["triton", "torch"])
@pytest.mark.parametrize("case", CASES)
def test_mixed_tables_on_gpu(case, backend_name, fraction):
    qlens, slens = CASES[case]
    kv, content, tables, ref_tables, swaps = build(
        qlens,
        slens,
        bs=16,
        hq=32,
        hkv=8,
        d=128,
        layers=4,
        seed=7,
        p_host=0.7,
        device="cuda",
        dtype=torch.bfloat16,
    )
    backend = get_backend(backend_name, "cuda")
    figs, results = run_step(
        kv,
        content,
        tables,
        ref_tables,
        qlens,
        slens,
        backend,
        hq=32,
        d=128,
        fraction=fraction,
        swaps=tuple(swaps),
    )
    assert figs.host_blocks > 0 and figs.bytes_moved > 0 and figs.exposed_s >= 0
    for out, ref, plain in results:
        assert torch.isfinite(out).all()
        if fraction == 0:
            assert torch.equal(out, plain)
        else:
            # the merge rounds once more than the plain kernel: within twice its bf16 error
            plain_err = (plain.double().cpu() - ref).abs().max().item()
            assert (out.double().cpu() - ref).abs().max().item() <= 2 * plain_err + 2e-3


@pytest.mark.parametrize("staging", [1, 16, 64])
@pytest.mark.parametrize("backend_name", ["triton", "torch"])
@pytest.mark.parametrize("case", CASES)
def test_rounds_on_gpu(case, backend_name, staging):
    """A staging buffer far smaller than the step's host blocks: the rest streams in rounds on
    the copy stream (alternating halves of the buffer), non-causal partials merged by lse, no
    CPU; within twice the plain kernel's bf16 error of the float64 reference."""
    qlens, slens = CASES[case]
    kv, content, tables, ref_tables, swaps = build(
        qlens, slens, bs=16, hq=32, hkv=8, d=128, layers=4, seed=11, p_host=0.9,
        device="cuda", dtype=torch.bfloat16, staging=staging,
    )  # fmt: skip
    backend = get_backend(backend_name, "cuda")
    figs, results = run_step(
        kv, content, tables, ref_tables, qlens, slens, backend, hq=32, d=128, fraction=0.0,
        swaps=tuple(swaps),
    )  # fmt: skip
    assert figs.host_blocks > staging and figs.cpu_blocks == 0 and figs.mode == "stream"
    for out, ref, plain in results:
        assert torch.isfinite(out).all()
        plain_err = (plain.double().cpu() - ref).abs().max().item()
        assert (out.double().cpu() - ref).abs().max().item() <= 2 * plain_err + 2e-3


@pytest.mark.parametrize("kind", ["fp8", "int8"])
def test_8bit_host_blocks_on_gpu(kind):
    qlens, slens = CASES["mixed"]
    kv, content, tables, ref_tables, swaps = build(
        qlens,
        slens,
        bs=16,
        hq=32,
        hkv=8,
        d=128,
        layers=2,
        seed=8,
        p_host=1.0,
        device="cuda",
        dtype=torch.bfloat16,
        host_dtype=kind,
    )
    figs, results = run_step(
        kv,
        content,
        tables,
        ref_tables,
        qlens,
        slens,
        get_backend("triton", "cuda"),
        hq=32,
        d=128,
        fraction=0.0,
        swaps=tuple(swaps),
    )
    for out, ref, _ in results:
        assert (out.double().cpu() - ref).abs().max().item() < (0.1 if kind == "fp8" else 0.03)
