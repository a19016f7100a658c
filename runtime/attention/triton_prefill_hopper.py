"""Causal paged prefill for Hopper (sm_90): K/V tiles arrive by TMA through tensor descriptors.

The algorithm is the one of ``triton_prefill`` (FlashAttention-2 over packed variable-length
queries, the causal split into unmasked off-diagonal tiles and masked diagonal tiles, exp2 with
log2(e) folded into the softmax scale, heaviest query tiles first, GQA heads of a group adjacent in
the grid). What changes is how K and V reach shared memory: one TMA copy per key tile instead of a
gather of ``BLOCK_N`` rows by pointer arithmetic, which frees the warps' registers and issue slots
for the two wgmma and the softmax, and lets the off-diagonal loop run warp-specialised (a producer
warp issuing the copies, the math warps consuming them) when the config asks for it.

TMA copies a box of a tensor, so the cache is described as one 2-D tensor
``[num_blocks * block_size, Hkv * D]`` (token rows, head columns) and a key tile is the box of
``BLOCK_N`` rows from ``block_tables[b, start // page] * page + start % page``, columns of the KV
head. That box is the tile only when the tile's tokens are adjacent in the cache:

* ``page % BLOCK_N == 0``: every tile lies inside one page; always true.
* ``BLOCK_N % page == 0`` (e.g. page 16, tile 128 = 8 pages): true when the tile's pages are
  consecutive blocks, which the block manager's in-order free list gives a fresh sequence. A tiny
  kernel checks each sequence's table on the device (no host sync); a sequence whose pages are not
  in consecutive aligned runs is handled by the pointer-gather kernel of ``triton_prefill``,
  launched right after for exactly those sequences. The contract (blocks anywhere, any order)
  holds either way.

Keys past ``seq_len`` inside the last tile's box (stale cache rows, or zeros past the cache) are
masked in the scores and zeroed in V, so uninitialised memory cannot leak NaN into the output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from runtime.attention import triton_prefill
from runtime.attention.triton_prefill import (
    LOG2E,
    _cast,
    _mma,
    _program_tile,
    check_layout,
    dot_mode,
)

try:  # Triton >= 3.3: host-side TMA descriptors
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older Triton: the Hopper path reports itself unusable
    TensorDescriptor = None


@dataclass(frozen=True)
class HopperPrefillConfig:
    """Tile shape, launch parameters and whether the off-diagonal loop is warp-specialised."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    warp_specialize: bool = False
    # issue the next tile's QK^T before this tile's softmax (FA-3's intra-warpgroup overlap,
    # written in the source so the async wgmma runs under the exponentials)
    pipeline_qk: bool = False
    head_major: bool = True  # program order; see triton_prefill._program_tile

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"HopperPrefillConfig.{name}={v}: use a power of two >= 16")


# 128 x 64 tiles on one warp group, 4 stages: on an H200 (2026-12-04; bench_attention's
# HOPPER_SWEEP, then attention-tiles-merge-nvidia-h200-2026-12-04.log in benchmarks/results) 501 /
# 495 TFLOP/s at 16K / 64K against 438 / 452 for 128 x 128 on two warp groups. The gather kernel
# takes the same tiles on sm_90 (triton_prefill.PREFILL_D128_SM90): both kernels then sum in the
# same order, so a step gives the same bits whichever kernel its pages select
# (tests/test_gpu_spill.py checks it). Warp-specialised loops gained nothing (8 warps) or did not
# compile (4 warps, Triton 3.6).
HOPPER_D128 = HopperPrefillConfig(block_m=128, block_n=64, num_warps=4, num_stages=4)
HOPPER_D64 = HopperPrefillConfig(block_m=128, block_n=64, num_warps=4, num_stages=3)


def default_hopper_config(head_dim: int, device: torch.device) -> HopperPrefillConfig:
    """Tile shapes for sm_90; small unequal tiles for the interpreter (diagonal cases)."""
    if device.type != "cuda":
        return HopperPrefillConfig(block_m=32, block_n=32, num_warps=4, num_stages=1)
    return HOPPER_D64 if head_dim <= 64 else HOPPER_D128


def unsupported_reason(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cfg: HopperPrefillConfig
) -> str | None:
    """``None`` if the TMA kernel handles these tensors, else why the Ampere kernel must."""
    if TensorDescriptor is None:
        return "this Triton has no tensor descriptors"
    if q.device.type == "cuda" and torch.cuda.get_device_capability(q.device) < (9, 0):
        return "TMA needs compute capability 9.0+"
    if q.device.type == "cuda" and q.dtype not in (torch.float16, torch.bfloat16):
        return f"dtype {q.dtype}: the TMA kernel is for float16/bfloat16"
    d = q.shape[-1]
    if d not in (64, 128):
        return f"head dim {d}: the TMA kernel is for 64 and 128"
    page = k_cache.shape[1]
    if page % cfg.block_n and cfg.block_n % page:
        return f"block size {page} and key tile {cfg.block_n} do not divide one another"
    return cache_layout_reason(k_cache, v_cache)


