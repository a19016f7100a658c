"""FlashAttention-2 forward over packed variable-length queries and the paged KV cache (Triton).

One launch covers the whole batch: the grid is ``(query head x query tile, sequence)``. By default
(``head_major``) the programs walk one KV head at a time, its query tiles heaviest first (the last
tile of a causal sequence sees the most keys) and the heads of its GQA group innermost, so the
programs resident on the GPU read the same K/V through L2 (``_program_tile``).
A program whose tile lies past its sequence's query length exits at once, so the grid can be sized
from ``max_query_len`` (known on the host) without a device-to-host copy.

Causality is a *tiling mask* computed from positions in registers: query ``i`` of sequence ``b``
sits at ``seq_len - q_len + i`` and sees keys at positions ``<=`` its own. Key tiles that every
row of the query tile sees run unmasked; only the few tiles that cross the diagonal are masked; key
tiles above the diagonal are never visited. Keys before this step's first query (chunked prefill,
earlier chunks already in the cache) fall in the unmasked part.

K/V are read through the block table row by row (``block_tables[b, pos // page]``), so blocks may
be scattered; GQA reads the KV head ``h // group`` without materialising repeated K/V.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class PrefillConfig:
    """Kernel tile shape and launch parameters."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    head_major: bool = True  # program order; see _program_tile


# The fastest of scripts/bench_attention.py's sweeps on an H100 (bf16, head dim 128, 32 heads, 1K
# to 64K tokens). At 1K every config measured the same (~50 us: launch-bound).
PREFILL_D128 = PrefillConfig(block_m=128, block_n=128, num_warps=8, num_stages=3)
# sm_90+: the Hopper TMA kernel's tiles (triton_prefill_hopper.HOPPER_D128), on purpose. With the
# same tiles both kernels sum in the same order, so a step gives the same bits whichever kernel a
# sequence's pages select (consecutive pages: TMA; any others, and spilled rounds: this one). On
# an H200 (attention-tiles-merge-nvidia-h200-2026-12-04.log in benchmarks/results) these tiles
# took the TMA kernel from 438 / 452 to 501 / 495 TFLOP/s at 16K / 64K, and this kernel from
# 393 / 413 to 350 / 356 on shuffled pages. A fresh sequence's pages are consecutive (the block
# manager's in-order free list), so TMA is the usual path.
PREFILL_D128_SM90 = PrefillConfig(block_m=128, block_n=64, num_warps=4, num_stages=4)


def default_prefill_config(
    head_dim: int, dtype: torch.dtype, device: torch.device
) -> PrefillConfig:
    """Tile shapes for the GPU (see above); small tiles for the interpreter."""
    if device.type != "cuda":
        # Interpreter: small unequal tiles, so tests see diagonal and partial-tile cases.
        return PrefillConfig(block_m=64, block_n=32, num_warps=4, num_stages=1)
    if dtype == torch.float32 or head_dim > 128:
        return PrefillConfig(block_m=64, block_n=32, num_warps=4, num_stages=2)
    if head_dim <= 64:
        return PrefillConfig(block_m=128, block_n=64, num_warps=4, num_stages=3)
    if _capability(device.index) >= (9, 0):
        return PREFILL_D128_SM90
    return PREFILL_D128


@functools.cache
def _capability(index: int | None) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def dot_mode(dtype: torch.dtype, device: torch.device) -> int:
    """How ``_mma`` multiplies: 0 tensor cores in the input dtype, 1 exact fp32, 2 bf16 on CPU.

    Mode 2 exists because Triton's interpreter multiplies bf16 tiles as their raw uint16 bits;
    upcasting the (already bf16-rounded) operands to fp32 gives what the GPU computes.
    """
    if dtype == torch.float32:
        return 1
    if device.type != "cuda" and dtype == torch.bfloat16:
        return 2
    return 0


@triton.jit
def _mma(a, b, acc, DOT_MODE: tl.constexpr):
    if DOT_MODE == 1:
        r = tl.dot(a, b, acc, input_precision="ieee")
    elif DOT_MODE == 2:
        r = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        r = tl.dot(a, b, acc)
    return r


