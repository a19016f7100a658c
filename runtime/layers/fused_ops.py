"""Fused elementwise kernels for the decoder layer on CUDA (Triton): RMSNorm with the residual
add, rotary embedding of queries and keys, and SiLU(gate) * up.

Why: a decode step of a 7B model on an H100 spent ~2.1 of its 8.6 ms in about 600 tiny
elementwise kernels (each RMSNorm was eight, each RoPE ten, SiLU and the product two), so
fusing them is worth a quarter of the step. Each kernel rounds to the activation dtype exactly
where the torch code in ``norm.py``, ``rotary.py`` and the MLP does (Hugging Face's order), so
results match that code bit for bit except where a reduction's summation order or a
transcendental's last float32 bit differs (then by at most one unit in the last place of the
activation dtype).

The torch versions stay the path on CPU and under Triton's interpreter; ``fused_enabled``
decides per tensor. The kernels themselves also run under the interpreter, which is how the CPU
tests compare them with the torch versions.
"""

from __future__ import annotations

import os

import torch

try:  # Triton is optional: CPU-only installs without it use the torch code
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CI installs triton
    triton = None


_SUPPORTED_GPU: dict[int, bool] = {}  # device index -> compute capability 8.0 or newer


def _supported_gpu(device: torch.device) -> bool:
    """Triton supports compute capability 8.0 and newer (its README). Older GPUs (Volta, Turing)
    keep the torch code, which CUDA graphs replay anyway (whole or piecewise)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SUPPORTED_GPU:
        _SUPPORTED_GPU[index] = torch.cuda.get_device_capability(index) >= (8, 0)
    return _SUPPORTED_GPU[index]


def fused_enabled(x: torch.Tensor) -> bool:
    """Whether ``x``'s layer should use these kernels: a CUDA tensor on a GPU Triton supports,
    Triton compiled (not interpreted), and ``TILERUN_FUSED_OPS`` not set to 0 (an escape hatch
    for A/B runs)."""
    return (
        x.is_cuda
        and triton is not None
        and os.environ.get("TRITON_INTERPRET") != "1"
        and os.environ.get("TILERUN_FUSED_OPS", "1") != "0"
        and _supported_gpu(x.device)
    )


if triton is not None:

    @triton.jit
    def _rms_norm_kernel(
        X,
        R,
        W,
        Y,
        RES,
        stride_x,
        stride_r,
        stride_y,
        stride_res,
        n_cols,
        eps,
        HAS_RES: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
        if HAS_RES:
            # residual + x in the activation dtype, as ``residual + hidden`` is in torch
            r = tl.load(R + row * stride_r + cols, mask=mask, other=0.0)
            x = (x.to(tl.float32) + r.to(tl.float32)).to(X.dtype.element_ty)
            tl.store(RES + row * stride_res + cols, x, mask=mask)
        xf = x.to(tl.float32)
        var = tl.sum(xf * xf, axis=0) / n_cols
        rstd = 1.0 / tl.sqrt(var + eps)
        normed = (xf * rstd).to(X.dtype.element_ty)  # ``x.to(dtype)`` before the weight
        w = tl.load(W + cols, mask=mask, other=0.0)
        y = (w.to(tl.float32) * normed.to(tl.float32)).to(Y.dtype.element_ty)
        tl.store(Y + row * stride_y + cols, y, mask=mask)

    @triton.jit
    def _rope_kernel(
        Q,
        K,
        QO,
        KO,
        COS,
        SIN,
        stride_qt,
        stride_qh,
        stride_kt,
        stride_kh,
        stride_qot,
        stride_qoh,
        stride_kot,
        stride_koh,
        stride_ct,
        HQ: tl.constexpr,
        HK: tl.constexpr,
        BLOCK_H: tl.constexpr,
        HALF: tl.constexpr,
    ):
        t = tl.program_id(0).to(tl.int64)
        which = tl.program_id(1)  # 0: queries, 1: keys
        heads = tl.arange(0, BLOCK_H)
        d = tl.arange(0, HALF)
        c1 = tl.load(COS + t * stride_ct + d).to(tl.float32)
        c2 = tl.load(COS + t * stride_ct + HALF + d).to(tl.float32)
        s1 = tl.load(SIN + t * stride_ct + d).to(tl.float32)
        s2 = tl.load(SIN + t * stride_ct + HALF + d).to(tl.float32)
        if which == 0:
            src = Q + t * stride_qt + heads[:, None] * stride_qh
            dst = QO + t * stride_qot + heads[:, None] * stride_qoh
            mask = (heads < HQ)[:, None] & (d < HALF)[None, :]
        else:
            src = K + t * stride_kt + heads[:, None] * stride_kh
            dst = KO + t * stride_kot + heads[:, None] * stride_koh
            mask = (heads < HK)[:, None] & (d < HALF)[None, :]
        x1 = tl.load(src + d[None, :], mask=mask, other=0.0)
        x2 = tl.load(src + HALF + d[None, :], mask=mask, other=0.0)
        ty = x1.dtype
        f1 = x1.to(tl.float32)
        f2 = x2.to(tl.float32)
        # torch: q * cos + rotate_half(q) * sin, each product and the sum rounded to the dtype
        a1 = (f1 * c1[None, :]).to(ty).to(tl.float32)
        b1 = (-f2 * s1[None, :]).to(ty).to(tl.float32)
        a2 = (f2 * c2[None, :]).to(ty).to(tl.float32)
        b2 = (f1 * s2[None, :]).to(ty).to(tl.float32)
        tl.store(dst + d[None, :], (a1 + b1).to(ty), mask=mask)
        tl.store(dst + HALF + d[None, :], (a2 + b2).to(ty), mask=mask)

    @triton.jit
    def _silu_mul_kernel(GU, OUT, stride_g, stride_o, n, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n
        g = tl.load(GU + row * stride_g + cols, mask=mask, other=0.0)
        u = tl.load(GU + row * stride_g + n + cols, mask=mask, other=0.0)
        gf = g.to(tl.float32)
        act = (gf / (1.0 + tl.exp(-gf))).to(g.dtype)  # silu, rounded as torch's is
        out = (act.to(tl.float32) * u.to(tl.float32)).to(g.dtype)
        tl.store(OUT + row * stride_o + cols, out, mask=mask)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(RMSNorm(x [+ residual]) * weight, x + residual or None)`` over rows of ``x [T, N]``."""
    t, n = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    y = torch.empty_like(x)
    res = None
    if residual is not None:
        if residual.stride(-1) != 1:
            residual = residual.contiguous()
        res = torch.empty_like(x)
    if t == 0:
        return y, res
    _rms_norm_kernel[(t,)](
        x, residual if residual is not None else x, weight, y, res if res is not None else y,
        x.stride(0), residual.stride(0) if residual is not None else 0, y.stride(0),
        res.stride(0) if res is not None else 0, n, eps,
        HAS_RES=residual is not None, BLOCK=triton.next_power_of_2(n),
        num_warps=8 if n >= 4096 else 4,
    )  # fmt: skip
    return y, res


def rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotated copies (contiguous) of ``q [T, Hq, D]`` and ``k [T, Hk, D]`` (any row strides,
    e.g. views into the fused QKV output) by ``cos``/``sin`` ``[T, D]`` in the activation dtype."""
    t, hq, d = q.shape
    hk = k.shape[1]
    if (
        q.stride(-1) != 1
        or k.stride(-1) != 1
        or cos.stride(-1) != 1
        or sin.stride() != cos.stride()
    ):
        raise ValueError("rope: the head dimension of q, k, cos and sin must be contiguous")
    qo = torch.empty((t, hq, d), dtype=q.dtype, device=q.device)
    ko = torch.empty((t, hk, d), dtype=k.dtype, device=k.device)
    if t == 0:
        return qo, ko
    _rope_kernel[(t, 2)](
        q, k, qo, ko, cos, sin,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        qo.stride(0), qo.stride(1), ko.stride(0), ko.stride(1), cos.stride(0),
        HQ=hq, HK=hk, BLOCK_H=triton.next_power_of_2(max(hq, hk)), HALF=d // 2, num_warps=4,
        enable_fp_fusion=False,  # no fma: each product rounds before the sum, as in torch
    )  # fmt: skip
    return qo, ko


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for ``gate_up [T, 2n]`` laid out ``[gate | up]``; ``[T, n]``."""
    t, two_n = gate_up.shape
    n = two_n // 2
    if gate_up.stride(-1) != 1:
        gate_up = gate_up.contiguous()
    out = torch.empty((t, n), dtype=gate_up.dtype, device=gate_up.device)
    if t == 0:
        return out
    block = 1024
    _silu_mul_kernel[(t, triton.cdiv(n, block))](
        gate_up, out, gate_up.stride(0), out.stride(0), n, BLOCK=block, num_warps=4
    )
    return out


__all__ = ["fused_enabled", "rms_norm", "rope", "silu_mul"]
