"""Triton attention kernels against the float64 paged reference.

Rule (FlashAttention's tests): the kernel's largest error against the float64 reference must be at
most twice the error of plain torch attention computed in the same low precision, plus a small
atol. Ragged lengths (1, 17, 113, 1023, ...) exercise partial tiles; block tables are shuffled.

Without a GPU the real kernels run in Triton's interpreter (``TRITON_INTERPRET=1``) at tiny shapes;
on a GPU the same tests run at real shapes.
"""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from tests.interpreter import DEVICE, ON_GPU, guard, rerun

# isort: split

import triton
import triton.language as tl

from runtime.attention import (
    triton_backend,
    triton_decode,
    triton_decode_hopper,
    triton_prefill,
    triton_prefill_hopper,
)
from runtime.attention.base import AttentionBackend, AttentionMetadata
from runtime.attention.reference import gather_kv, reference_attention

ATOL = {torch.float32: 1e-5, torch.float16: 1e-4, torch.bfloat16: 1e-3}
DTYPES = [torch.bfloat16, torch.float16, torch.float32]

# shapes: tiny in the interpreter, real on a GPU
if ON_GPU:
    HQ, HEAD_DIMS, LONG = 32, [128, 64], 1023
    PREFILL_MIXES = [[1], [17], [113], [1023], [2500], [1, 17, 113, 1023, 2500], [256, 40, 1]]
    CHUNKED = [(17, 100), (64, 1023), (1, 50), (113, 113), (300, 3000)]
    DECODE_LENS = [1, 17, 113, 1023, 5000, 70000]
else:
    HQ, HEAD_DIMS, LONG = 8, [64], 1023
    PREFILL_MIXES = [[1], [17], [113], [1, 17, 113, 40]]
    CHUNKED = [(17, 100), (40, 300), (1, 50), (113, 113)]
    DECODE_LENS = [1, 17, 113, 1023]


@pytest.fixture(autouse=True)
def _fresh_process_guard(request):
    guard(request)


@pytest.mark.slow
def test_in_fresh_interpreter_process():
    """Rerun this file in a new process with the interpreter on from the start."""
    rerun(__file__)


def _fast(values, keep):
    """Parametrize ``values``; only ``keep`` runs in the fast lane (the interpreter is slow)."""
    return [pytest.param(v, marks=() if v == keep else pytest.mark.slow) for v in values]


# The Hopper TMA kernel runs where the GPU has it (sm_90+) and always in the interpreter.
HAS_HOPPER = not ON_GPU or torch.cuda.get_device_capability() >= (9, 0)
# the interpreter is slow: there the mixes (which hold 1 and 17) stand for the single lengths
HOPPER_MIXES = PREFILL_MIXES if ON_GPU else [m for m in PREFILL_MIXES if len(m) > 1 or m[0] > 100]


def _backend(path="auto"):
    return triton_backend.TritonBackend(prefill_path=path)


