"""Lightning attention prefill in Triton: one program per (sequence, head, value slice) walks its
sequence block by block with the ``[D, BLOCK_E]`` state in registers.

The arithmetic is ``runtime.attention.lightning``'s (see its docstring): per block of
``BLOCK`` tokens the intra part ``((Q K^T) * M) V`` with the decay mask, the inter part
``(Q * lambda^(i+1)) S``, then ``S <- lambda^n S + (K * lambda^(n-1-j))^T V``. The state never
leaves the program between blocks (Lightning Attention-2 keeps it in SRAM the same way), so a
sequence's Q/K are read once per value slice, V once, and the state is read and written once per
step. Products take the
inputs' dtype with float32 accumulation (float32 inputs: exact float32 products); the state is
float32 throughout.

The grid is ``sequences x heads x (E / BLOCK_E)``: long single sequences with few heads leave a
large GPU under-filled (each program is sequential over the tokens). Runs under
``TRITON_INTERPRET=1`` on the CPU (the tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from runtime.attention.lightning import check_step
from runtime.attention.triton_prefill import _cast, _mma, dot_mode

BLOCK = 64  # tokens per block (tl.dot needs >= 16)


@triton.jit
def _lightning_prefill_kernel(
    Q,
    K,
    V,
    OUT,
    SLOPES,
    STATE,
    CU_SEQLENS,
    stride_qt,
    stride_qh,
    stride_vt,
    stride_vh,
    stride_ot,
    stride_oh,
    H: tl.constexpr,
    D: tl.constexpr,
    E: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_E: tl.constexpr,
    DOT_MODE: tl.constexpr,
):
    seq_head = tl.program_id(0)
    n = seq_head // H
    h = seq_head % H
    e0 = tl.program_id(1) * BLOCK_E
    start = tl.load(CU_SEQLENS + n)
    length = tl.load(CU_SEQLENS + n + 1) - start
    s = tl.load(SLOPES + h)
    i = tl.arange(0, BLOCK)
    d = tl.arange(0, D)
    e = e0 + tl.arange(0, BLOCK_E)
    st_ptr = STATE + ((n.to(tl.int64) * H + h) * D + d[:, None]) * E + e[None, :]
    state = tl.load(st_ptr)  # [D, BLOCK_E] float32
    q_decay = tl.exp(-s * (i + 1).to(tl.float32))
    gap = (i[:, None] - i[None, :]).to(tl.float32)
    mask = tl.where(gap >= 0, tl.exp(-s * tl.maximum(gap, 0.0)), 0.0)
    dt = Q.dtype.element_ty
    for b0 in range(0, length, BLOCK):
        rows = b0 + i
        valid = rows < length
        nb = tl.minimum(length - b0, BLOCK)
        t = (start + rows).to(tl.int64)
        q = tl.load(
            Q + t[:, None] * stride_qt + h * stride_qh + d[None, :], mask=valid[:, None], other=0.0
        )
        k = tl.load(
            K + t[:, None] * stride_qt + h * stride_qh + d[None, :], mask=valid[:, None], other=0.0
        )
        v = tl.load(
            V + t[:, None] * stride_vt + h * stride_vh + e[None, :], mask=valid[:, None], other=0.0
        )
        # intra: rows past the end load zeros, so their columns add nothing
        scores = _mma(q, tl.trans(k), tl.zeros([BLOCK, BLOCK], tl.float32), DOT_MODE) * mask
        o = _mma(_cast(scores, dt, DOT_MODE), v, tl.zeros([BLOCK, BLOCK_E], tl.float32), DOT_MODE)
        # inter: the state at the block's start, decayed i + 1 steps for query i
        qd = _cast(q.to(tl.float32) * q_decay[:, None], dt, DOT_MODE)
        o = _mma(qd, _cast(state, dt, DOT_MODE), o, DOT_MODE)
        o_ptr = OUT + t[:, None] * stride_ot + h * stride_oh + e[None, :]
        tl.store(o_ptr, o.to(OUT.dtype.element_ty), mask=valid[:, None])
        # the state past this block: key j decayed nb - 1 - j steps, the old state nb steps
        k_decay = tl.where(valid, tl.exp(-s * (nb - 1 - i).to(tl.float32)), 0.0)
        kd = _cast(k.to(tl.float32) * k_decay[:, None], dt, DOT_MODE)
        state = _mma(tl.trans(kd), v, state * tl.exp(-s * nb.to(tl.float32)), DOT_MODE)
    tl.store(st_ptr, state)


@triton.jit
def _lightning_decode_kernel(
    Q,
    K,
    V,
    OUT,
    SLOPES,
    STATE,
    stride_qn,
    stride_qh,
    stride_vn,
    stride_vh,
    H: tl.constexpr,
    D: tl.constexpr,
    E: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    seq_head = tl.program_id(0)
    n = seq_head // H
    h = seq_head % H
    d = tl.arange(0, D)
    e = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    st_ptr = STATE + ((n.to(tl.int64) * H + h) * D + d[:, None]) * E + e[None, :]
    lam = tl.exp(-tl.load(SLOPES + h))
    q = tl.load(Q + n * stride_qn + h * stride_qh + d).to(tl.float32)
    k = tl.load(K + n * stride_qn + h * stride_qh + d).to(tl.float32)
    v = tl.load(V + n * stride_vn + h * stride_vh + e).to(tl.float32)
    # the state is read once and written once: S <- lambda S + k^T v, then o = q S
    state = tl.load(st_ptr) * lam + k[:, None] * v[None, :]
    tl.store(st_ptr, state)
    o = tl.sum(q[:, None] * state, axis=0)
    tl.store(OUT + n * stride_vn + h * stride_vh + e, o.to(OUT.dtype.element_ty))


def _check_layout(q, k, v, states, D: int, E: int) -> None:
    """What the kernels assume beyond :func:`check_step`: power-of-two head sizes, a contiguous
    float32 state, q and k in one layout, unit stride along the head dim."""
    for name, n in (("head dim D", D), ("value dim E", E)):
        if n < 16 or n & (n - 1):
            raise ValueError(f"lightning triton kernel: {name}={n}; needs a power of two >= 16")
    if states.dtype != torch.float32 or not states.is_contiguous():
        raise ValueError("lightning triton kernel: states must be contiguous float32 [N, H, D, E]")
    if k.stride() != q.stride():
        raise ValueError("lightning triton kernel: q and k must share one layout")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.stride(2) != 1:
            raise ValueError(f"lightning triton kernel: {name}'s last dim must be contiguous")


def _block_e(e: int) -> int:
    """The value slice of one program: the whole head up to 64 columns (the state tile is then
    D x 64 float32 in registers), else 64."""
    return min(e, 64)


def lightning_prefill_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slopes: torch.Tensor,
    query_lens: list[int],
    states: torch.Tensor,
) -> torch.Tensor:
    """Packed sequences (``runtime.attention.lightning.lightning_forward``'s contract): ``q``/``k``
    ``[T, H, D]``, ``v [T, H, E]``, ``slopes [H]``, ``states [N, H, D, E]`` float32 advanced in
    place. ``D`` and ``E`` powers of two >= 16. Returns ``out [T, H, E]`` in ``q``'s dtype."""
    check_step(q, k, v, slopes, query_lens, states)
    T, H, D = q.shape
    E = v.shape[2]
    _check_layout(q, k, v, states, D, E)
    cu = [0]
    for n in query_lens:
        cu.append(cu[-1] + n)
    cu_seqlens = torch.tensor(cu, dtype=torch.int32, device=q.device)
    out = torch.empty(T, H, E, dtype=q.dtype, device=q.device)
    be = _block_e(E)
    grid = (len(query_lens) * H, E // be)
    _lightning_prefill_kernel[grid](
        q,
        k,
        v,
        out,
        slopes.to(device=q.device, dtype=torch.float32).contiguous(),
        states,
        cu_seqlens,
        q.stride(0),
        q.stride(1),
        v.stride(0),
        v.stride(1),
        out.stride(0),
        out.stride(1),
        H=H,
        D=D,
        E=E,
        BLOCK=BLOCK,
        BLOCK_E=be,
        DOT_MODE=dot_mode(q.dtype, q.device),
    )
    return out


def lightning_decode_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slopes: torch.Tensor, states: torch.Tensor
) -> torch.Tensor:
    """One token for each of ``N`` sequences (``lightning.lightning_decode``'s contract), with
    each ``[D, E]`` state read and written once: ``q``/``k`` ``[N, H, D]``, ``v [N, H, E]``,
    ``states [N, H, D, E]`` contiguous float32, advanced in place. Returns ``out [N, H, E]``."""
    N, H, D = q.shape
    E = v.shape[2]
    check_step(q, k, v, slopes, [1] * N, states)
    _check_layout(q, k, v, states, D, E)
    out = torch.empty(N, H, E, dtype=q.dtype, device=q.device)
    if out.stride() != v.stride():
        v = v.contiguous()
    be = _block_e(E)
    _lightning_decode_kernel[(N * H, E // be)](
        q,
        k,
        v,
        out,
        slopes.to(device=q.device, dtype=torch.float32).contiguous(),
        states,
        q.stride(0),
        q.stride(1),
        v.stride(0),
        v.stride(1),
        H=H,
        D=D,
        E=E,
        BLOCK_E=be,
    )
    return out