@triton.jit
def _cast(x, dtype: tl.constexpr, DOT_MODE: tl.constexpr):
    if DOT_MODE == 2:
        # the interpreter truncates fp32 -> bf16; round to nearest even, as the GPU does
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _program_tile(HQ: tl.constexpr, GROUP: tl.constexpr, HEAD_MAJOR: tl.constexpr):
    """``(query head, query tile)`` of this program; grid axis 0 is ``HQ * n_tiles``.

    Within a head (a GQA group), the heaviest tiles come first. HEAD_MAJOR walks one KV head at
    a time (the heads of its group innermost), so the ~130 programs resident on the GPU are
    query tiles of one KV head, starting together at key 0: they stream the same K/V, which stays
    in L2 (one head's K/V at 64K is 32 MB). Heads-innermost puts every head's tile t together;
    if each program then streams its own K/V from HBM, 128 FLOP per byte of a 128x128 tile caps
    the kernel near 3 TB/s x 128 = ~390 TFLOP/s on an H100, the plateau both orders were
    compared against (scripts/bench_attention.py sweeps them).
    """
    pid = tl.program_id(0)
    n_tiles = tl.num_programs(0) // HQ
    if HEAD_MAJOR:
        g = pid % GROUP
        rest = pid // GROUP
        tile = n_tiles - 1 - rest % n_tiles
        h = (rest // n_tiles) * GROUP + g
    else:
        h = pid % HQ
        tile = n_tiles - 1 - pid // HQ
    return h, tile


@triton.jit
def _attend(
    acc,
    l_i,
    m_i,
    q,
    q_pos,
    table,
    k_base,
    v_base,
    stride_kb,
    stride_kt,
    stride_vb,
    stride_vt,
    lo,
    hi,
    qk_scale,
    offs_n,
    offs_d,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PAGE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ON_DIAGONAL: tl.constexpr,
    DOT_MODE: tl.constexpr,
):
    """Online-softmax accumulation over key tiles ``[lo, hi)``; log2 domain throughout."""
    for start_n in range(lo, hi, BLOCK_N):
        pos = start_n + offs_n
        # gather this tile's rows through the block table
        if ON_DIAGONAL:
            n_mask = pos < hi
            blk = tl.load(table + pos // PAGE, mask=n_mask, other=0).to(tl.int64)
        else:
            blk = tl.load(table + pos // PAGE).to(tl.int64)
        row = pos % PAGE
        k_ptrs = k_base + (blk * stride_kb + row * stride_kt)[:, None] + offs_d[None, :]
        v_ptrs = v_base + (blk * stride_vb + row * stride_vt)[:, None] + offs_d[None, :]
        if ON_DIAGONAL:
            kv_mask = n_mask[:, None]
            if BLOCK_D != HEAD_DIM:
                kv_mask = kv_mask & (offs_d < HEAD_DIM)[None, :]
            k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
        elif BLOCK_D != HEAD_DIM:
            kv_mask = (offs_d < HEAD_DIM)[None, :]
            k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
        else:
            k = tl.load(k_ptrs)
        qk = _mma(q, tl.trans(k), None, DOT_MODE)
        if ON_DIAGONAL:
            # the tiling mask: key position <= query position (also drops keys past hi)
            qk = tl.where(pos[None, :] <= q_pos[:, None], qk, float("-inf"))
        # scale inside the exponent: one FMA per score instead of a multiply and a subtract
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        p = tl.math.exp2(qk * qk_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if ON_DIAGONAL or BLOCK_D != HEAD_DIM:
            v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
        else:
            v = tl.load(v_ptrs)
        acc = _mma(_cast(p, v.dtype, DOT_MODE), v, acc, DOT_MODE)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _prefill_kernel(
    Q,
    K,
    V,
    Out,
    Lse,
    QStart,
    SeqLens,
    BlockTables,
    Skip,
    qk_scale,
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
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PAGE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_MODE: tl.constexpr,
    CAUSAL: tl.constexpr,
    SKIP_OK: tl.constexpr,
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
    if SKIP_OK:  # noqa: SIM102 (a constexpr test around a load)
        if tl.load(Skip + b) != 0:  # the Hopper TMA kernel handled this sequence
            return
    seq_len = tl.load(SeqLens + b)
    ctx = seq_len - q_len  # keys already in the cache before this step's queries
    kvh = h // GROUP

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < q_len
    d_mask = offs_d < HEAD_DIM
    tok = (q_start + offs_m).to(tl.int64)

    # load q: it stays on chip for the whole key loop
    q_ptrs = Q + tok[:, None] * stride_qt + h * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=m_mask[:, None] & d_mask[None, :], other=0.0)
    if CAUSAL:
        q_pos = ctx + offs_m
    else:  # every query sees every key: the diagonal mask only drops keys past the end
        q_pos = tl.zeros([BLOCK_M], dtype=tl.int32) + (seq_len - 1)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    table = BlockTables + b.to(tl.int64) * stride_bt
    k_base = K + kvh * stride_kh
    v_base = V + kvh * stride_vh
    # keys [0, full_end) are seen by every row of this tile: no mask
    # the tile's last query sits at ctx + min(m0 + BLOCK_M, q_len) - 1
    if CAUSAL:
        full_end = ((ctx + m0 + 1) // BLOCK_N) * BLOCK_N
        hi = ctx + tl.minimum(m0 + BLOCK_M, q_len)
    else:
        full_end = (seq_len // BLOCK_N) * BLOCK_N
        hi = seq_len
    acc, l_i, m_i = _attend(
        acc, l_i, m_i, q, q_pos, table, k_base, v_base, stride_kb, stride_kt, stride_vb,
        stride_vt, 0, full_end, qk_scale, offs_n, offs_d,
        HEAD_DIM, BLOCK_D, PAGE, BLOCK_N, False, DOT_MODE,
    )  # fmt: skip
    acc, l_i, m_i = _attend(
        acc, l_i, m_i, q, q_pos, table, k_base, v_base, stride_kb, stride_kt, stride_vb,
        stride_vt, full_end, hi, qk_scale, offs_n, offs_d,
        HEAD_DIM, BLOCK_D, PAGE, BLOCK_N, True, DOT_MODE,
    )  # fmt: skip

    out = acc / l_i[:, None]
    o_ptrs = Out + tok[:, None] * stride_ot + h * stride_oh + offs_d[None, :]
    out = _cast(out, Out.dtype.element_ty, DOT_MODE)
    tl.store(o_ptrs, out, mask=m_mask[:, None] & d_mask[None, :])
    # natural-log LSE from the log2-domain running max and sum
    lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453
    tl.store(Lse + tok * stride_lt + h, lse, mask=m_mask)


def check_layout(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    """Shapes and dtypes the kernels rely on; raises ValueError naming what is off."""
    if q.dim() != 3 or k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(
            "expected q [T,Hq,D] and k/v caches [blocks,block_size,Hkv,D]; "
            f"got q {tuple(q.shape)}, "
            f"k {tuple(k_cache.shape)}, v {tuple(v_cache.shape)}"
        )
    if q.shape[1] % k_cache.shape[2] or q.shape[2] != k_cache.shape[3]:
        raise ValueError(
            f"query heads {q.shape[1]} must be a multiple of KV heads {k_cache.shape[2]} and head "
            f"dims must match ({q.shape[2]} vs {k_cache.shape[3]})"
        )
    if not (q.dtype == k_cache.dtype == v_cache.dtype):
        raise ValueError(f"q/k/v dtypes differ: {q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"dtype {q.dtype} not supported; use float16, bfloat16 or float32")
    if q.shape[2] > 256:
        raise ValueError(f"head dim {q.shape[2]} > 256 is not supported")
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("k/v caches must be contiguous in the head dimension")


def prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    max_query_len: int,
    scale: float,
    config: PrefillConfig | None = None,
    causal: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal paged attention for packed queries; returns ``(out [T,Hq,D], lse [T,Hq] fp32)``.

    ``causal=False``: every query sees all ``seq_lens[b]`` keys of its sequence, whatever its
    query length (a partial over blocks that lie before every query, e.g. host KV streamed in
    rounds); a sequence with no keys gets lse ``-inf`` (its output is undefined).
    """
    check_layout(q, k_cache, v_cache)
    if q.stride(-1) != 1:
        q = q.contiguous()
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[0], q.shape[1], dtype=torch.float32, device=q.device)
    launch_prefill(
        q, k_cache, v_cache, out, lse, query_start_loc, seq_lens, block_tables, max_query_len,
        scale, config, causal,
    )  # fmt: skip
    return out, lse


def launch_prefill(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    max_query_len: int,
    scale: float,
    config: PrefillConfig | None,
    causal: bool,
    skip_ok: torch.Tensor | None = None,
) -> None:
    """Run the kernel into ``out``/``lse``; sequences ``b`` with ``skip_ok[b] != 0`` are left
    alone (the Hopper TMA kernel wrote them)."""
    T, hq, d = q.shape
    _, page, hkv, _ = k_cache.shape
    num_seqs = seq_lens.shape[0]
    if T == 0 or num_seqs == 0:
        return
    cfg = config or default_prefill_config(d, q.dtype, q.device)
    grid = (hq * triton.cdiv(max_query_len, cfg.block_m), num_seqs)
    _prefill_kernel[grid](
        q, k_cache, v_cache, out, lse, query_start_loc, seq_lens, block_tables,
        seq_lens if skip_ok is None else skip_ok,
        scale * LOG2E,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        out.stride(0), out.stride(1), lse.stride(0), block_tables.stride(0),
        GROUP=hq // hkv,
        HEAD_DIM=d,
        BLOCK_D=max(16, triton.next_power_of_2(d)),
        PAGE=page,
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        DOT_MODE=dot_mode(q.dtype, q.device),
        CAUSAL=causal,
        SKIP_OK=skip_ok is not None,
        HQ=hq,
        HEAD_MAJOR=cfg.head_major,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )  # fmt: skip


__all__ = [
    "PrefillConfig",
    "check_layout",
    "default_prefill_config",
    "dot_mode",
    "launch_prefill",
    "prefill_attention",
]
