"""The CPU flash-attention backend against the float64 paged reference.

Same cases as the portable backend's tests (ragged lengths 1, 17, 113, 1023; chunked prefill with
earlier chunks in the cache; ragged decode batches; decode, prefill and chunk mixed in one call;
GQA ratios 1, 4, 8), with blocks at shuffled ids (the gathered path) and at consecutive ids (the
in-place path), and junk in every unused slot.
"""

from __future__ import annotations

import pytest
import torch

from runtime.attention.base import AttentionMetadata
from runtime.attention.cpu_flash import CpuFlashBackend
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


@pytest.mark.parametrize("layout", ["shuffled", "consecutive"])
@pytest.mark.parametrize("block_size,hq,hkv", LAYOUTS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_flash_cpu_matches_reference_fp32(case, block_size, hq, hkv, layout):
    build = make_case if layout == "shuffled" else consecutive_case
    q, kc, vc, meta = build(*case, hq, hkv, 32, block_size, seed=11)
    backend = CpuFlashBackend()
    if layout == "consecutive":
        assert all(f is not None for f in backend._first_blocks(meta, block_size))
    elif max(meta.seq_lens_cpu) > 2 * block_size:
        assert any(f is None for f in backend._first_blocks(meta, block_size))
    out, lse = backend.forward(q, kc, vc, meta, 32**-0.5)
    ref_out, ref_lse = reference_attention(q, kc, vc, meta, 32**-0.5)
    assert out.dtype == torch.float32 and out.shape == q.shape
    assert lse.dtype == torch.float32 and lse.shape == q.shape[:2]
    assert max_err(out, ref_out) < 1e-5
    assert max_err(lse, ref_lse) < 1e-5


def test_flash_cpu_mixed_runs_in_one_batch():
    # one sequence read in place, one gathered, in the same call; the plan is made once per step
    q, kc, vc, meta = make_case([113, 1], [1023, 600], 8, 2, 32, 16, seed=12)
    tables = [list(range(64)), meta.block_tables[1, :38].tolist()]
    kc2 = torch.cat([kc, torch.randn(64, *kc.shape[1:])])
    vc2 = torch.cat([vc, torch.randn(64, *vc.shape[1:])])
    tables[1] = [b + 64 for b in tables[1]]
    meta = AttentionMetadata.build([113, 1], [1023, 600], tables, 16)
    backend = CpuFlashBackend()
    assert backend._first_blocks(meta, 16) == [0, None]
    out, lse = backend.forward(q, kc2, vc2, meta, 0.2)
    ref_out, ref_lse = reference_attention(q, kc2, vc2, meta, 0.2)
    assert max_err(out, ref_out) < 1e-5 and max_err(lse, ref_lse) < 1e-5
    # a new step (new metadata) with other tables is planned afresh, not served from the cache
    meta2 = AttentionMetadata.build([1, 1], [1023, 600], [tables[1] + [0] * 26, tables[0]], 16)
    assert backend._first_blocks(meta2, 16) == [None, 0]


@pytest.mark.slow  # bf16 on CPUs is slow
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
