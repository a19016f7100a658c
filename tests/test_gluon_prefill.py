"""The Gluon FA3-style prefill prototype against the float64 paged reference (Hopper GPUs only).

Same rule as ``tests/test_attention_triton.py``: at most twice the error of plain torch attention
in the same precision, plus a small atol. Block tables in aligned runs of 8 consecutive blocks
(the prototype's precondition: 128-key boxes of consecutive pages).
"""

from __future__ import annotations

import pytest
import torch

from runtime.attention import triton_backend

HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)
hopper = pytest.mark.skipif(not HOPPER, reason="Gluon's wgmma/TMA kernel needs an sm_90 GPU")

if HOPPER:
    from runtime.attention.gluon_prefill_hopper import prefill_attention_gluon
    from tests.test_attention_triton import HQ, _check, _paged

MIXES = [[1], [17], [64], [65], [113], [128], [129], [1023], [2500], [1, 17, 113, 1023, 2500]]
CHUNKED = [(17, 100), (64, 1023), (1, 50), (113, 113), (300, 3000), (200, 328)]


def _run(
    query_lens, seq_lens, hkv, dtype=torch.bfloat16, block_size=16, seed=0, layout="runs", **kw
):
    meta, k_cache, v_cache = _paged(
        query_lens, seq_lens, hkv, 128, dtype, block_size, seed, layout=layout
    )
    g = torch.Generator(device="cuda").manual_seed(seed + 1)
    q = torch.randn(sum(query_lens), HQ, 128, generator=g, device="cuda").to(dtype)
    scale = 128**-0.5
    out, lse = prefill_attention_gluon(
        q, k_cache, v_cache, meta.query_start_loc, meta.seq_lens, meta.block_tables,
        max(query_lens), scale, **kw,
    )  # fmt: skip
    torch.cuda.synchronize()
    _check(out, lse, q, k_cache, v_cache, meta, scale)


