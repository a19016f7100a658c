"""Split-KV decode for Hopper (sm_90): key and value tiles arrive as TMA boxes.

The algorithm, the split plan and the combine kernel are ``triton_decode``'s. What changes is how
a tile of ``block_n`` keys reaches shared memory: one TMA copy of ``block_n`` cache rows (one KV
head's columns) instead of a gather of ``block_n`` rows by pointer arithmetic. The cache is
described as one 2-D tensor ``[num_blocks * block_size, Hkv * D]`` (as in
``triton_prefill_hopper``), so a box is a tile only when the tile's pages are consecutive blocks.
Each split program checks its own key range in the block table first (``chunk / block_size``
int32 reads, next to the ``chunk * D * 4`` bytes of K/V it then reads): if every tile of it lies
in consecutive blocks it takes the TMA loop, else the gather loop of ``triton_decode``. The
allocators keep every 128-key tile of a sequence in consecutive blocks (``scheduler.free_runs``:
in a fresh pool, after churn, and for sequences growing in the same steps), so the TMA loop is
the common case and the contract (blocks anywhere, any order) holds either way, in one launch.

The default config takes this kernel only in captured steps (``chunk_buffer`` given): an eager
launch with TMA descriptors costs more host time than the gather kernel's (see
``triton_decode.decode_attention``).

Measured on an H100 (2026-12-05, batch 16, 8 KV heads, in-order pages, CUDA graphs;
``benchmarks/results/attention-decode-tma-nvidia-h100-80gb-hbm3.json``): two splits per (sequence,
KV head) of 64-key boxes read K/V at 2.80 / 3.04 / 3.12 TB/s at 8K / 32K / 128K keys, where the
gather kernel reads 2.72 / 2.99 / 3.05 and SDPA flash, over the same memory, 2.78 / 3.02 / 3.08.
One TMA box per 16-key page (any table) was no faster than the gather.

Keys past ``seq_len`` inside the last tile's box (stale rows of the next block, or rows past the
cache that TMA fills with zeros) are masked in the scores and zeroed in V.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from runtime.attention.triton_decode import _attend_gather, _online_update, _store_split
from runtime.attention.triton_prefill import _mma, dot_mode
from runtime.attention.triton_prefill_hopper import (
    _cache_desc,
    _pages_in_order,
    _tile_row,
    cache_layout_reason,
)

try:  # Triton >= 3.3: host-side TMA descriptors
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older Triton: the path reports itself unusable
    TensorDescriptor = None

TABLE_SPAN = tl.constexpr(128)  # block-table entries one step of the in-order check reads


def unsupported_reason(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_n: int
) -> str | None:
    """``None`` if the TMA decode kernel handles these tensors, else why the gather kernel must."""
    if TensorDescriptor is None:
        return "this Triton has no tensor descriptors"
    if q.device.type == "cuda":
        if torch.cuda.get_device_capability(q.device) < (9, 0):
            return "TMA needs compute capability 9.0+"
        if q.dtype not in (torch.float16, torch.bfloat16):
            return f"dtype {q.dtype}: the TMA decode kernel is for float16/bfloat16"
    d = q.shape[-1]
    if d & (d - 1) or not 16 <= d <= 256:
        return f"head dim {d}: TMA boxes need a power of two from 16 to 256"
    page = k_cache.shape[1]
    if page % block_n and block_n % page:
        return f"block size {page} and key tile {block_n} do not divide one another"
    return cache_layout_reason(k_cache, v_cache)


@triton.jit
def _attend_tma(
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
):
    """Keys ``[lo, hi)`` of one KV head, each tile one TMA box from its first page's row: whole
    tiles unmasked, then the ragged last one masked."""
    full = lo + (hi - lo) // BLOCK_N * BLOCK_N
    for start_n in range(lo, full, BLOCK_N):
        row = _tile_row(table, start_n, 0, PAGE, True)
        k = k_desc.load([row, col])
        v = v_desc.load([row, col])
        qk = _mma(q, k.T, None, DOT_MODE)
        acc, l_i, m_i = _online_update(acc, l_i, m_i, qk, v, qk_scale, DOT_MODE)
    if full < hi:
        pos = full + tl.arange(0, BLOCK_N)
        row = _tile_row(table, full, 0, PAGE, True)
        k = k_desc.load([row, col])
        # p is 0 past hi, but 0 * NaN from a stale row would not be
        v = v_desc.load([row, col])
        v = tl.where((pos < hi)[:, None], v, tl.zeros_like(v))
        qk = _mma(q, k.T, None, DOT_MODE)
        qk = tl.where((pos < hi)[None, :], qk, float("-inf"))
        acc, l_i, m_i = _online_update(acc, l_i, m_i, qk, v, qk_scale, DOT_MODE)
    return acc, l_i, m_i


@triton.jit
def _decode_split_tma_kernel(
    Q,
    K,
    V,
    k_desc,
    v_desc,
    Out,
    Lse,
    PartOut,
    PartLse,
    SeqLens,
    BlockTables,
    ChunkPtr,
    qk_scale,
    chunk,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_ot,
    stride_oh,
    stride_lt,
    stride_bt,
    stride_pb,
    stride_ph,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PAGE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SINGLE: tl.constexpr,
    DOT_MODE: tl.constexpr,
    CHUNK_FROM_PTR: tl.constexpr,
):
    s = tl.program_id(0)
    kvh = tl.program_id(1)
    b = tl.program_id(2)
    seq_len = tl.load(SeqLens + b)
    if CHUNK_FROM_PTR:
        chunk = tl.load(ChunkPtr)
    lo = s * chunk
    if lo >= seq_len:
        return
    hi = tl.minimum(lo + chunk, seq_len)

    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, HEAD_DIM)
    g_mask = offs_g < GROUP
    heads = kvh * GROUP + offs_g
    q_ptrs = Q + b.to(tl.int64) * stride_qt + heads[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=g_mask[:, None], other=0.0)

    m_i = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], dtype=tl.float32)
    table = BlockTables + b.to(tl.int64) * stride_bt
    if _pages_in_order(table, lo, hi, PAGE, BLOCK_N // PAGE, TABLE_SPAN):
        acc, l_i, m_i = _attend_tma(
            acc, l_i, m_i, q, table, k_desc, v_desc, kvh * HEAD_DIM, lo, hi, qk_scale,
            PAGE, BLOCK_N, DOT_MODE,
        )  # fmt: skip
    else:
        acc, l_i, m_i = _attend_gather(
            acc, l_i, m_i, q, table, K + kvh * stride_kh, V + kvh * stride_vh, lo, hi, qk_scale,
            stride_kb, stride_kt, stride_vb, stride_vt,
            HEAD_DIM, HEAD_DIM, PAGE, BLOCK_N, DOT_MODE, BLOCK_N % PAGE == 0,
        )  # fmt: skip
    _store_split(
        acc, l_i, m_i, heads, g_mask, b, s, Out, Lse, PartOut, PartLse,
        stride_ot, stride_oh, stride_lt, stride_pb, stride_ph, 1,
        HEAD_DIM, HEAD_DIM, SINGLE, DOT_MODE,
    )  # fmt: skip


def launch_split_tma(
    q, k_cache, v_cache, out, lse, part_out, part_lse, seq_lens, block_tables, chunk_buffer,
    qk_scale, chunk, num_splits, cfg, single, from_ptr,
) -> None:  # fmt: skip
    """The split kernel of ``triton_decode.decode_attention`` with TMA tiles; same buffers."""
    B, hq, d = q.shape
    _, page, hkv, _ = k_cache.shape
    stride_pb, stride_ph = (0, 0) if single else (part_lse.stride(0), part_lse.stride(1))
    _decode_split_tma_kernel[(num_splits, hkv, B)](
        q, k_cache, v_cache, _cache_desc(k_cache, cfg.block_n, d),
        _cache_desc(v_cache, cfg.block_n, d), out, lse, part_out, part_lse, seq_lens,
        block_tables, chunk_buffer, qk_scale, chunk,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        out.stride(0), out.stride(1), lse.stride(0), block_tables.stride(0),
        stride_pb, stride_ph,
        GROUP=hq // hkv,
        GROUP_PAD=max(16, triton.next_power_of_2(hq // hkv)),
        HEAD_DIM=d,
        PAGE=page,
        BLOCK_N=cfg.block_n,
        SINGLE=single,
        DOT_MODE=dot_mode(q.dtype, q.device),
        CHUNK_FROM_PTR=from_ptr,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )  # fmt: skip


__all__ = ["launch_split_tma", "unsupported_reason"]