def cache_layout_reason(k_cache: torch.Tensor, v_cache: torch.Tensor) -> str | None:
    """``None`` if a 2-D TMA descriptor (rows of Hkv*D over all blocks) can describe both caches,
    else why not."""
    for name, c in (("k", k_cache), ("v", v_cache)):
        nb, pg, hkv, d = c.shape
        if c.stride(3) != 1 or c.stride(2) != d or c.stride(0) != pg * c.stride(1):
            return f"{name} cache is not [blocks, block_size, Hkv, D] with rows of Hkv*D"
        if (c.stride(1) * c.element_size()) % 16 or c.data_ptr() % 16:
            return f"{name} cache rows are not 16-byte aligned"
    return None


def runs_ok(
    seq_lens: torch.Tensor, block_tables: torch.Tensor, page: int, block_n: int
) -> torch.Tensor:
    """``ok[b]`` (int32, on the device) = 1 when each aligned run of ``block_n`` keys of sequence
    b lies in consecutive blocks (a TMA box can read it), else 0: the gather kernel takes b."""
    num_seqs = seq_lens.shape[0]
    ok = torch.empty(num_seqs, dtype=torch.int32, device=seq_lens.device)
    _runs_kernel[(num_seqs,)](
        ok, seq_lens, block_tables, block_tables.stride(0),
        PAGE=page, NP=block_n // page, BLOCK=max(256, block_n // page),
    )  # fmt: skip
    return ok


@triton.jit
def _runs_kernel(Ok, SeqLens, BlockTables, stride_bt, PAGE: tl.constexpr, NP: tl.constexpr,
                 BLOCK: tl.constexpr):  # fmt: skip
    """Ok[b] = 1 when each aligned run of NP pages of sequence b holds consecutive blocks."""
    b = tl.program_id(0)
    table = BlockTables + b.to(tl.int64) * stride_bt
    ok = _pages_in_order(table, 0, tl.load(SeqLens + b), PAGE, NP, BLOCK)
    tl.store(Ok + b, ok.to(tl.int32))