@hopper
@pytest.mark.parametrize("lens", MIXES, ids=lambda x: "-".join(map(str, x)))
@pytest.mark.parametrize("group", [1, 4, 8])
def test_prefill_ragged(lens, group):
    _run(lens, lens, HQ // group)


@hopper
@pytest.mark.parametrize("group", [1, 4])
def test_chunked_prefill(group):
    """Queries after keys already in the cache (ctx > 0), several sequences in one launch."""
    _run([q for q, _ in CHUNKED], [s for _, s in CHUNKED], HQ // group, seed=3)


@hopper
@pytest.mark.parametrize("block_size", [16, 32, 128, 256])
def test_page_sizes(block_size):
    _run([17, 130, 1023], [17, 130, 1023], HQ // 4, torch.float16, block_size=block_size)


@hopper
@pytest.mark.parametrize("stages", [2, 3])
@pytest.mark.parametrize("pingpong", [True, False])
def test_pingpong_on_off(pingpong, stages):
    """Both schedules of the two warp groups give the reference's results (and both end: a turn
    left unanswered would hang here)."""
    _run(
        [1, 64, 65, 200, 1023],
        [1, 64, 65, 328, 1023],
        HQ // 4,
        seed=5,
        pingpong=pingpong,
        stages=stages,
    )


@hopper
@pytest.mark.parametrize("block_size", [16, 128])
def test_stale_rows_stay_out(block_size):
    """NaN in cache rows past each sequence's end (inside the last 128-key box, and in blocks no
    sequence holds) stays out: the producer zeroes those V rows before the last P V."""
    lens = [17, 113, 40, 300]
    meta, k_cache, v_cache = _paged(lens, lens, HQ // 4, 128, torch.bfloat16, block_size, 7,
                                    layout="runs")  # fmt: skip
    for b, slen in enumerate(lens):
        last = meta.block_tables[b, (slen - 1) // block_size]
        k_cache[last, slen % block_size or block_size :] = float("nan")
        v_cache[last, slen % block_size or block_size :] = float("nan")
    held = set(meta.block_tables.flatten().tolist())
    spare = [i for i in range(k_cache.shape[0]) if i not in held]
    k_cache[spare] = float("nan")
    v_cache[spare] = float("nan")
    q = torch.randn(sum(lens), HQ, 128, device="cuda").to(torch.bfloat16)
    out, lse = prefill_attention_gluon(
        q, k_cache, v_cache, meta.query_start_loc, meta.seq_lens, meta.block_tables,
        max(lens), 128**-0.5,
    )  # fmt: skip
    _check(out, lse, q, k_cache, v_cache, meta, 128**-0.5)


@hopper
@pytest.mark.parametrize("layout", ["shuffled", "mixed"])
def test_scattered_pages_take_the_gather_kernel(layout):
    """Sequences whose 128-key boxes are not consecutive pages go to the gather kernel (checked
    on the device), in the same launch pair as those the Gluon kernel takes."""
    _run([17, 130, 1023, 300], [17, 130, 1023, 300], HQ // 4, seed=9, layout=layout)


# ---------------------------------------------------------------- choosing it (any machine)


def test_path_from_the_environment(monkeypatch):
    """``TILERUN_PREFILL_PATH`` picks the prefill kernel where the code asks for "auto"; a path
    the code names wins; a wrong value is one line naming the variable and the valid ones."""
    monkeypatch.setenv("TILERUN_PREFILL_PATH", "gluon")
    assert triton_backend.TritonBackend().prefill_path == "gluon"
    assert triton_backend.TritonBackend(prefill_path="ampere").prefill_path == "ampere"
    monkeypatch.setenv("TILERUN_PREFILL_PATH", "fa3")
    with pytest.raises(ValueError, match=r"TILERUN_PREFILL_PATH='fa3'; valid: auto, hopper"):
        triton_backend.TritonBackend()
    monkeypatch.delenv("TILERUN_PREFILL_PATH")
    assert triton_backend.TritonBackend().prefill_path == "auto"


def test_forced_where_it_cannot_run_says_why(monkeypatch):
    """Asked for on a machine or tensors it does not handle, prefill raises naming why; "auto"
    never picks it there."""
    from runtime.attention.base import AttentionMetadata

    monkeypatch.delenv("TILERUN_PREFILL_PATH", raising=False)
    q = torch.zeros(4, 2, 128, dtype=torch.bfloat16)
    cache = torch.zeros(2, 16, 1, 128, dtype=torch.bfloat16)
    meta = AttentionMetadata.build([4], [4], [[0]], 16, device="cpu")
    backend = triton_backend.TritonBackend(prefill_path="gluon")
    with pytest.raises(ValueError, match="Gluon prefill kernel: it runs on CUDA devices"):
        backend.prefill(q, cache, cache, meta, 128**-0.5)
    monkeypatch.setattr(triton_backend, "GLUON_BY_DEFAULT", True)
    assert not triton_backend.TritonBackend().use_gluon(q, cache, cache)


@hopper
def test_auto_takes_it_where_it_applies(monkeypatch):
    """On sm_90, ``auto`` runs the Gluon kernel for bf16/fp16 at head dim 128 (the default since
    it measured faster end to end) and the TMA or gather kernel elsewhere; same float64 rule."""
    monkeypatch.delenv("TILERUN_PREFILL_PATH", raising=False)
    backend = triton_backend.TritonBackend()
    for d, dtype, want in [(128, torch.bfloat16, True), (128, torch.float16, True),
                           (64, torch.bfloat16, False), (128, torch.float32, False)]:  # fmt: skip
        meta, k_cache, v_cache = _paged([130], [130], HQ // 4, d, dtype, 16, 0, layout="runs")
        q = torch.randn(130, HQ, d, device="cuda").to(dtype)
        assert backend.use_gluon(q, k_cache, v_cache) is want
        out, lse = backend.prefill(q, k_cache, v_cache, meta, d**-0.5)
        torch.cuda.synchronize()
        _check(out, lse, q, k_cache, v_cache, meta, d**-0.5)
