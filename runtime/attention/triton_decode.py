"""Split-KV flash-decoding over the paged KV cache (Triton): one query token per sequence.

Decode reads every key and value once and does little arithmetic on them, so it is bound by memory
bandwidth; the work is to keep enough loads in flight on every SM. The key range of each sequence
is cut into ``num_splits`` chunks of equal length, chosen from the longest sequence and the SM
count so that even a single long sequence spreads over the whole GPU. Program ``(split, kv head,
sequence)`` handles all query heads of one GQA group together (padded to the 16 rows a tensor-core
dot needs), so each K/V block is read from memory once per group, not once per query head.

Each program writes a partial output and its log-sum-exp; a second, small kernel merges the splits
of each (sequence, head) by log-sum-exp. With one split the first kernel writes the final result.

Inside a CUDA graph the launch grid is frozen at capture, so ``decode_attention`` also takes
``chunk_buffer``: the grid is then sized for a capacity (``max_seq_len`` is the longest sequence
the graph will ever see) and the keys per split program are read from that device tensor at run
time, so each replay splits the key range as an eager call for the step's real lengths would;
programs past a sequence's length exit at once and the combine merges only the splits that saw
keys (a sequence with no keys gets zeros and ``lse = -inf``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from runtime.attention.triton_prefill import LOG2E, _cast, _mma, check_layout, dot_mode
from runtime.device import multiprocessors


@dataclass(frozen=True)
class DecodeConfig:
    """Kernel tile and how finely to split the key range."""

    block_n: int
    num_warps: int
    num_stages: int
    programs_per_sm: int  # target number of split programs per SM (more: smaller tail wave)
    min_chunk: int  # fewest keys one split program handles
    # split programs one SM holds at once (shared memory: stages x block_n x D x 2 bytes x K,V);
    # > 0: fewer splits when that fills the last wave of programs better (see choose_num_splits)
    resident_per_sm: int = 0
    # launch order: False runs a (KV head, sequence)'s splits side by side; True runs the KV
    # heads of one (split, sequence) side by side, so that programs resident together read
    # neighbouring 256-byte pieces of the same cache rows (a page's tokens are Hkv * D wide)
    heads_inner: bool = False
    # sm_90: a split program whose pages run in consecutive blocks reads its key tiles as TMA
    # boxes (triton_decode_hopper), one whose pages do not gathers them; launches splits outer
    tma: bool = False
    # fewest splits per (sequence, KV head) where the keys allow: one split program per pair ran
    # the TMA kernel 7 % slower than two for 16 sequences x 32 KV heads at 8K on an H100
    min_splits: int = 1

    def __post_init__(self) -> None:
        if self.tma and self.heads_inner:
            raise ValueError(
                "DecodeConfig.heads_inner: the TMA kernel launches splits outer; "
                "set heads_inner=False or tma=False"
            )


# bf16/fp16, head dim <= 128. The H100 sweep of 2026-11-25 19:50 (scripts/bench_attention.py)
# picked min_chunk 256 over 1024 (a 4K context at batch 1 then has 16 splits per head, not 4);
# the H200 sweep of 2026-12-04 (attention-decode-sweep-nvidia-h200.json) picked fuller last waves
# for GQA (two resident programs per SM: 16 x 128K keys at 4.40 TB/s against 3.71). Sweeps over
# forced split counts the same day (bench_attention.py --splits-only, batch 1, 4 and 16 at 8K to
# 128K, 8 and 32 KV heads: attention-splits{,-mha}-nvidia-h200.json) found about two waves of
# split programs (~512 on 132 SMs) best in every case, hence 4 programs per SM, not 8, for MHA
# as for GQA (batch 1 at 32K with 8 KV heads: 52.3 us with 64 splits against 60.2 with 86;
# batch 4 at 32K with 32: 501 us with 4 against 592 with 9). Merging the splits inside the split
# kernel (the last program of each group, found by an atomic count) instead of in a second
# kernel was slower for GQA (28.1 against 23.3 us at batch 1, 8K): one program then merges a
# group's four heads in turn, where the combine kernel runs one per head.
DECODE_D128 = DecodeConfig(
    block_n=64, num_warps=4, num_stages=3, programs_per_sm=4, min_chunk=256, resident_per_sm=2
)


# sm_90, float16/bfloat16, head dim 64 or 128: TMA key tiles where a split program's pages run in
# order (triton_decode_hopper), with half the split programs per SM (about 4K keys each at long
# contexts). H100, 2026-12-05, CUDA graphs, in-order pages, the memory SDPA flash reads
# (attention-decode-tma-sweep-nvidia-h100-80gb-hbm3.json): 8 KV heads at batch 16, 1.006 / 1.014 /
# 1.011x SDPA flash at 8K / 32K / 128K where the gather default (DECODE_D128) reached 0.982 /
# 0.986 / 0.990x; 2K-key programs (4 per SM) ran the TMA kernel 6-9 % slower. Shuffled pages are
# gathered, with this plan 1-2 % slower than with the gather default's.
DECODE_TMA_D128 = DecodeConfig(
    block_n=64,
    num_warps=4,
    num_stages=3,
    programs_per_sm=2,
    min_chunk=256,
    resident_per_sm=2,
    tma=True,
    min_splits=2,
)


def default_decode_config(head_dim: int, dtype: torch.dtype, device: torch.device) -> DecodeConfig:
    """Chosen by scripts/bench_attention.py's sweeps (above), the same for MHA and GQA caches;
    small tiles in the interpreter."""
    if device.type != "cuda":
        return DecodeConfig(block_n=32, num_warps=4, num_stages=1, programs_per_sm=2, min_chunk=64)
    if dtype == torch.float32 or head_dim > 128:
        return DecodeConfig(
            block_n=32, num_warps=4, num_stages=2, programs_per_sm=8, min_chunk=1024
        )
    if head_dim in (64, 128) and _has_tma(device.index):
        return DECODE_TMA_D128
    return DECODE_D128


@functools.cache
def _gather_twin(cfg: DecodeConfig) -> DecodeConfig:
    return dataclasses.replace(cfg, tma=False)


@functools.cache
def _has_tma(index: int | None) -> bool:
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available() and torch.cuda.get_device_capability(index) >= (9, 0)


def _cdiv(a: int, b: int) -> int:
    # host arithmetic on every decode step (graph replays included): triton.cdiv is a
    # ConstexprFunction whose call costs ~2.6 us, ten of them a step
    return -(-a // b)


@functools.cache
def _sm_count(device_type: str, index: int | None) -> int:
    if device_type == "cuda":
        return multiprocessors(torch.device("cuda", index))
    return 4  # the interpreter: a pretend GPU small enough that tests see several splits


def choose_num_splits(
    num_seqs: int, num_kv_heads: int, max_seq_len: int, device: torch.device, cfg: DecodeConfig
) -> int:
    """Splits per sequence so that ``num_seqs * num_kv_heads * splits`` fills the GPU."""
    sms = _sm_count(device.type, device.index)
    pairs = max(1, num_seqs * num_kv_heads)
    want = _cdiv(sms * cfg.programs_per_sm, pairs)
    by_len = _cdiv(max_seq_len, cfg.min_chunk)
    splits = max(1, min(want, by_len, 256))
    if cfg.resident_per_sm > 0 and splits > 1:
        splits = _fullest_waves(splits, pairs, sms * cfg.resident_per_sm)
    return max(splits, min(cfg.min_splits, by_len))


@functools.lru_cache(maxsize=4096)
def _fullest_waves(splits: int, pairs: int, slots: int) -> int:
    """Equal-length programs run in waves of ``slots``; a last wave 1/3 full costs as much as a
    full one (16 sequences x 8 KV heads x 9 splits = 4.4 waves of 264 on an H100, where 8 splits
    make 3.9). The fullest waves from half the splits up, then the most splits. Cached: every
    decode step asks, graph replays included, and the answer changes only with ``splits``."""

    def fill(n: int) -> float:
        waves = pairs * n / slots
        return waves / math.ceil(waves)

    return max(range(max(1, splits // 2), splits + 1), key=lambda n: (round(fill(n), 2), n))


@triton.jit
def _decode_split_kernel(
    Q,
    K,
    V,
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
    stride_ps,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PAGE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SINGLE: tl.constexpr,
    DOT_MODE: tl.constexpr,
    CHUNK_FROM_PTR: tl.constexpr,
    PAGED_TABLE: tl.constexpr,
    HEADS_INNER: tl.constexpr,
):
    if HEADS_INNER:
        kvh = tl.program_id(0)
        s = tl.program_id(1)
    else:
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
    offs_d = tl.arange(0, BLOCK_D)
    g_mask = offs_g < GROUP
    heads = kvh * GROUP + offs_g
    # load the group's queries: they stay on chip for the whole key loop
    q_ptrs = Q + b.to(tl.int64) * stride_qt + heads[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=g_mask[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)

    m_i = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([GROUP_PAD, BLOCK_D], dtype=tl.float32)
    table = BlockTables + b.to(tl.int64) * stride_bt
    acc, l_i, m_i = _attend_gather(
        acc, l_i, m_i, q, table, K + kvh * stride_kh, V + kvh * stride_vh, lo, hi, qk_scale,
        stride_kb, stride_kt, stride_vb, stride_vt,
        HEAD_DIM, BLOCK_D, PAGE, BLOCK_N, DOT_MODE, PAGED_TABLE,
    )  # fmt: skip
    _store_split(
        acc, l_i, m_i, heads, g_mask, b, s, Out, Lse, PartOut, PartLse,
        stride_ot, stride_oh, stride_lt, stride_pb, stride_ph, stride_ps,
        HEAD_DIM, BLOCK_D, SINGLE, DOT_MODE,
    )  # fmt: skip


@triton.jit
def _online_update(acc, l_i, m_i, qk, v, qk_scale, DOT_MODE: tl.constexpr):
    """One key tile of the online softmax, log2 domain; ``qk`` holds -inf where keys are masked."""
    m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    p = tl.math.exp2(qk * qk_scale - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = _mma(_cast(p, v.dtype, DOT_MODE), v, acc, DOT_MODE)
    return acc, l_i, m_new


@triton.jit
def _attend_gather(
    acc,
    l_i,
    m_i,
    q,
    table,
    k_base,
    v_base,
    lo,
    hi,
    qk_scale,
    stride_kb,
    stride_kt,
    stride_vb,
    stride_vt,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PAGE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_MODE: tl.constexpr,
    PAGED_TABLE: tl.constexpr,
):
    """Keys ``[lo, hi)`` of one KV head, each tile's rows gathered by pointer from its pages."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    for start_n in range(lo, hi, BLOCK_N):
        pos = start_n + offs_n
        n_mask = pos < hi
        if PAGED_TABLE:
            # one table entry per page, spread over its rows: 4 loads a 64-key tile, not 64
            # (graph-replayed on an H200: +0.2 to +3.7 % of K/V bandwidth, batch 1 at 8K most)
            pg = start_n // PAGE + tl.arange(0, BLOCK_N // PAGE)
            pblk = tl.load(table + pg, mask=pg * PAGE < hi, other=0).to(tl.int64)
            blk = tl.reshape(tl.broadcast_to(pblk[:, None], [BLOCK_N // PAGE, PAGE]), [BLOCK_N])
        else:  # pages that do not tile BLOCK_N: an entry per key
            blk = tl.load(table + pos // PAGE, mask=n_mask, other=0).to(tl.int64)
        row = pos % PAGE
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k_ptrs = k_base + (blk * stride_kb + row * stride_kt)[:, None] + offs_d[None, :]
        k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
        v_ptrs = v_base + (blk * stride_vb + row * stride_vt)[:, None] + offs_d[None, :]
        v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
        qk = _mma(q, tl.trans(k), None, DOT_MODE)
        qk = tl.where(n_mask[None, :], qk, float("-inf"))
        acc, l_i, m_i = _online_update(acc, l_i, m_i, qk, v, qk_scale, DOT_MODE)
    return acc, l_i, m_i


@triton.jit
def _store_split(
    acc,
    l_i,
    m_i,
    heads,
    g_mask,
    b,
    s,
    Out,
    Lse,
    PartOut,
    PartLse,
    stride_ot,
    stride_oh,
    stride_lt,
    stride_pb,
    stride_ph,
    stride_ps,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SINGLE: tl.constexpr,
    DOT_MODE: tl.constexpr,
):
    """The group's result: final (one split) or partial, with its log-sum-exp (log2 domain for
    the combine kernel)."""
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    out = acc / l_i[:, None]
    lse2 = m_i + tl.math.log2(l_i)  # log2 domain
    if SINGLE:
        o_ptrs = Out + b.to(tl.int64) * stride_ot + heads[:, None] * stride_oh + offs_d[None, :]
        tl.store(
            o_ptrs,
            _cast(out, Out.dtype.element_ty, DOT_MODE),
            mask=g_mask[:, None] & d_mask[None, :],
        )
        tl.store(Lse + b.to(tl.int64) * stride_lt + heads, lse2 * 0.6931471805599453, mask=g_mask)
    else:
        p_off = b.to(tl.int64) * stride_pb + heads * stride_ph + s * stride_ps
        tl.store(
            PartOut + p_off[:, None] * BLOCK_D + offs_d[None, :],
            out,
            mask=g_mask[:, None] & d_mask[None, :],
        )
        tl.store(PartLse + p_off, lse2, mask=g_mask)


@triton.jit
def _decode_combine_kernel(
    Out,
    Lse,
    PartOut,
    PartLse,
    SeqLens,
    ChunkPtr,
    chunk,
    stride_ot,
    stride_oh,
    stride_lt,
    stride_pb,
    stride_ph,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
    DOT_MODE: tl.constexpr,
    CHUNK_FROM_PTR: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    seq_len = tl.load(SeqLens + b)
    if CHUNK_FROM_PTR:
        chunk = tl.load(ChunkPtr)
    n_splits = tl.cdiv(seq_len, chunk)  # splits that saw at least one key
    offs_s = tl.arange(0, SPLITS_PAD)
    offs_d = tl.arange(0, BLOCK_D)
    base = b.to(tl.int64) * stride_pb + h * stride_ph
    # pass 1: the largest split LSE, so that the weights cannot overflow
    m = tl.full([SPLITS_PAD], float("-inf"), dtype=tl.float32)
    for s0 in range(0, n_splits, SPLITS_PAD):
        lse2 = tl.load(
            PartLse + base + s0 + offs_s, mask=s0 + offs_s < n_splits, other=float("-inf")
        )
        m = tl.maximum(m, lse2)
    m_all = tl.max(m, 0)
    # pass 2: weighted sum of the partial outputs
    denom = tl.zeros([SPLITS_PAD], dtype=tl.float32)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for s0 in range(0, n_splits, SPLITS_PAD):
        s_mask = s0 + offs_s < n_splits
        lse2 = tl.load(PartLse + base + s0 + offs_s, mask=s_mask, other=float("-inf"))
        w = tl.where(s_mask, tl.math.exp2(lse2 - m_all), 0.0)
        denom += w
        parts = tl.load(
            PartOut + (base + s0 + offs_s)[:, None] * BLOCK_D + offs_d[None, :],
            mask=s_mask[:, None],
            other=0.0,
        )
        acc += tl.sum(parts * w[:, None], 0)
    total = tl.sum(denom, 0)
    # no split saw a key (a padding row of a graph batch, seq_len 0): zeros and lse = -inf
    out = acc / tl.where(total > 0, total, 1.0)
    tl.store(
        Out + b.to(tl.int64) * stride_ot + h * stride_oh + offs_d,
        _cast(out, Out.dtype.element_ty, DOT_MODE),
        mask=offs_d < HEAD_DIM,
    )
    lse = (m_all + tl.math.log2(total)) * 0.6931471805599453
    tl.store(Lse + b.to(tl.int64) * stride_lt + h, lse)


def split_plan(
    num_seqs: int,
    num_kv_heads: int,
    max_seq_len: int,
    device: torch.device,
    cfg: DecodeConfig,
    num_splits: int | None = None,
) -> tuple[int, int]:
    """``(chunk, splits)``: keys per split program (a multiple of ``block_n``) and how many split
    programs per (sequence, KV head) it takes to cover ``max_seq_len`` keys."""
    if num_splits is None:
        num_splits = choose_num_splits(num_seqs, num_kv_heads, max_seq_len, device, cfg)
    n = max(max_seq_len, 1)
    chunk = _cdiv(_cdiv(n, num_splits), cfg.block_n) * cfg.block_n
    return chunk, _cdiv(n, chunk)


def _launch_split(
    q, k_cache, v_cache, out, lse, part_out, part_lse, seq_lens, block_tables, chunk_buffer,
    qk_scale, chunk, num_splits, cfg, single, from_ptr, stride_pb, stride_ph,
) -> None:  # fmt: skip
    """The gather split kernel over the grid of ``cfg``'s launch order."""
    B, hq, d = q.shape
    _, page, hkv, _ = k_cache.shape
    group = hq // hkv
    block_d = max(16, triton.next_power_of_2(d))
    grid = (hkv, num_splits, B) if cfg.heads_inner else (num_splits, hkv, B)
    _decode_split_kernel[grid](
        q, k_cache, v_cache, out, lse, part_out, part_lse, seq_lens, block_tables, chunk_buffer,
        qk_scale, chunk,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        out.stride(0), out.stride(1), lse.stride(0), block_tables.stride(0),
        stride_pb, stride_ph, 1,
        GROUP=group,
        GROUP_PAD=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=d,
        BLOCK_D=block_d,
        PAGE=page,
        BLOCK_N=cfg.block_n,
        SINGLE=single,
        DOT_MODE=dot_mode(q.dtype, q.device),
        CHUNK_FROM_PTR=from_ptr,
        # whole power-of-two pages per tile (tiles start at multiples of BLOCK_N: chunk is one)
        PAGED_TABLE=cfg.block_n % page == 0 and page & (page - 1) == 0,
        HEADS_INNER=cfg.heads_inner,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )  # fmt: skip


def _tma_applies(q, k_cache, v_cache, cfg: DecodeConfig, explicit: bool) -> bool:
    """Whether ``cfg.tma`` can take the TMA kernel here; a config the caller passed that cannot
    raises naming why, the default falls back to the gather kernel (same split plan)."""
    from runtime.attention import triton_decode_hopper

    reason = triton_decode_hopper.unsupported_reason(q, k_cache, v_cache, cfg.block_n)
    if reason is not None and explicit:
        raise ValueError(f"DecodeConfig.tma: {reason}; use tma=False")
    return reason is None


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    max_seq_len: int,
    scale: float,
    config: DecodeConfig | None = None,
    num_splits: int | None = None,
    chunk_buffer: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One query per sequence (``q`` is ``[B,Hq,D]``); returns ``(out [B,Hq,D], lse [B,Hq])``.

    ``chunk_buffer`` (int32 ``[1]`` on the device; for CUDA graphs): the launch grid is sized for
    ``max_seq_len`` taken as a capacity, and the keys per split program are read from the buffer
    when the kernels run. Whoever fills it must keep ``cdiv(longest seq_len, chunk)`` within that
    grid (``split_plan`` for the same ``B`` and the real longest length does) and ``chunk`` a
    multiple of the config's ``block_n``.
    """
    check_layout(q, k_cache, v_cache)
    if q.stride(-1) != 1:
        q = q.contiguous()
    B, hq, d = q.shape
    hkv = k_cache.shape[2]
    if seq_lens.shape[0] != B:
        raise ValueError(
            f"decode needs one query per sequence: {B} queries, {seq_lens.shape[0]} seqs"
        )
    out = torch.empty_like(q)
    lse = torch.empty(B, hq, dtype=torch.float32, device=q.device)
    if B == 0:
        return out, lse
    cfg = config or default_decode_config(d, q.dtype, q.device)
    if config is None and cfg.tma and chunk_buffer is None:
        # an eager call of the default: launching with TMA descriptors cost more host time (H100,
        # batch 1 at 8K with 8 KV heads: 174 us a call against 44 for the gather kernel, the same
        # 27 us replayed), so eager steps gather; captured steps (graph replays, which have no
        # host time) take the TMA kernel. Same split plan: the TMA loop and the gather loop sum
        # alike, so an eager step gives a replayed one's bits
        cfg = _gather_twin(cfg)
    block_d = max(16, triton.next_power_of_2(d))
    chunk, num_splits = split_plan(B, hkv, max_seq_len, q.device, cfg, num_splits)
    from_ptr = chunk_buffer is not None
    if from_ptr:
        if chunk_buffer.dtype != torch.int32 or chunk_buffer.device != q.device:
            raise ValueError("chunk_buffer must be an int32 tensor on the queries' device")
        chunk = 0  # unused: the kernels read chunk_buffer
    else:
        chunk_buffer = seq_lens  # unused
    single = num_splits == 1
    if single:
        part_out = part_lse = out  # unused
        stride_pb = stride_ph = 0
    else:
        part_out = torch.empty(B, hq, num_splits, block_d, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(B, hq, num_splits, dtype=torch.float32, device=q.device)
        stride_pb, stride_ph = part_lse.stride(0), part_lse.stride(1)
    if cfg.tma and _tma_applies(q, k_cache, v_cache, cfg, explicit=config is not None):
        from runtime.attention import triton_decode_hopper

        triton_decode_hopper.launch_split_tma(
            q, k_cache, v_cache, out, lse, part_out, part_lse, seq_lens, block_tables,
            chunk_buffer, scale * LOG2E, chunk, num_splits, cfg, single, from_ptr,
        )  # fmt: skip
    else:
        _launch_split(
            q, k_cache, v_cache, out, lse, part_out, part_lse, seq_lens, block_tables,
            chunk_buffer, scale * LOG2E, chunk, num_splits, cfg, single, from_ptr,
            stride_pb, stride_ph,
        )  # fmt: skip
    if not single:
        splits_pad = min(128, max(2, triton.next_power_of_2(num_splits)))
        _decode_combine_kernel[(B, hq)](
            out, lse, part_out, part_lse, seq_lens, chunk_buffer, chunk,
            out.stride(0), out.stride(1), lse.stride(0), stride_pb, stride_ph,
            HEAD_DIM=d,
            BLOCK_D=block_d,
            # all splits in one tile up to 128: one round of loads instead of a loop of them
            # (B=1 with GQA has ~128 splits and only B * Hq combine programs)
            SPLITS_PAD=splits_pad,
            DOT_MODE=dot_mode(q.dtype, q.device),
            CHUNK_FROM_PTR=from_ptr,
            num_warps=4 if splits_pad <= 32 else 8,
        )  # fmt: skip
    return out, lse


__all__ = [
    "DECODE_D128",
    "DECODE_TMA_D128",
    "DecodeConfig",
    "choose_num_splits",
    "decode_attention",
    "default_decode_config",
    "split_plan",
]