@triton.jit
def _pages_in_order(table, lo, hi, PAGE: tl.constexpr, NP: tl.constexpr, SPAN: tl.constexpr):
    """Whether each tile of ``NP`` pages (tiles start at multiples of ``NP * PAGE`` keys) that
    keys ``[lo, hi)`` touch lies in consecutive cache blocks; reads ``SPAN`` entries a step."""
    bad = tl.zeros([SPAN], dtype=tl.int32)
    if NP > 1:
        last = tl.cdiv(hi, PAGE)
        offs = tl.arange(0, SPAN)
        for j0 in range(lo // PAGE, last, SPAN):
            j = j0 + offs
            # a page that does not start a tile must follow the page before it
            m = (j < last) & (j % NP != 0)
            cur = tl.load(table + j, mask=m, other=0)
            prev = tl.load(table + j - 1, mask=m, other=-1)
            bad += (cur != prev + 1).to(tl.int32)
    return tl.sum(bad, 0) == 0


@triton.jit
def _first_row(table, PAGE: tl.constexpr, ROWS_FROM_TABLE: tl.constexpr):
    if ROWS_FROM_TABLE:
        first_row = 0  # unused
    else:
        first_row = tl.load(table) * PAGE
    return first_row


@triton.jit
def _tile_row(table, start_n, first_row, PAGE: tl.constexpr, ROWS_FROM_TABLE: tl.constexpr):
    """First cache row of the key tile at ``start_n``; without ROWS_FROM_TABLE (benchmarks only)
    the caller promised that each sequence's pages form one consecutive run."""
    if ROWS_FROM_TABLE:
        row = tl.load(table + start_n // PAGE) * PAGE + start_n % PAGE
    else:
        row = first_row + start_n
    return row


@triton.jit
def _attend_tma(
    acc,
    l_i,
    m_i,
    q,
    q_pos,
    table,
    k_desc,
    v_desc,
    col,
    lo,
    hi,
    qk_scale,
    offs_n,
    PAGE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ON_DIAGONAL: tl.constexpr,
    WARP_SPECIALIZE: tl.constexpr,
    DOT_MODE: tl.constexpr,
    ROWS_FROM_TABLE: tl.constexpr,
):
    """Online softmax over key tiles ``[lo, hi)`` read by TMA; log2 domain throughout."""
    first_row = _first_row(table, PAGE, ROWS_FROM_TABLE)
    for start_n in tl.range(lo, hi, BLOCK_N, warp_specialize=WARP_SPECIALIZE):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        # the tile's first cache row: its tokens are adjacent from there (see the module doc)
        row = _tile_row(table, start_n, first_row, PAGE, ROWS_FROM_TABLE)
        k = k_desc.load([row, col])
        qk = _mma(q, k.T, None, DOT_MODE)
        if ON_DIAGONAL:
            pos = start_n + offs_n
            # key position <= query position; q_pos is clipped to hi - 1, so keys past the
            # sequence (stale rows in the box) are masked for every row
            qk = tl.where(pos[None, :] <= q_pos[:, None], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        p = tl.math.exp2(qk * qk_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        acc = acc * alpha[:, None]
        v = v_desc.load([row, col])
        if ON_DIAGONAL:
            # p is 0 there, but 0 * NaN from an uninitialised row would not be
            v = tl.where((pos < hi)[:, None], v, tl.zeros_like(v))
        acc = _mma(_cast(p, v.dtype, DOT_MODE), v, acc, DOT_MODE)
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attend_tma_pipelined(
    acc,
    l_i,
    m_i,
    q,
    table,
    k_desc,
    v_desc,
    col,
    lo,
    hi,
    qk_scale,
    PAGE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_MODE: tl.constexpr,
    ROWS_FROM_TABLE: tl.constexpr,
):
    """The unmasked tiles ``[lo, hi)`` with QK^T of tile j+1 issued before the softmax of tile j:
    the scores of the next tile are a loop-carried value, so the tensor cores work on them while
    the warps compute exponentials."""
    if hi > lo:
        first_row = _first_row(table, PAGE, ROWS_FROM_TABLE)
        row = _tile_row(table, lo, first_row, PAGE, ROWS_FROM_TABLE)
        qk = _mma(q, k_desc.load([row, col]).T, None, DOT_MODE)
        for start_n in tl.range(lo + BLOCK_N, hi + BLOCK_N, BLOCK_N):
            start_n = tl.multiple_of(start_n, BLOCK_N)
            # the next tile's scores (a dummy repeat of this tile's past the end)
            nxt = tl.minimum(start_n, hi - BLOCK_N)
            row_next = _tile_row(table, nxt, first_row, PAGE, ROWS_FROM_TABLE)
            qk_next = _mma(q, k_desc.load([row_next, col]).T, None, DOT_MODE)
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            p = tl.math.exp2(qk * qk_scale - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
            acc = acc * alpha[:, None]
            v = v_desc.load([row, col])
            acc = _mma(_cast(p, v.dtype, DOT_MODE), v, acc, DOT_MODE)
            l_i = l_i * alpha + tl.sum(p, 1)
            m_i = m_new
            qk = qk_next
            row = row_next
    return acc, l_i, m_i


# stride_bt unspecialised: the block-table width varies with the batch's longest prompt
@triton.jit(do_not_specialize=["stride_bt"])
def _prefill_tma_kernel(
    Q,
    k_desc,
    v_desc,
    Out,
    Lse,
    QStart,
    SeqLens,
    BlockTables,
    Ok,
    qk_scale,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_lt,
    stride_bt,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PAGE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_MODE: tl.constexpr,
    CAUSAL: tl.constexpr,
    CHECK_RUNS: tl.constexpr,
    WARP_SPECIALIZE: tl.constexpr,
    ROWS_FROM_TABLE: tl.constexpr,
    PIPELINE_QK: tl.constexpr,
    HQ: tl.constexpr,
    HEAD_MAJOR: tl.constexpr,
):
    h, tile = _program_tile(HQ, GROUP, HEAD_MAJOR)
    b = tl.program_id(1)
    q_start = tl.load(QStart + b)
    q_len = tl.load(QStart + b + 1) - q_start
    m0 = tile * BLOCK_M
    if m0 >= q_len:
        return
    if CHECK_RUNS:  # noqa: SIM102 (a constexpr test around a load)
        if tl.load(Ok + b) == 0:  # scattered pages: the gather kernel takes this sequence
            return
    seq_len = tl.load(SeqLens + b)
    ctx = seq_len - q_len  # keys already in the cache before this step's queries

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    m_mask = offs_m < q_len
    tok = (q_start + offs_m).to(tl.int64)
    # load q: it stays on chip for the whole key loop
    q = tl.load(Q + tok[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
                mask=m_mask[:, None], other=0.0)  # fmt: skip

    if CAUSAL:
        full_end = ((ctx + m0 + 1) // BLOCK_N) * BLOCK_N  # keys every row of the tile sees
        hi = ctx + tl.minimum(m0 + BLOCK_M, q_len)
        q_pos = tl.minimum(ctx + offs_m, hi - 1)
    else:  # every query sees every key: the diagonal stage only masks the tail
        full_end = (seq_len // BLOCK_N) * BLOCK_N
        hi = seq_len
        q_pos = tl.zeros([BLOCK_M], dtype=tl.int32) + (seq_len - 1)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    table = BlockTables + b.to(tl.int64) * stride_bt
    col = (h // GROUP) * HEAD_DIM
    if PIPELINE_QK:
        acc, l_i, m_i = _attend_tma_pipelined(
            acc, l_i, m_i, q, table, k_desc, v_desc, col, 0, full_end, qk_scale,
            PAGE, BLOCK_N, DOT_MODE, ROWS_FROM_TABLE,
        )  # fmt: skip
    else:
        acc, l_i, m_i = _attend_tma(
            acc, l_i, m_i, q, q_pos, table, k_desc, v_desc, col, 0, full_end, qk_scale, offs_n,
            PAGE, BLOCK_N, False, WARP_SPECIALIZE, DOT_MODE, ROWS_FROM_TABLE,
        )  # fmt: skip
    acc, l_i, m_i = _attend_tma(
        acc, l_i, m_i, q, q_pos, table, k_desc, v_desc, col, full_end, hi, qk_scale, offs_n,
        PAGE, BLOCK_N, True, False, DOT_MODE, ROWS_FROM_TABLE,
    )  # fmt: skip

    out = _cast(acc / l_i[:, None], Out.dtype.element_ty, DOT_MODE)
    tl.store(Out + tok[:, None] * stride_ot + h * stride_oh + offs_d[None, :], out,
             mask=m_mask[:, None])  # fmt: skip
    # natural-log LSE from the log2-domain running max and sum
    lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453
    tl.store(Lse + tok * stride_lt + h, lse, mask=m_mask)


def _cache_desc(cache: torch.Tensor, block_n: int, head_dim: int):
    nb, page, hkv, d = cache.shape
    return TensorDescriptor(
        cache, shape=[nb * page, hkv * d], strides=[cache.stride(1), 1],
        block_shape=[block_n, head_dim],
    )  # fmt: skip


def prefill_attention_hopper(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    max_query_len: int,
    scale: float,
    config: HopperPrefillConfig | None = None,
    causal: bool = True,
    gather_config: triton_prefill.PrefillConfig | None = None,
    _assume_contiguous: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``triton_prefill.prefill_attention`` with TMA key tiles; same arguments and results.

    Raises ValueError (naming why) when ``unsupported_reason`` says the tensors do not fit the TMA
    kernel; the backend checks first and uses the Ampere kernel instead. Sequences whose pages
    are not in consecutive runs go to the gather kernel (with ``gather_config``).

    ``_assume_contiguous`` is for scripts/bench_attention.py only (what reading the block table
    per tile costs): the caller promises that each sequence's pages are one consecutive run.
    """
    check_layout(q, k_cache, v_cache)
    cfg = config or default_hopper_config(q.shape[-1], q.device)
    reason = unsupported_reason(q, k_cache, v_cache, cfg)
    if reason is not None:
        raise ValueError(f"Hopper prefill kernel: {reason}")
    if q.stride(-1) != 1:
        q = q.contiguous()
    T, hq, d = q.shape
    page, hkv = k_cache.shape[1], k_cache.shape[2]
    out = torch.empty_like(q)
    lse = torch.empty(T, hq, dtype=torch.float32, device=q.device)
    num_seqs = seq_lens.shape[0]
    if T == 0 or num_seqs == 0:
        return out, lse
    check_runs = page % cfg.block_n != 0 and not _assume_contiguous
    ok = runs_ok(seq_lens, block_tables, page, cfg.block_n) if check_runs else seq_lens
    grid = (hq * triton.cdiv(max_query_len, cfg.block_m), num_seqs)
    _prefill_tma_kernel[grid](
        q, _cache_desc(k_cache, cfg.block_n, d), _cache_desc(v_cache, cfg.block_n, d),
        out, lse, query_start_loc, seq_lens, block_tables, ok,
        scale * LOG2E,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), lse.stride(0),
        block_tables.stride(0),
        GROUP=hq // hkv,
        HEAD_DIM=d,
        PAGE=page,
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        DOT_MODE=dot_mode(q.dtype, q.device),
        CAUSAL=causal,
        CHECK_RUNS=check_runs,
        WARP_SPECIALIZE=cfg.warp_specialize,
        ROWS_FROM_TABLE=not _assume_contiguous,
        PIPELINE_QK=cfg.pipeline_qk,
        HQ=hq,
        HEAD_MAJOR=cfg.head_major,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )  # fmt: skip
    if check_runs:  # the sequences the TMA kernel skipped
        triton_prefill.launch_prefill(
            q, k_cache, v_cache, out, lse, query_start_loc, seq_lens, block_tables,
            max_query_len, scale, gather_config, causal, skip_ok=ok,
        )  # fmt: skip
    return out, lse


__all__ = [
    "HopperPrefillConfig",
    "default_hopper_config",
    "prefill_attention_hopper",
    "unsupported_reason",
]