def _tables(need, num_blocks, layout, rng, run=8):
    """Block tables for sequences needing ``need[b]`` blocks out of ``num_blocks``.

    ``shuffled``: every block anywhere; ``runs``: aligned runs of ``run`` consecutive blocks in
    shuffled order (what the TMA kernel takes without the gather kernel); ``mixed``: sequences
    alternately contiguous and shuffled (both Hopper kernels in one launch pair);
    ``contiguous``: each sequence one consecutive run of blocks.
    """
    if layout == "runs":
        n_runs = num_blocks // run
        order = list(range(n_runs))
        rng.shuffle(order)
        pool = [r * run + j for r in order for j in range(run)]
    else:
        pool = list(range(num_blocks))
        if layout == "shuffled":
            rng.shuffle(pool)
    tables, i = [], 0
    for b, n in enumerate(need):
        if layout == "runs":
            i = -(-i // run) * run  # each sequence starts on a run
        t = pool[i : i + n]
        if layout == "mixed" and b % 2:
            rng.shuffle(t)
        tables.append(t)
        i += n
    return tables


def _paged(
    query_lens, seq_lens, hkv, d, dtype, block_size=16, seed=0, layout="shuffled"
) -> tuple[AttentionMetadata, torch.Tensor, torch.Tensor]:
    """Metadata with block tables laid out as ``layout`` (plus unused blocks), random caches."""
    rng = random.Random(seed)
    need = [(s + block_size - 1) // block_size for s in seq_lens]
    num_blocks = sum(need) + 3
    if layout == "runs":
        num_blocks = 8 * (sum(-(-n // 8) for n in need) + 1)
    tables = _tables(need, num_blocks, layout, rng)
    meta = AttentionMetadata.build(query_lens, seq_lens, tables, block_size, device=DEVICE)
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    shape = (num_blocks, block_size, hkv, d)
    k = torch.randn(shape, generator=g, device=DEVICE, dtype=torch.float32).to(dtype)
    v = torch.randn(shape, generator=g, device=DEVICE, dtype=torch.float32).to(dtype)
    return meta, k, v


def _torch_lowp(q, k_cache, v_cache, meta, scale):
    """Plain attention with scores and probabilities rounded to the input dtype, as torch would."""
    outs, lses = [], []
    group = q.shape[1] // k_cache.shape[2]
    start = 0
    for b, (qlen, slen) in enumerate(zip(meta.query_lens_cpu, meta.seq_lens_cpu)):
        qs = q[start : start + qlen]
        k = gather_kv(k_cache, meta.block_tables[b], slen).repeat_interleave(group, 1)
        v = gather_kv(v_cache, meta.block_tables[b], slen).repeat_interleave(group, 1)
        s = torch.einsum("qhd,khd->hqk", qs, k) * scale  # in q.dtype
        qpos = torch.arange(slen - qlen, slen, device=q.device)[:, None]
        kpos = torch.arange(slen, device=q.device)[None, :]
        s = s.float().masked_fill(kpos > qpos, float("-inf"))
        lses.append(torch.logsumexp(s, -1).transpose(0, 1))
        p = torch.softmax(s, -1).to(q.dtype)
        outs.append(torch.einsum("hqk,khd->qhd", p, v))
        start += qlen
    return torch.cat(outs), torch.cat(lses)


def _check(out, lse, q, k_cache, v_cache, meta, scale):
    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == q.shape[:2] and lse.dtype == torch.float32
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    ref_out, ref_lse = reference_attention(q, k_cache, v_cache, meta, scale)
    pt_out, pt_lse = _torch_lowp(q, k_cache, v_cache, meta, scale)
    atol = ATOL[q.dtype]
    err = (out.double() - ref_out).abs().max().item()
    err_pt = (pt_out.double() - ref_out).abs().max().item()
    assert err <= 2 * err_pt + atol, f"out error {err:.3g} vs torch {q.dtype} {err_pt:.3g}"
    err = (lse.double() - ref_lse).abs().max().item()
    err_pt = (pt_lse.double() - ref_lse).abs().max().item()
    assert err <= 2 * err_pt + atol, f"lse error {err:.3g} vs torch {q.dtype} {err_pt:.3g}"


def _run_prefill(
    query_lens, seq_lens, hkv, d, dtype, block_size=16, seed=0, path="auto", layout="shuffled"
):
    meta, k_cache, v_cache = _paged(
        query_lens, seq_lens, hkv, d, dtype, block_size, seed, layout=layout
    )
    g = torch.Generator(device=DEVICE).manual_seed(seed + 1)
    q = torch.randn(sum(query_lens), HQ, d, generator=g, device=DEVICE).to(dtype)
    scale = d**-0.5
    out, lse = _backend(path).prefill(q, k_cache, v_cache, meta, scale)
    _check(out, lse, q, k_cache, v_cache, meta, scale)


@pytest.mark.parametrize("lens", PREFILL_MIXES, ids=lambda x: "-".join(map(str, x)))
@pytest.mark.parametrize("group", _fast([1, 4, 8], keep=4))
def test_prefill_ragged_gqa(lens, group):
    _run_prefill(lens, lens, HQ // group, HEAD_DIMS[0], torch.bfloat16, seed=len(lens) + group)


@pytest.mark.skipif(not HAS_HOPPER, reason="the TMA kernel needs compute capability 9.0+")
@pytest.mark.parametrize("layout", ["runs", "mixed", "shuffled"])
@pytest.mark.parametrize("lens", HOPPER_MIXES, ids=lambda x: "-".join(map(str, x)))
def test_prefill_hopper_layouts(lens, layout):
    """The TMA kernel on tables it reads whole (runs), partly (mixed) and not at all."""
    _run_prefill(lens, lens, HQ // 4, HEAD_DIMS[0], torch.bfloat16, seed=len(lens),
                 path="hopper", layout=layout)  # fmt: skip


@pytest.mark.skipif(not HAS_HOPPER, reason="the TMA kernel needs compute capability 9.0+")
@pytest.mark.parametrize("group", [1, 4])
def test_chunked_prefill_hopper(group):
    """Chunked prefill through TMA: earlier chunks' keys come from the cache's pages."""
    qlens = [q for q, _ in CHUNKED]
    slens = [s for _, s in CHUNKED]
    _run_prefill(qlens, slens, HQ // group, HEAD_DIMS[0], torch.bfloat16, seed=11,
                 path="hopper", layout="mixed")  # fmt: skip


@pytest.mark.skipif(not HAS_HOPPER, reason="the TMA kernel needs compute capability 9.0+")
@pytest.mark.parametrize("block_size", [8, 64, 256] if ON_GPU else [8, 64])
def test_prefill_hopper_block_sizes(block_size):
    """Pages smaller than a key tile (runs checked) and as large or larger (always TMA)."""
    lens = [17, 113, 130] if not ON_GPU else [17, 113, 130, 1023, 2500]
    _run_prefill(lens, lens, HQ // 2, HEAD_DIMS[0], torch.float16, block_size=block_size,
                 path="hopper", layout="mixed")  # fmt: skip


@pytest.mark.skipif(not HAS_HOPPER, reason="the TMA kernel needs compute capability 9.0+")
def test_prefill_hopper_ignores_stale_rows():
    """NaN in cache rows past each sequence's end (inside the last tile's box) stays out."""
    lens = [17, 113, 40]
    meta, k_cache, v_cache = _paged(lens, lens, HQ // 4, HEAD_DIMS[0], torch.bfloat16, 64,
                                    layout="runs")  # fmt: skip
    for b, slen in enumerate(lens):
        last = meta.block_tables[b, (slen - 1) // 64]
        k_cache[last, slen % 64 or 64 :] = float("nan")
        v_cache[last, slen % 64 or 64 :] = float("nan")
    spare = [i for i in range(k_cache.shape[0]) if i not in meta.block_tables.flatten().tolist()]
    k_cache[spare] = float("nan")
    v_cache[spare] = float("nan")
    q = torch.randn(sum(lens), HQ, HEAD_DIMS[0], device=DEVICE).to(torch.bfloat16)
    out, lse = _backend("hopper").prefill(q, k_cache, v_cache, meta, 0.125)
    _check(out, lse, q, k_cache, v_cache, meta, 0.125)


HOPPER_VARIANTS = {
    "heads-innermost": dict(head_major=False),
    "pipelined-qk": dict(pipeline_qk=True),
    # Triton 3.6 compiles the warp-specialised loop for two consumer warp groups only
    "warp-specialized": dict(warp_specialize=True, num_warps=8, block_n=128),
    "one-block-row": dict(),  # the bench-only promise of one consecutive run per sequence
}


@pytest.mark.skipif(not HAS_HOPPER, reason="the TMA kernel needs compute capability 9.0+")
@pytest.mark.parametrize("variant", list(HOPPER_VARIANTS))
def test_prefill_hopper_variants(variant):
    """The config switches the bench sweeps (and the contiguous shortcut) give the same answer."""
    lens, qlens = [17, 300, 113, 1], [17, 40, 113, 1]
    if ON_GPU:
        lens, qlens = lens + [2500], qlens + [1500]
    meta, k_cache, v_cache = _paged(qlens, lens, HQ // 4, HEAD_DIMS[0], torch.bfloat16,
                                    layout="contiguous")  # fmt: skip
    q = torch.randn(sum(qlens), HQ, HEAD_DIMS[0], device=DEVICE).to(torch.bfloat16)
    base = triton_prefill_hopper.default_hopper_config(HEAD_DIMS[0], DEVICE)
    cfg = triton_prefill_hopper.HopperPrefillConfig(**{**base.__dict__,
                                                       **HOPPER_VARIANTS[variant]})  # fmt: skip
    out, lse = triton_prefill_hopper.prefill_attention_hopper(
        q, k_cache, v_cache, meta.query_start_loc, meta.seq_lens, meta.block_tables,
        meta.max_query_len, 0.1, config=cfg, _assume_contiguous=variant == "one-block-row",
    )  # fmt: skip
    _check(out, lse, q, k_cache, v_cache, meta, 0.1)


@pytest.mark.skipif(not HAS_HOPPER, reason="the TMA kernel needs compute capability 9.0+")
def test_prefill_hopper_non_causal():
    """causal=False (a partial over earlier blocks): every query sees all seq_len keys."""
    qlens, lens = [3, 40, 1], [50, 40, 130]
    hkv, d = HQ // 4, HEAD_DIMS[0]
    meta, k_cache, v_cache = _paged(qlens, lens, hkv, d, torch.float16, layout="mixed")
    q = torch.randn(sum(qlens), HQ, d, device=DEVICE).to(torch.float16)
    out, lse = triton_prefill_hopper.prefill_attention_hopper(
        q, k_cache, v_cache, meta.query_start_loc, meta.seq_lens, meta.block_tables,
        meta.max_query_len, 0.1, causal=False,
    )  # fmt: skip
    start = 0
    for b, (qlen, slen) in enumerate(zip(qlens, lens)):
        k = gather_kv(k_cache, meta.block_tables[b], slen).double().repeat_interleave(4, 1)
        v = gather_kv(v_cache, meta.block_tables[b], slen).double().repeat_interleave(4, 1)
        s = torch.einsum("qhd,khd->hqk", q[start : start + qlen].double(), k) * 0.1
        ref = torch.einsum("hqk,khd->qhd", torch.softmax(s, -1), v)
        assert (out[start : start + qlen].double() - ref).abs().max() < 2e-3
        ref_lse = torch.logsumexp(s, -1).transpose(0, 1)
        assert (lse[start : start + qlen].double() - ref_lse).abs().max() < 1e-4
        start += qlen


@pytest.mark.skipif(not HAS_HOPPER, reason="the TMA kernel needs compute capability 9.0+")
def test_hopper_run_flags():
    """The device check that routes each sequence to the TMA or the gather kernel."""
    lens, page, run = [5, 40, 200, 16, 129, 64], 16, 4
    need = [(s + page - 1) // page for s in lens]
    tables = [
        [0],  # one page: a run by itself
        [4, 5, 6],  # consecutive
        [8, 9, 10, 11, 20, 21, 22, 23, 12, 13, 14, 15, 40],  # aligned runs out of order
        [30],
        [50, 51, 52, 54, 60, 61, 62, 63, 70],  # a gap inside the first run
        [80, 81, 82, 83],
    ]
    assert [len(t) for t in tables] == need
    meta = AttentionMetadata.build([1] * len(lens), lens, tables, page, device=DEVICE)
    meta.block_tables[5, 2] = 99  # the table is read on the device
    ok = torch.empty(len(lens), dtype=torch.int32, device=DEVICE)
    triton_prefill_hopper._runs_kernel[(len(lens),)](
        ok, meta.seq_lens, meta.block_tables, meta.block_tables.stride(0),
        PAGE=page, NP=run, BLOCK=8,
    )  # fmt: skip
    assert ok.tolist() == [1, 1, 1, 1, 0, 0]


@pytest.mark.skipif(not HAS_HOPPER, reason="the TMA kernel needs compute capability 9.0+")
def test_hopper_refuses_what_it_cannot_describe():
    meta, k_cache, v_cache = _paged([5], [5], HQ // 4, HEAD_DIMS[0], torch.bfloat16, 16)
    q = torch.randn(5, HQ, HEAD_DIMS[0], device=DEVICE).to(torch.bfloat16)
    wide = torch.zeros(k_cache.shape[:-1] + (2 * HEAD_DIMS[0],), dtype=k_cache.dtype,
                       device=DEVICE)  # fmt: skip
    strided = wide[..., : HEAD_DIMS[0]]  # rows of 2*D: not [blocks, page, Hkv, D] rows
    with pytest.raises(ValueError, match="k cache is not"):
        _backend("hopper").prefill(q, strided, v_cache, meta, 0.1)
    assert not _backend("auto").use_hopper(q, strided, v_cache)
    with pytest.raises(ValueError, match="prefill_path"):
        triton_backend.TritonBackend(prefill_path="tma")


@pytest.mark.slow
def test_prefill_long():
    """A sequence of 1023 (on a GPU also 4097) tokens: many full tiles before the diagonal."""
    lens = [LONG] if not ON_GPU else [LONG, 4097]
    _run_prefill(lens, lens, HQ // 8, HEAD_DIMS[0], torch.bfloat16, seed=3)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", HEAD_DIMS + [96])
def test_prefill_dtypes_head_dims(dtype, d):
    lens = [1, 17, 113] if not ON_GPU else [1, 17, 113, LONG]
    _run_prefill(lens, lens, HQ // 4, d, dtype, seed=d)


@pytest.mark.parametrize("head_major", [True, False])
def test_prefill_program_orders(head_major):
    """Both program orders of the gather kernel (GQA group innermost, or every head per tile)."""
    lens = [17, 113, 130] if not ON_GPU else [17, 113, 130, 1023, 2500]
    meta, k_cache, v_cache = _paged(lens, lens, HQ // 4, HEAD_DIMS[0], torch.bfloat16)
    q = torch.randn(sum(lens), HQ, HEAD_DIMS[0], device=DEVICE).to(torch.bfloat16)
    base = triton_prefill.default_prefill_config(HEAD_DIMS[0], q.dtype, DEVICE)
    cfg = triton_prefill.PrefillConfig(**{**base.__dict__, "head_major": head_major})
    out, lse = triton_prefill.prefill_attention(
        q, k_cache, v_cache, meta.query_start_loc, meta.seq_lens, meta.block_tables,
        meta.max_query_len, 0.1, config=cfg,
    )  # fmt: skip
    _check(out, lse, q, k_cache, v_cache, meta, 0.1)


@pytest.mark.parametrize("block_size", _fast([8, 64], keep=8))
def test_prefill_block_sizes(block_size):
    lens = [17, 113, 130]
    _run_prefill(lens, lens, HQ // 2, HEAD_DIMS[0], torch.bfloat16, block_size=block_size,
                 path="ampere")  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("group", _fast([1, 4], keep=4))
def test_chunked_prefill(dtype, group):
    """Queries are the tail of each sequence; earlier chunks' keys are already in the cache."""
    qlens = [q for q, _ in CHUNKED]
    slens = [s for _, s in CHUNKED]
    _run_prefill(qlens, slens, HQ // group, HEAD_DIMS[0], dtype, seed=7, path="ampere")


def _poison_unowned(meta, k_cache, v_cache):
    """NaN in every cache row no sequence owns (the tails of last blocks, unused blocks): a
    kernel that reads one without masking it shows as a non-finite output."""
    page = k_cache.shape[1]
    owned = torch.zeros(k_cache.shape[:2], dtype=torch.bool)
    for b, slen in enumerate(meta.seq_lens_cpu):
        for i, blk in enumerate(meta.block_tables[b, : -(-slen // page)].tolist()):
            owned[blk, : min(page, slen - i * page)] = True
    owned = owned.to(k_cache.device)
    k_cache[~owned] = float("nan")
    v_cache[~owned] = float("nan")


def _run_decode(
    seq_lens, hkv, d, dtype, num_splits=None, seed=0, block_size=16, config=None,
    layout="shuffled", poison=False,
):  # fmt: skip
    meta, k_cache, v_cache = _paged(
        [1] * len(seq_lens), seq_lens, hkv, d, dtype, block_size, seed, layout=layout
    )
    if poison:
        _poison_unowned(meta, k_cache, v_cache)
    g = torch.Generator(device=DEVICE).manual_seed(seed + 1)
    q = torch.randn(len(seq_lens), HQ, d, generator=g, device=DEVICE).to(dtype)
    scale = d**-0.5
    if num_splits is None and config is None:
        out, lse = _backend().decode(q, k_cache, v_cache, meta, scale)
    else:
        out, lse = triton_decode.decode_attention(
            q, k_cache, v_cache, meta.seq_lens, meta.block_tables, meta.max_seq_len, scale,
            config=config, num_splits=num_splits,
        )  # fmt: skip
    _check(out, lse, q, k_cache, v_cache, meta, scale)


@pytest.mark.parametrize("group", _fast([1, 4, 8], keep=4))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_decode(group, dtype):
    _run_decode(DECODE_LENS, HQ // group, HEAD_DIMS[0], dtype, seed=group)


@pytest.mark.parametrize("block_size", [8, 12, 64])
def test_decode_block_sizes(block_size):
    """Pages that tile the key tile (one table read per page: 8, and 64 on a GPU, whose tile is
    64 keys) and pages that do not (one read per key: 12, and 64 in the interpreter)."""
    _run_decode([5, 113, 400], HQ // 4, HEAD_DIMS[0], torch.bfloat16, block_size=block_size)


@pytest.mark.parametrize("num_splits", _fast([1, 3, 64], keep=3))
def test_decode_forced_splits(num_splits):
    """One split (direct write), a few, and more splits than short sequences have keys for."""
    _run_decode([5, 113, 400], HQ // 4, HEAD_DIMS[0], torch.bfloat16, num_splits=num_splits)


@pytest.mark.parametrize("num_splits", [None, 3])
def test_decode_heads_inner(num_splits):
    """The other launch order (the KV heads of one split side by side) covers the same programs:
    the same results against the reference, with one split and several."""
    base = triton_decode.default_decode_config(HEAD_DIMS[0], torch.bfloat16, torch.device(DEVICE))
    cfg = dataclasses.replace(base, heads_inner=True, tma=False)  # the gather kernel's order
    _run_decode([5, 113, 400], HQ // 4, HEAD_DIMS[0], torch.bfloat16, num_splits, config=cfg)


def _tma_decode_config():
    base = triton_decode.default_decode_config(HEAD_DIMS[0], torch.bfloat16, torch.device(DEVICE))
    return dataclasses.replace(base, tma=True, heads_inner=False)


TMA_DECODE_LENS = [5, 113, 400] if not ON_GPU else [5, 113, 400, 1023, 5000, 70000]


@pytest.mark.skipif(not HAS_HOPPER, reason="the TMA kernel needs compute capability 9.0+")
@pytest.mark.parametrize("layout", ["runs", "mixed", "shuffled"])
@pytest.mark.parametrize("num_splits", _fast([None, 1, 3], keep=3))
def test_decode_tma_layouts(layout, num_splits):
    """The TMA decode kernel: split programs whose pages run in consecutive blocks read boxes,
    the others gather, in one launch. Rows no sequence owns are NaN, so a box whose rows past
    the sequence were not masked would show."""
    _run_decode(TMA_DECODE_LENS, HQ // 4, HEAD_DIMS[0], torch.bfloat16, num_splits,
                config=_tma_decode_config(), layout=layout, poison=True)  # fmt: skip


@pytest.mark.skipif(not HAS_HOPPER, reason="the TMA kernel needs compute capability 9.0+")
@pytest.mark.parametrize("block_size", _fast([8, 64], keep=8))
def test_decode_tma_block_sizes(block_size):
    """Pages smaller than the key tile (a box spans several) and larger (a box inside one)."""
    _run_decode(TMA_DECODE_LENS, HQ // 8, HEAD_DIMS[0], torch.float16, 3, block_size=block_size,
                config=_tma_decode_config(), layout="runs", poison=True)  # fmt: skip


@pytest.mark.skipif(not HAS_HOPPER, reason="the TMA kernel needs compute capability 9.0+")
def test_decode_default_takes_tma_when_captured(monkeypatch):
    """Where the default config asks for TMA tiles (sm_90), an eager call gathers (TMA launches
    cost host time) with the same split plan and a captured one (``chunk_buffer``) takes the TMA
    kernel; both against float64."""
    tma = _tma_decode_config()
    monkeypatch.setattr(triton_decode, "default_decode_config", lambda *_: tma)
    calls = []
    real_tma, real_gather = triton_decode_hopper.launch_split_tma, triton_decode._launch_split
    monkeypatch.setattr(
        triton_decode_hopper, "launch_split_tma", lambda *a: (calls.append("tma"), real_tma(*a))
    )
    monkeypatch.setattr(
        triton_decode, "_launch_split", lambda *a: (calls.append(a[13]), real_gather(*a))
    )
    lens = [5, 113, 400]
    meta, k_cache, v_cache = _paged([1] * 3, lens, HQ // 4, HEAD_DIMS[0], torch.bfloat16,
                                    layout="runs")  # fmt: skip
    q = torch.randn(3, HQ, HEAD_DIMS[0], device=DEVICE).to(torch.bfloat16)
    args = (q, k_cache, v_cache, meta.seq_lens, meta.block_tables)
    out, lse = triton_decode.decode_attention(*args, max(lens), 0.1)
    _check(out, lse, q, k_cache, v_cache, meta, 0.1)
    assert calls == [dataclasses.replace(tma, tma=False)]  # the same split plan
    capacity = 1024  # the grid a graph froze; the chunk fits the step's real lengths
    chunk = triton_decode.split_plan(3, HQ // 4, max(lens), q.device, tma)[0]
    buf = torch.tensor([chunk], dtype=torch.int32, device=DEVICE)
    out, lse = triton_decode.decode_attention(*args, capacity, 0.1, chunk_buffer=buf)
    _check(out, lse, q, k_cache, v_cache, meta, 0.1)
    assert calls[1:] == ["tma"]


@triton.jit
def _in_order_kernel(Ok, BlockTables, stride_bt, Lo, Hi, PAGE: tl.constexpr, NP: tl.constexpr):
    b = tl.program_id(0)
    table = BlockTables + b * stride_bt
    lo, hi = tl.load(Lo + b), tl.load(Hi + b)
    ok = triton_decode_hopper._pages_in_order(
        table, lo, hi, PAGE, NP, triton_decode_hopper.TABLE_SPAN
    )
    tl.store(Ok + b, ok.to(tl.int32))


@pytest.mark.skipif(not HAS_HOPPER, reason="the TMA kernel needs compute capability 9.0+")
def test_decode_tma_in_order_check():
    """Which split programs take TMA boxes: each 4-page tile their key range touches must be
    consecutive blocks; other tiles of the sequence do not matter. Tables longer than one step
    of the check (128 entries) are read in steps."""
    page, np_ = 16, 4
    long = list(range(1000, 1300))
    broken = long[:257] + [7] + long[258:]  # page 257 is not a tile's first
    cases = [  # (table, lo, hi, ok)
        ([8, 9, 10, 11, 20, 21, 22, 23, 12, 13, 14, 15, 40], 0, 208, True),
        ([8, 9, 10, 11, 20, 21, 22, 23, 12, 13, 14, 15, 40], 64, 128, True),
        ([50, 51, 52, 54, 60, 61, 62, 63, 70], 0, 129, False),  # a gap in the first tile
        ([50, 51, 52, 54, 60, 61, 62, 63, 70], 64, 129, True),  # ... outside this range
        ([60, 61, 3], 0, 40, False),  # the ragged last tile counts
        ([5], 0, 3, True),
        (long, 0, 300 * page, True),
        (broken, 0, 300 * page, False),
        (broken, 0, 256 * page, True),
        (broken, 256 * page, 300 * page, False),  # a range starting at the broken tile
        (broken, 260 * page, 300 * page, True),  # ... or after it
    ]
    width = max(len(t) for t, *_ in cases)
    tables = torch.tensor([t + [0] * (width - len(t)) for t, *_ in cases], dtype=torch.int32)
    lo = torch.tensor([c[1] for c in cases], dtype=torch.int32)
    hi = torch.tensor([c[2] for c in cases], dtype=torch.int32)
    tables, lo, hi = (x.to(DEVICE) for x in (tables, lo, hi))
    ok = torch.empty(len(cases), dtype=torch.int32, device=DEVICE)
    _in_order_kernel[(len(cases),)](ok, tables, tables.stride(0), lo, hi, PAGE=page, NP=np_)
    assert ok.tolist() == [int(c[3]) for c in cases]


@pytest.mark.skipif(not HAS_HOPPER, reason="the TMA kernel needs compute capability 9.0+")
def test_decode_tma_refuses_what_it_cannot_describe():
    """A TMA config the caller chose raises naming why (the default config, chosen for sm_90
    before the caches are seen, gathers instead) and cannot take the other launch order."""
    meta, k_cache, v_cache = _paged([1], [40], HQ // 4, HEAD_DIMS[0], torch.bfloat16, 16)
    q = torch.randn(1, HQ, HEAD_DIMS[0], device=DEVICE).to(torch.bfloat16)
    wide = torch.zeros(k_cache.shape[:-1] + (2 * HEAD_DIMS[0],), dtype=k_cache.dtype,
                       device=DEVICE)  # fmt: skip
    strided = wide[..., : HEAD_DIMS[0]]
    args = (q, strided, v_cache, meta.seq_lens, meta.block_tables, 40, 0.1)
    with pytest.raises(ValueError, match="DecodeConfig.tma: k cache is not"):
        triton_decode.decode_attention(*args, config=_tma_decode_config())
    with pytest.raises(ValueError, match="DecodeConfig.heads_inner"):
        dataclasses.replace(_tma_decode_config(), heads_inner=True)


def test_decode_split_waves(monkeypatch):
    """With resident_per_sm, the split count fills the last wave of programs (an H100 of 132
    SMs, 2 programs each: 16 x 8 x 9 programs are 4.4 waves, 16 x 8 x 8 are 3.9)."""
    monkeypatch.setattr(triton_decode, "_sm_count", lambda *_: 132)
    cuda = torch.device("cuda")
    old = triton_decode.DecodeConfig(64, 4, 3, 8, 256)
    waves = triton_decode.DecodeConfig(64, 4, 3, 8, 256, resident_per_sm=2)
    assert triton_decode.choose_num_splits(16, 8, 131072, cuda, old) == 9
    assert triton_decode.choose_num_splits(16, 8, 131072, cuda, waves) == 8
    # already full waves, or too short for more splits: unchanged
    assert triton_decode.choose_num_splits(1, 32, 8192, cuda, waves) == 32
    assert triton_decode.choose_num_splits(1, 8, 300, cuda, waves) == 2
    # the GQA default: ~2 waves of split programs (the H200 sweep's best at batch 1, 4 and 16)
    gqa = triton_decode.DECODE_D128
    plan = {(b, s): triton_decode.split_plan(b, 8, s, cuda, gqa)[1]
            for b, s in [(1, 32768), (1, 131072), (4, 32768), (16, 8192), (16, 32768)]}  # fmt: skip
    assert plan == {(1, 32768): 64, (1, 131072): 64, (4, 32768): 16, (16, 8192): 4,
                    (16, 32768): 4}  # fmt: skip
    # MHA (32 KV heads) with the same config: the sweep's best counts (within 0.5 %)
    mha = triton_decode.DECODE_D128
    plan = {(b, s): triton_decode.split_plan(b, 32, s, cuda, mha)[1]
            for b, s in [(1, 8192), (1, 32768), (4, 32768), (16, 8192)]}  # fmt: skip
    assert plan == {(1, 8192): 16, (1, 32768): 16, (4, 32768): 4, (16, 8192): 2}
    # the TMA default (sm_90): half the programs per SM, about 4K keys each at long contexts
    # (the H100 sweep's best), and never one split per pair where the keys allow two
    tma = triton_decode.DECODE_TMA_D128
    plan = {(b, h, s): triton_decode.split_plan(b, h, s, cuda, tma)[1]
            for b, h, s in [(1, 8, 131072), (4, 8, 32768), (16, 8, 8192), (16, 8, 131072),
                            (16, 32, 8192), (16, 32, 100)]}  # fmt: skip
    assert plan == {(1, 8, 131072): 33, (4, 8, 32768): 8, (16, 8, 8192): 2,
                    (16, 8, 131072): 2, (16, 32, 8192): 2, (16, 32, 100): 1}  # fmt: skip


def test_sm90_gather_kernel_takes_the_tma_kernels_tiles(monkeypatch):
    """On sm_90 both prefill kernels default to the same tiles, so they sum in the same order and
    a step gives the same bits whichever kernel a sequence's pages select (the GPU tests check
    the bits; this pins the defaults together)."""
    monkeypatch.setattr(triton_prefill, "_capability", lambda index: (9, 0))
    cuda = torch.device("cuda")
    for d in (64, 128):
        g = triton_prefill.default_prefill_config(d, torch.bfloat16, cuda)
        h = triton_prefill_hopper.default_hopper_config(d, cuda)
        tiles = ("block_m", "block_n", "num_warps", "num_stages", "head_major")
        assert [getattr(g, t) for t in tiles] == [getattr(h, t) for t in tiles], d


def test_decode_wave_fitted_config():
    cfg = triton_decode.DecodeConfig(32, 4, 1, 3, 64, resident_per_sm=1)
    meta, k_cache, v_cache = _paged([1] * 3, [700, 113, 1023], HQ // 4, HEAD_DIMS[0],
                                    torch.bfloat16)  # fmt: skip
    q = torch.randn(3, HQ, HEAD_DIMS[0], device=DEVICE).to(torch.bfloat16)
    out, lse = triton_backend.TritonBackend(decode_config=cfg).decode(
        q, k_cache, v_cache, meta, 0.1
    )
    _check(out, lse, q, k_cache, v_cache, meta, 0.1)


@pytest.mark.slow
@pytest.mark.parametrize("d", [HEAD_DIMS[-1], 96])
def test_decode_head_dims_block_size(d):
    _run_decode([17, 300], HQ // 8, d, torch.float16, block_size=64)


def test_forward_routes_decode_and_prefill():
    meta, k_cache, v_cache = _paged([1, 1], [20, 33], HQ // 4, HEAD_DIMS[0], torch.bfloat16)
    q = torch.randn(2, HQ, HEAD_DIMS[0], device=DEVICE).to(torch.bfloat16)
    out, lse = _backend().forward(q, k_cache, v_cache, meta, 0.1)
    _check(out, lse, q, k_cache, v_cache, meta, 0.1)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_write_kv(dtype):
    qlens, slens = [3, 17, 1], [10, 17, 40]
    hkv, d = HQ // 4, HEAD_DIMS[0]
    meta, k_cache, v_cache = _paged(qlens, slens, hkv, d, dtype)
    key = torch.randn(sum(qlens), hkv, d, device=DEVICE).to(dtype)
    value = torch.randn(sum(qlens), hkv, d, device=DEVICE).to(dtype)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    AttentionBackend.write_kv(_backend(), key, value, k_ref, v_ref, meta.slot_mapping)
    _backend().write_kv(key, value, k_cache, v_cache, meta.slot_mapping)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)


def test_write_kv_skips_padding_slots():
    hkv, d = 2, HEAD_DIMS[0]
    k_cache = torch.zeros(4, 16, hkv, d, device=DEVICE)
    v_cache = torch.zeros_like(k_cache)
    key = torch.randn(3, hkv, d, device=DEVICE)
    slots = torch.tensor([5, -1, 40], dtype=torch.int64, device=DEVICE)
    _backend().write_kv(key, key * 2, k_cache, v_cache, slots)
    flat_k, flat_v = k_cache.view(-1, hkv, d), v_cache.view(-1, hkv, d)
    assert torch.equal(flat_k[5], key[0]) and torch.equal(flat_k[40], key[2])
    assert torch.equal(flat_v[40], key[2] * 2)
    flat_k[5] = 0
    flat_k[40] = 0
    assert not flat_k.any(), "a padding token (slot -1) was written"


def test_supports(monkeypatch):
    cls = triton_backend.TritonBackend
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert cls.supports(torch.device("cpu")) is None
    monkeypatch.delenv("TRITON_INTERPRET")
    assert "TRITON_INTERPRET" in cls.supports(torch.device("cpu"))
    if ON_GPU:
        cap = torch.cuda.get_device_capability()
        assert (cls.supports(torch.device("cuda")) is None) == (cap >= (8, 0))


@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
def test_registry_auto_picks_triton_on_gpu():
    from runtime.attention.registry import get_backend, resolve_backend_name

    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("needs compute capability 8.0+")
    assert resolve_backend_name("auto", torch.device("cuda")) == "triton"
    assert get_backend("triton", "cuda").name == "triton"
