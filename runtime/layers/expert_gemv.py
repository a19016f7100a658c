"""Products of a few rows with experts picked by index (Triton), for mixture-of-experts decode.

A decode step of a mixture of experts multiplies each (token, expert) pair's activations by
that expert's weights. Gathering the picked experts' weights into a batch first
(``weights[ids]``, then ``bmm``) moves each picked expert three times (read, write the copy,
read it back); reading every expert instead moves all of them once. This kernel reads each pair's
expert where it lies: one program per (pair, tile of output rows) streams that expert's rows
and dots them with the pair's activation row, accumulating in float32 (float64 for float64
inputs) and rounding once to the output dtype, as a batched product does. So a step moves the
picked experts' bytes once: for MiniMax-Text-01's 32 experts of 6144 x 9216 (three matrices,
bf16), a token's two experts are 0.68 GB a layer, against 2.0 GB gathered or 10.9 GB for every
expert.

Measured on the H100 (``scripts/bench_moe_decode.py``, ``benchmarks/results/
moe-decode-nvidia-h100-80gb-hbm3.json``): for MiniMax-Text-01's layer it takes 0.40 / 1.03 /
1.86 ms at batch 1 / 4 / 8, against 0.75 / 2.73 / 5.41 gathered and 4.6-4.8 for every expert
(1.69-2.30 TB/s of the picked experts' bytes, against the 3.02 TB/s copy rate). So it is the
picked-expert form wherever ``fused_ops.fused_enabled`` says the Triton kernels run (CUDA,
compiled Triton, compute capability 8.0+); ``TILERUN_EXPERT_GEMV=0`` turns it off (the gathered
batched products then). The CPU tests run it under Triton's interpreter.
"""

from __future__ import annotations

import os

import torch

try:  # Triton is optional: CPU-only installs without it use the torch code
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CI installs triton
    triton = None

BLOCK_N = 64  # output rows per program
BLOCK_K = 128  # reduction step: 64 x 128 bf16 is a 16 KiB weight tile in flight per stage


if triton is not None:

    @triton.jit
    def _expert_gemv_kernel(
        X,
        W,
        EXPERTS,
        ROWS,
        Y,
        K,
        N,
        stride_xr,
        stride_we,
        stride_wn,
        stride_yp,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        F64: tl.constexpr,
    ):
        p = tl.program_id(0)
        e = tl.load(EXPERTS + p).to(tl.int64)
        r = tl.load(ROWS + p).to(tl.int64)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        acc_t = tl.float64 if F64 else tl.float32
        # products accumulate element-wise across the reduction steps and are summed over the
        # tile's columns once at the end: no cross-thread reduction inside the streaming loop
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=acc_t)
        w_rows = W + e * stride_we + offs_n[:, None].to(tl.int64) * stride_wn
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < K
            x = tl.load(X + r * stride_xr + offs_k, mask=k_mask, other=0.0).to(acc_t)
            w = tl.load(w_rows + offs_k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0)
            acc += w.to(acc_t) * x[None, :]
        y = tl.sum(acc, axis=1)
        tl.store(Y + p * stride_yp + offs_n, y.to(Y.dtype.element_ty), mask=n_mask)


def expert_gemv_enabled(x: torch.Tensor) -> bool:
    """Whether a step on ``x``'s device reads the picked experts through this kernel: where the
    Triton kernels run, unless ``TILERUN_EXPERT_GEMV=0``."""
    from runtime.layers.fused_ops import fused_enabled

    return os.environ.get("TILERUN_EXPERT_GEMV", "1") != "0" and fused_enabled(x)


def expert_gemv(
    x: torch.Tensor, w: torch.Tensor, experts: torch.Tensor, rows: torch.Tensor
) -> torch.Tensor:
    """``y[p] = w[experts[p]] @ x[rows[p]]``: ``x [R, K]``, ``w [E, N, K]`` (K contiguous),
    ``experts`` and ``rows`` ``[P]`` integers on ``x``'s device (no host sync: CUDA graphs
    capture it). Returns ``y [P, N]`` in ``x``'s dtype."""
    if triton is None:  # pragma: no cover - CI installs triton
        raise RuntimeError("expert_gemv needs Triton; the caller falls back to gather + bmm")
    P = experts.shape[0]
    E, N, K = w.shape
    if x.shape[1] != K or rows.shape[0] != P:
        raise ValueError(f"expert_gemv: x {tuple(x.shape)}, w {tuple(w.shape)}, {P} pairs")
    if w.stride(2) != 1:
        raise ValueError("expert_gemv: the weights' reduction dim must be contiguous")
    if x.stride(1) != 1:
        x = x.contiguous()
    y = torch.empty(P, N, dtype=x.dtype, device=x.device)
    if P == 0:
        return y
    grid = (P, triton.cdiv(N, BLOCK_N))
    _expert_gemv_kernel[grid](
        x, w, experts, rows, y, K, N,
        x.stride(0), w.stride(0), w.stride(1), y.stride(0),
        BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, F64=x.dtype == torch.float64,
        num_warps=4, num_stages=3,
    )  # fmt: skip
    return y
