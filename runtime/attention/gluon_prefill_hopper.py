"""FA3-style causal paged prefill for Hopper in Gluon (the triton backend's "gluon" prefill path).

Issue #13 asks for ~600 TFLOP/s; the Triton TMA kernel (``triton_prefill_hopper``) stops near 500
because one warp group runs the two products and the softmax of a tile in turn, and Triton's
warp-specialised loop does not compile for it. Gluon (Triton's lower-level language) states the
schedule itself, as FlashAttention-3 does:

* a producer warp issues the K and V tile copies by TMA into a two-stage ring, with mbarriers
  for "ready" (the copy landed) and "empty" (both consumers are done with the stage);
* two consumer warp groups each own 64 query rows of a 128-row tile, and share every K/V tile;
* inside each consumer the scores of tile j+1 are issued (asynchronous wgmma) before the P V
  product of tile j, so the tensor cores work while the warps compute exponentials
  (FA-3's intra-warp-group overlap); FA-3's ping-pong between the two groups (mbarrier turns)
  is there too (``pingpong=True``), off by default: it did not pay on the H100.

Same arguments and results as ``triton_prefill_hopper.prefill_attention_hopper`` for what it
covers (``unsupported_reason``): causal, head dim 128, bf16/fp16, sm_90. Sequences whose 128-key
boxes are not consecutive pages are found on the device and left to the gather kernel. Cache
rows past a sequence's end inside its last box (stale, or never written: the cache comes from
``torch.empty``) are masked in the scores and zeroed in V by the producer before the last P V
reads them (wgmma reads V from shared memory, where the Triton kernel zeroes it in registers).

Gluon is experimental and its API moves between Triton releases: this builds with Triton 3.6 (the
lent GPUs' torch 2.11) and 3.9 (which calls the TMA copy ``tma.async_load`` and raises on 3.6's
name, hence ``_tma_load``).

Status: 168 registers, no spills, 160 KiB shared for sm_90a. On the H100 (2026-12-05) it passes
``tests/test_gluon_prefill.py`` (float64 reference) and runs at 628 / 640 / 624 TFLOP/s at 16K /
32K / 64K against cuDNN's 601 / 585 / 609 and the TMA kernel's 431 / 505 / 505
(``scripts/bench_gluon_prefill.py``). The triton backend's default where it applies
(``triton_backend.GLUON_BY_DEFAULT``) since the 7B shape's 32K prefill ran 1.10x the TMA kernel's
end to end; ``TILERUN_PREFILL_PATH=hopper`` takes the TMA kernel instead.
"""

import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)

LOG2E = 1.4426950408889634
# Triton 3.9 calls the TMA copy ``async_load`` (and raises on the old name); 3.6 has only the old
_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared


@gluon.jit
def _producer(
    k_desc,
    v_desc,
    k_bufs,
    v_bufs,
    k_ready,
    v_ready,
    k_empty,
    v_empty,
    table,
    n_tiles,
    col,
    seq_len,
    v_fixed,
    PAGE: gl.constexpr,
    BLOCK_N: gl.constexpr,
    STAGES: gl.constexpr,
):
    for j in range(n_tiles):
        s = j % STAGES
        ph = (j // STAGES) & 1
        start = j * BLOCK_N
        row = gl.load(table + start // PAGE) * PAGE + start % PAGE
        mbarrier.wait(k_empty.index(s), ph ^ 1)
        mbarrier.expect(k_ready.index(s), k_desc.block_type.nbytes)
        _tma_load(k_desc, [row, col], k_ready.index(s), k_bufs.index(s))
        mbarrier.wait(v_empty.index(s), ph ^ 1)
        mbarrier.expect(v_ready.index(s), v_desc.block_type.nbytes)
        _tma_load(v_desc, [row, col], v_ready.index(s), v_bufs.index(s))
    # The last tile's box may hold cache rows past the sequence: stale, possibly never written
    # (the cache comes from torch.empty). Their scores are masked, but P V would still multiply
    # 0 by whatever they hold, NaN included. So this warp zeroes those rows of V in shared
    # memory once the copy has landed, then tells the consumers (who wait on v_fixed, not
    # v_ready, for that tile). 8 rows at a time: the 128-byte swizzle repeats every 8 rows.
    last = n_tiles - 1
    valid = seq_len - last * BLOCK_N
    if valid < BLOCK_N:
        s = last % STAGES
        mbarrier.wait(v_ready.index(s), (last // STAGES) & 1)
        ROWS: gl.constexpr = gl.BlockedLayout([1, 8], [2, 16], [1, 1], [1, 0])
        buf = v_bufs.index(s)
        for r in gl.static_range(0, BLOCK_N, 8):
            if r + 8 > valid:
                piece = buf.slice(r, 8, dim=0)
                x = piece.load(ROWS)
                rid = r + gl.arange(0, 8, layout=gl.SliceLayout(1, ROWS))
                piece.store(gl.where((rid < valid)[:, None], x, gl.zeros_like(x)))
        fence_async_shared()
        mbarrier.arrive(v_fixed, count=1)


@gluon.jit
def _wait_v(v_ready, v_fixed, t, n_total, fix_last, STAGES: gl.constexpr):
    """Wait until V tile ``t`` may be read: landed, and for the last tile, zeroed past the
    sequence when the producer had to (``fix_last``)."""
    if fix_last and t == n_total - 1:
        mbarrier.wait(v_fixed, 0)
    else:
        mbarrier.wait(v_ready.index(t % STAGES), (t // STAGES) & 1)


@gluon.jit
def _softmax(
    s_acc,
    m_i,
    l_i,
    q_pos,
    start,
    qk_scale,
    MASK: gl.constexpr,
    S_LAYOUT: gl.constexpr,
    BLOCK_N: gl.constexpr,
):
    if MASK:
        pos = start + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, S_LAYOUT))
        s_acc = gl.where(pos[None, :] <= q_pos[:, None], s_acc, float("-inf"))
    m_new = gl.maximum(m_i, gl.max(s_acc, 1) * qk_scale)
    p = gl.exp2(s_acc * qk_scale - m_new[:, None])
    alpha = gl.exp2(m_i - m_new)
    l_i = l_i * alpha + gl.sum(p, 1)
    return p, m_new, l_i, alpha


@gluon.jit
def _consumer(
    q_desc,
    k_bufs,
    v_bufs,
    k_ready,
    v_ready,
    k_empty,
    v_empty,
    Out,
    Lse,
    q_start,
    q_len,
    ctx,
    r0,
    col_q,
    h,
    qk_scale,
    n_total,
    turns,
    n_turns,
    v_fixed,
    fix_last,
    stride_ot,
    stride_oh,
    stride_lt,
    HEAD_DIM: gl.constexpr,
    BLOCK_M: gl.constexpr,
    BLOCK_N: gl.constexpr,
    STAGES: gl.constexpr,
    WG: gl.constexpr,
    PINGPONG: gl.constexpr,
):
    # one warp group, BLOCK_M (64) query rows starting at r0 of this sequence's chunk
    S_LAYOUT: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_N, 16]
    )
    O_LAYOUT: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, HEAD_DIM, 16]
    )
    P_LAYOUT: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=O_LAYOUT, k_width=2)
    ROW_S: gl.constexpr = gl.SliceLayout(1, S_LAYOUT)
    ROW_O: gl.constexpr = gl.SliceLayout(1, O_LAYOUT)
    dtype: gl.constexpr = q_desc.dtype

    hi = ctx + gl.minimum(r0 + BLOCK_M, q_len)  # keys the last valid row sees
    n_tiles = gl.cdiv(hi, BLOCK_N)
    n_full = (ctx + r0 + 1) // BLOCK_N  # tiles every row sees whole
    if r0 >= q_len:
        n_tiles = 0
    rows = r0 + gl.arange(0, BLOCK_M, layout=ROW_S)
    q_pos = gl.minimum(ctx + rows, hi - 1)  # clipped: keys past the sequence are masked

    q_smem = gl.allocate_shared_memory(dtype, q_desc.block_type.shape, q_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    mbarrier.expect(q_bar, q_desc.block_type.nbytes)
    _tma_load(q_desc, [q_start + r0, col_q], q_bar, q_smem)
    mbarrier.wait(q_bar, 0)

    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, ROW_S)
    l_i = gl.zeros([BLOCK_M], gl.float32, ROW_S)
    o = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, O_LAYOUT)
    s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, S_LAYOUT)

    if n_tiles > 0:
        # tile 0: scores, softmax
        mbarrier.wait(k_ready.index(0), 0)
        s_tok = warpgroup_mma(
            q_smem, k_bufs.index(0).permute((1, 0)), s_zero, use_acc=False, is_async=True
        )
        s_acc = warpgroup_mma_wait(0, deps=(s_tok,))
        mbarrier.arrive(k_empty.index(0), count=1)
        if n_full > 0:
            p, m_i, l_i, alpha = _softmax(
                s_acc, m_i, l_i, q_pos, 0, qk_scale, False, S_LAYOUT, BLOCK_N
            )
        else:
            p, m_i, l_i, alpha = _softmax(
                s_acc, m_i, l_i, q_pos, 0, qk_scale, True, S_LAYOUT, BLOCK_N
            )
        p_op = gl.convert_layout(p.to(dtype), P_LAYOUT)
        for j in range(1, n_tiles):
            s = j % STAGES
            ph = (j // STAGES) & 1
            sp = (j - 1) % STAGES
            # issue the next scores, then the previous tile's P V: the tensor cores work on
            # both while this warp group waits for the scores and computes their softmax
            mbarrier.wait(k_ready.index(s), ph)
            _wait_v(v_ready, v_fixed, j - 1, n_total, fix_last, STAGES)
            if PINGPONG:  # noqa: SIM102 (a constexpr test around a runtime one)
                # FA-3's ping-pong: the warp groups take turns to issue their products, so one
                # group's exponentials run under the other's matrix products
                if j <= n_turns:
                    mbarrier.wait(turns.index(WG), (j - 1) & 1)
            s_tok = warpgroup_mma(
                q_smem, k_bufs.index(s).permute((1, 0)), s_zero, use_acc=False, is_async=True
            )
            o_tok = warpgroup_mma(p_op, v_bufs.index(sp), o, is_async=True)
            if PINGPONG:  # noqa: SIM102
                if j <= n_turns:
                    mbarrier.arrive(turns.index(1 - WG), count=1)
            s_acc = warpgroup_mma_wait(1, deps=(s_tok,))
            mbarrier.arrive(k_empty.index(s), count=1)
            if j < n_full:
                p, m_i, l_i, alpha = _softmax(
                    s_acc, m_i, l_i, q_pos, j * BLOCK_N, qk_scale, False, S_LAYOUT, BLOCK_N
                )
            else:
                p, m_i, l_i, alpha = _softmax(
                    s_acc, m_i, l_i, q_pos, j * BLOCK_N, qk_scale, True, S_LAYOUT, BLOCK_N
                )
            # p_op is read by the P V product in flight: keep it alive until that ends
            o, p_op = warpgroup_mma_wait(0, deps=(o_tok, p_op))
            mbarrier.arrive(v_empty.index(sp), count=1)
            o = o * gl.convert_layout(alpha, ROW_O)[:, None]
            p_op = gl.convert_layout(p.to(dtype), P_LAYOUT)
        sl = (n_tiles - 1) % STAGES
        _wait_v(v_ready, v_fixed, n_tiles - 1, n_total, fix_last, STAGES)
        o_tok = warpgroup_mma(p_op, v_bufs.index(sl), o, is_async=True)
        o, p_op = warpgroup_mma_wait(0, deps=(o_tok, p_op))
        mbarrier.arrive(v_empty.index(sl), count=1)
    # tiles the producer loads for the other warp group only: release them too (each stage's
    # empty barriers count both warp groups), in order, so that no phase is skipped
    for j in range(n_tiles, n_total):
        s = j % STAGES
        ph = (j // STAGES) & 1
        mbarrier.wait(k_ready.index(s), ph)
        mbarrier.arrive(k_empty.index(s), count=1)
        mbarrier.wait(v_ready.index(s), ph)
        mbarrier.arrive(v_empty.index(s), count=1)

    l_o = gl.convert_layout(l_i, ROW_O)
    out = o / gl.where(l_o > 0, l_o, 1.0)[:, None]
    orow = r0 + gl.arange(0, BLOCK_M, layout=ROW_O)
    ocol = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, O_LAYOUT))
    tok = (q_start + orow).to(gl.int64)
    gl.store(
        Out + tok[:, None] * stride_ot + h * stride_oh + ocol[None, :],
        out.to(dtype),
        mask=(orow < q_len)[:, None],
    )
    lse = (m_i + gl.log2(l_i)) * 0.6931471805599453
    ltok = (q_start + rows).to(gl.int64)
    gl.store(Lse + ltok * stride_lt + h, lse, mask=rows < q_len)


