"""RMSNorm, computed in float32 and cast back as Hugging Face Llama does (bitwise-compatible
order), optionally with the residual add in front (one fused kernel on CUDA)."""

from __future__ import annotations

import torch
from torch import nn

from runtime.layers import fused_ops


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(
            torch.ones(hidden_size, dtype=dtype, device=device), requires_grad=False
        )

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """``RMSNorm(x)``; given ``residual``, ``(RMSNorm(x + residual), x + residual)`` (the
        sum in the activation dtype, as ``residual + hidden`` is in Hugging Face's layer)."""
        if fused_ops.fused_enabled(x):
            y, res = fused_ops.rms_norm(x, self.weight, self.eps, residual)
            return y if residual is None else (y, res)
        if residual is None:
            return self._norm(x)
        x = residual + x
        return self._norm(x), x

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        if dtype != torch.float32:  # a no-op cast still costs a dispatch, per norm and step
            x = x.float()
        # in place where a fresh tensor is at hand: the same operations, fewer buffers
        x = x * x.pow(2).mean(-1, keepdim=True).add_(self.eps).rsqrt_()
        if dtype == torch.float32:
            return x.mul_(self.weight)  # weight * x, bit for bit (a product commutes)
        return self.weight * x.to(dtype)
