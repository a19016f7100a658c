"""The CPU flash-attention backend against the float64 paged reference.

Same cases as the portable backend's tests (ragged lengths 1, 17, 113, 1023; chunked prefill with
earlier chunks in the cache; ragged decode batches; decode, prefill and chunk mixed in one call;
GQA ratios 1, 4, 8), with blocks at shuffled ids (the gathered path) and at consecutive ids (the
in-place path), and junk in every unused slot.
"""

from __future__ import annotations

import pytest
import torch

from runtime import cpu_module
from runtime.attention.base import AttentionMetadata
from runtime.attention.cpu_flash import CpuFlashBackend
from runtime.attention.fa2_cpu import Fa2CpuBackend
from runtime.attention.merge import merge_attention_states
from runtime.attention.reference import reference_attention
from runtime.attention.registry import UnknownBackendError, get_backend, resolve_backend_name
from tests.test_attention_torch import CASE_IDS, CASES, LAYOUTS, make_case, max_err, naive_attention


def consecutive_case(query_lens, seq_lens, hq, hkv, d, block_size, dtype=torch.float32, seed=0):
    """Like ``make_case`` but each sequence's blocks are a consecutive run of ids (runs in
    shuffled order, junk blocks between them), so the backend reads the cache in place."""
    g = torch.Generator().manual_seed(seed)
    counts = [-(-s // block_size) for s in seq_lens]
    order = torch.randperm(len(counts), generator=g).tolist()
    tables: list[list[int]] = [[] for _ in counts]
    nxt = 3  # junk blocks before, between and after the runs
    for b in order:
        tables[b] = list(range(nxt, nxt + counts[b]))
        nxt += counts[b] + 2
    num_blocks = nxt + 1
    k_cache = torch.randn(num_blocks, block_size, hkv, d, generator=g).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, hkv, d, generator=g).to(dtype)
    q = torch.randn(sum(query_lens), hq, d, generator=g).to(dtype)
    meta = AttentionMetadata.build(query_lens, seq_lens, tables, block_size)
    return q, k_cache, v_cache, meta


# fa2_cpu: our kernel behind the same plumbing (test_attention_fa2_cpu.py tests the kernel alone)
BACKENDS = [
    CpuFlashBackend,
    pytest.param(
        Fa2CpuBackend,
        marks=pytest.mark.skipif(cpu_module.compiler() is None, reason="needs a C++ compiler"),
    ),
]


@pytest.mark.parametrize("backend_cls", BACKENDS, ids=["flash_cpu", "fa2_cpu"])
@pytest.mark.parametrize("layout", ["shuffled", "consecutive"])
@pytest.mark.parametrize("block_size,hq,hkv", LAYOUTS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_flash_cpu_matches_reference_fp32(case, block_size, hq, hkv, layout, backend_cls):
    build = make_case if layout == "shuffled" else consecutive_case
    q, kc, vc, meta = build(*case, hq, hkv, 32, block_size, seed=11)
    backend = backend_cls()
    runs = backend.runs(meta, block_size)
    if layout == "consecutive":
        assert all(r is not None and len(r) == 1 for r in runs)
    elif max(meta.seq_lens_cpu) > 2 * block_size:
        assert any(r is None or len(r) > 1 for r in runs)
    out, lse = backend.forward(q, kc, vc, meta, 32**-0.5)
    ref_out, ref_lse = reference_attention(q, kc, vc, meta, 32**-0.5)
    assert out.dtype == torch.float32 and out.shape == q.shape
    assert lse.dtype == torch.float32 and lse.shape == q.shape[:2]
    assert max_err(out, ref_out) < 1e-5
    assert max_err(lse, ref_lse) < 1e-5


def test_flash_cpu_few_runs_many_runs_and_chunks_across_runs():
    # sequence 0: blocks in three runs, its chunk (positions 900..1022) crosses the last boundary;
    # sequence 1: one run; sequence 2: scattered over more runs than MAX_RUNS (gathered);
    # sequence 3: decode over two runs
    bs = 16
    t0 = list(range(100, 130)) + list(range(10, 30)) + list(range(200, 214))  # 64 blocks
    t1 = list(range(300, 338))  # 38 blocks
    t2 = list(range(400, 464, 2))  # 32 blocks, none consecutive
    t3 = list(range(500, 505)) + list(range(40, 45))  # 10 blocks
    query_lens, seq_lens = [123, 600, 17, 1], [1023, 600, 500, 160]
    width = 64
    tables = [t + [0] * (width - len(t)) for t in (t0, t1, t2, t3)]
    g = torch.Generator().manual_seed(12)
    kc = torch.randn(520, bs, 2, 32, generator=g)
    vc = torch.randn(520, bs, 2, 32, generator=g)
    q = torch.randn(sum(query_lens), 8, 32, generator=g)
    meta = AttentionMetadata.build(query_lens, seq_lens, tables, bs)
    backend = CpuFlashBackend()
    runs = backend.runs(meta, bs)
    assert runs[0] == [(0, 480, 1600), (480, 800, 160), (800, 1023, 3200)]
    assert runs[1] == [(0, 600, 4800)] and runs[2] is None
    assert runs[3] == [(0, 80, 8000), (80, 160, 640)]
    out, lse = backend.forward(q, kc, vc, meta, 0.2)
    ref_out, ref_lse = reference_attention(q, kc, vc, meta, 0.2)
    assert max_err(out, ref_out) < 1e-5 and max_err(lse, ref_lse) < 1e-5
    # the plan is made once per step; a new step (new metadata) is planned afresh
    assert backend.runs(meta, bs) is runs
    meta2 = AttentionMetadata.build([1], [600], [t1], bs)
    assert backend.runs(meta2, bs) == [[(0, 600, 4800)]]


@pytest.mark.parametrize("case", CASE_IDS)
def test_flash_cpu_bf16_within_flash_rule(case):
    q, kc, vc, meta = make_case(*CASES[CASE_IDS.index(case)], 8, 2, 64, 16, torch.bfloat16, 1)
    out, lse = CpuFlashBackend().forward(q, kc, vc, meta, 64**-0.5)
    ref_out, ref_lse = reference_attention(q, kc, vc, meta, 64**-0.5)
    naive = naive_attention(q, kc, vc, meta, 64**-0.5)
    assert out.dtype == torch.bfloat16
    assert max_err(out, ref_out) <= 2 * max_err(naive, ref_out) + 1e-3
    assert max_err(lse, ref_lse) < 1e-3


def test_flash_cpu_large_logits_and_decode_halves_merge():
    q, kc, vc, meta = make_case([113, 1], [1023, 500], 8, 2, 16, 7, seed=2)
    q = q * 30  # scores in the hundreds: only a running max keeps exp finite
    out, lse = CpuFlashBackend().prefill(q, kc, vc, meta, 0.25)
    ref_out, ref_lse = reference_attention(q, kc, vc, meta, 0.25)
    assert torch.isfinite(out).all() and max_err(out, ref_out) < 1e-4
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-6, atol=1e-4)
    # decode over a cache split by blocks (host/device tiers) merges exactly through lse
    seq_lens, bs = [600, 37], 16
    q, kc, vc, meta = make_case([1, 1], seq_lens, 8, 2, 16, bs, seed=10)
    tables = [meta.block_tables[b, : -(-n // bs)].tolist() for b, n in enumerate(seq_lens)]
    head = AttentionMetadata.build([1, 1], [32, 32], [t[:2] for t in tables], bs)
    tail = AttentionMetadata.build([1, 1], [n - 32 for n in seq_lens], [t[2:] for t in tables], bs)
    backend = CpuFlashBackend()
    out, lse = merge_attention_states(
        *backend.decode(q, kc, vc, head, 0.25), *backend.decode(q, kc, vc, tail, 0.25)
    )
    ref_out, ref_lse = reference_attention(q, kc, vc, meta, 0.25)
    assert max_err(out, ref_out) < 1e-5 and max_err(lse, ref_lse) < 1e-5


def test_flash_cpu_registry_and_device_check():
    assert isinstance(get_backend("flash_cpu"), CpuFlashBackend)
    assert CpuFlashBackend.supports(torch.device("cpu")) is None
    reason = CpuFlashBackend.supports(torch.device("cuda"))
    assert reason and "CPU" in reason
    with pytest.raises(UnknownBackendError, match="flash_cpu.*does not run on cuda"):
        resolve_backend_name("flash_cpu", torch.device("cuda"))


def test_flash_cpu_heads_must_group_evenly():
    q, kc, vc, meta = make_case([3], [3], 6, 4, 8, 16)
    with pytest.raises(ValueError, match="multiple"):
        CpuFlashBackend().prefill(q, kc, vc, meta, 1.0)


def test_flash_cpu_plan_is_remade_when_a_reused_metadata_changes():
    # a metadata object reused for the next step (lengths grown, table rewritten) is planned again
    q, kc, vc, meta = consecutive_case([1], [40], 8, 2, 32, 16, seed=13)
    backend = CpuFlashBackend()
    first = backend.runs(meta, 16)
    meta.seq_lens_cpu = (41,)
    meta.block_tables = torch.tensor([[5, 9, 2]], dtype=torch.int32)
    assert backend.runs(meta, 16) != first
    assert backend.runs(meta, 16) == [[(0, 16, 80), (16, 32, 144), (32, 41, 32)]]