# the block-table width varies with the longest prompt in a batch; specialised (== 1, % 16) it
# would compile up to three kernels of ~3 s each as prompt lengths vary
@gluon.jit(do_not_specialize=["stride_bt"])
def fa3_prefill_kernel(
    q_desc,
    k_desc,
    v_desc,
    Out,
    Lse,
    QStart,
    SeqLens,
    BlockTables,
    Ok,
    qk_scale,
    stride_ot,
    stride_oh,
    stride_lt,
    stride_bt,
    HQ: gl.constexpr,
    GROUP: gl.constexpr,
    HEAD_DIM: gl.constexpr,
    PAGE: gl.constexpr,
    BLOCK_M: gl.constexpr,
    BLOCK_N: gl.constexpr,
    STAGES: gl.constexpr,
    CONSUMER_REGS: gl.constexpr,
    PRODUCER_REGS: gl.constexpr,
    PINGPONG: gl.constexpr,
    CHECK_RUNS: gl.constexpr,
):
    # program: (query head, tile of 2 x BLOCK_M rows), heads major, heaviest tiles first
    # (the tile count comes from the grid, not an argument: Triton specialises integer arguments
    # on divisibility by 16, so a count that changes with the prompt length would recompile the
    # kernel, seconds each time, between a short prompt and a long one)
    n_mtiles = gl.num_programs(0) // HQ
    pid = gl.program_id(0)
    h = pid // n_mtiles
    tile = n_mtiles - 1 - pid % n_mtiles
    b = gl.program_id(1)
    q_start = gl.load(QStart + b)
    q_len = gl.load(QStart + b + 1) - q_start
    m0 = tile * (2 * BLOCK_M)
    todo = m0 < q_len
    if CHECK_RUNS:  # pages not in consecutive 128-key runs: the gather kernel takes the sequence
        todo = todo & (gl.load(Ok + b) != 0)
    if todo:
        seq_len = gl.load(SeqLens + b)
        ctx = seq_len - q_len
        hi = ctx + gl.minimum(m0 + 2 * BLOCK_M, q_len)
        n_tiles = gl.cdiv(hi, BLOCK_N)  # the producer's; the second group's, >= the first's
        # ping-pong turns: the loop iterations (tiles after the first) both groups run
        n_first = gl.cdiv(ctx + gl.minimum(m0 + BLOCK_M, q_len), BLOCK_N)
        n_second = gl.where(m0 + BLOCK_M < q_len, n_tiles, 0)
        n_turns = gl.minimum(n_first, n_second) - 1
        table = BlockTables + b.to(gl.int64) * stride_bt
        col_kv = (h // GROUP) * HEAD_DIM
        col_q = h * HEAD_DIM

        k_bufs = gl.allocate_shared_memory(
            k_desc.dtype, [STAGES] + k_desc.block_type.shape, k_desc.layout
        )
        v_bufs = gl.allocate_shared_memory(
            v_desc.dtype, [STAGES] + v_desc.block_type.shape, v_desc.layout
        )
        k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        turns = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(k_ready.index(i), count=1)
            mbarrier.init(v_ready.index(i), count=1)
            mbarrier.init(k_empty.index(i), count=2)  # both consumer warp groups
            mbarrier.init(v_empty.index(i), count=2)
        v_fixed = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        mbarrier.init(v_fixed, count=1)
        fix_last = n_tiles * BLOCK_N > seq_len  # the last box reaches past the sequence
        mbarrier.init(turns.index(0), count=1)
        mbarrier.init(turns.index(1), count=1)
        mbarrier.arrive(turns.index(0), count=1)  # the first group goes first

        gl.warp_specialize(
            [
                (_consumer, (
                    q_desc, k_bufs, v_bufs, k_ready, v_ready, k_empty, v_empty, Out, Lse,
                    q_start, q_len, ctx, m0, col_q, h, qk_scale, n_tiles, turns, n_turns,
                    v_fixed, fix_last, stride_ot, stride_oh, stride_lt, HEAD_DIM, BLOCK_M,
                    BLOCK_N, STAGES, 0, PINGPONG,
                )),
                (_consumer, (  # the second warp group: the next BLOCK_M rows
                    q_desc, k_bufs, v_bufs, k_ready, v_ready, k_empty, v_empty, Out, Lse,
                    q_start, q_len, ctx, m0 + BLOCK_M, col_q, h, qk_scale, n_tiles, turns, n_turns,
                    v_fixed, fix_last, stride_ot, stride_oh, stride_lt, HEAD_DIM, BLOCK_M,
                    BLOCK_N, STAGES, 1, PINGPONG,
                )),
                (_producer, (
                    k_desc, v_desc, k_bufs, v_bufs, k_ready, v_ready, k_empty, v_empty,
                    table, n_tiles, col_kv, seq_len, v_fixed, PAGE, BLOCK_N, STAGES,
                )),
            ],
            [4, 1],
            [CONSUMER_REGS, PRODUCER_REGS],
        )  # fmt: skip


def unsupported_reason(q, k_cache, v_cache) -> str | None:
    """``None`` if this kernel handles these tensors on this machine, else why not (one line)."""
    import torch

    try:
        from triton.experimental.gluon.nvidia.hopper import TensorDescriptor  # noqa: F401
    except ImportError as e:  # pragma: no cover - depends on the Triton build
        return f"this Triton has no Gluon Hopper API ({e})"
    if q.device.type != "cuda":
        return f"it runs on CUDA devices of compute capability 9.0, not {q.device.type}"
    cap = torch.cuda.get_device_capability(q.device)
    if cap != (9, 0):  # wgmma and setmaxnreg are sm_90a instructions (not on sm_100 either)
        return f"compute capability {cap[0]}.{cap[1]}: the kernel is for 9.0 (Hopper)"
    if q.dtype not in (torch.float16, torch.bfloat16) or k_cache.dtype != q.dtype:
        return f"dtype {q.dtype} (cache {k_cache.dtype}): the kernel is for float16/bfloat16"
    d, page = q.shape[-1], k_cache.shape[1]
    if d != 128:
        return f"head dim {d}: the kernel is for 128 (the TMA kernel takes 64)"
    if 128 % page and page % 128:
        return f"block size {page}: needs one dividing 128 or a multiple of it"
    from runtime.attention.triton_prefill_hopper import cache_layout_reason

    return cache_layout_reason(k_cache, v_cache)


def prefill_attention_gluon(
    q,
    k_cache,
    v_cache,
    query_start_loc,
    seq_lens,
    block_tables,
    max_query_len: int,
    scale: float,
    stages: int = 2,
    consumer_regs: int = 232,
    producer_regs: int = 40,
    pingpong: bool = False,
):
    """Causal prefill; ``(out [T, Hq, D], lse [T, Hq])`` as the Triton kernels return them."""
    import torch
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    from runtime.attention import triton_prefill, triton_prefill_hopper

    reason = unsupported_reason(q, k_cache, v_cache)
    if reason is not None:
        raise ValueError(f"Gluon prefill kernel: {reason} (TILERUN_PREFILL_PATH=auto picks one)")
    T, hq, d = q.shape
    nb, page, hkv, _ = k_cache.shape
    q = q.contiguous()
    out = torch.empty_like(q)
    lse = torch.empty(T, hq, dtype=torch.float32, device=q.device)
    gdt = gl.bfloat16 if q.dtype == torch.bfloat16 else gl.float16
    block_m, block_n = 64, 128
    q_layout = gl.NVMMASharedLayout.get_default_for([block_m, d], gdt)
    kv_layout = gl.NVMMASharedLayout.get_default_for([block_n, d], gdt)
    q_desc = TensorDescriptor(q, [T, hq * d], [hq * d, 1], [block_m, d], q_layout)
    k_desc = TensorDescriptor(k_cache, [nb * page, hkv * d], [hkv * d, 1], [block_n, d], kv_layout)
    v_desc = TensorDescriptor(v_cache, [nb * page, hkv * d], [hkv * d, 1], [block_n, d], kv_layout)
    n_mtiles = triton.cdiv(max_query_len, 2 * block_m)
    num_seqs = seq_lens.shape[0]
    if T == 0 or num_seqs == 0:
        return out, lse
    check_runs = page < block_n  # pages of 128 or a multiple hold each box whole
    ok = (
        triton_prefill_hopper.runs_ok(seq_lens, block_tables, page, block_n)
        if check_runs
        else seq_lens
    )
    fa3_prefill_kernel[(hq * n_mtiles, num_seqs)](
        q_desc, k_desc, v_desc, out, lse, query_start_loc, seq_lens, block_tables, ok,
        scale * LOG2E, out.stride(0), out.stride(1), lse.stride(0), block_tables.stride(0),
        HQ=hq, GROUP=hq // hkv, HEAD_DIM=d, PAGE=page, BLOCK_M=block_m, BLOCK_N=block_n,
        STAGES=stages, CONSUMER_REGS=consumer_regs, PRODUCER_REGS=producer_regs,
        PINGPONG=pingpong, CHECK_RUNS=check_runs, num_warps=4,
    )  # fmt: skip
    if check_runs:  # the sequences this kernel skipped
        triton_prefill.launch_prefill(
            q, k_cache, v_cache, out, lse, query_start_loc, seq_lens, block_tables,
            max_query_len, scale, None, True, skip_ok=ok,
        )  # fmt: skip
    return out, lse
