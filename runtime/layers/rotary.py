"""Rotary position embeddings (rotate-half layout of HF Llama checkpoints), with Llama-3 and
linear frequency scaling. cos/sin are computed from positions once per step, so no table of
``max_position_embeddings`` rows is kept and any position in range works."""

from __future__ import annotations

import math

import torch
from torch import nn

from runtime.config import RopeScaling
from runtime.layers import fused_ops


def inverse_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None) -> torch.Tensor:
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling is None or scaling.rope_type == "default":
        return inv
    if scaling.rope_type == "linear":
        return inv / scaling.factor
    # llama3: long wavelengths slowed by `factor`, short ones kept, a smooth blend in between.
    old = scaling.original_max_position_embeddings
    low_wavelen = old / scaling.low_freq_factor
    high_wavelen = old / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / scaling.factor, inv)
    smooth = (old / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


class RotaryEmbedding(nn.Module):
    """One per model: ``cos_sin`` once per step, then ``apply_rotary`` in every layer."""

    def __init__(self, head_dim: int, theta: float, scaling: RopeScaling | None, device):
        super().__init__()
        self.register_buffer(
            "inv_freq", inverse_frequencies(head_dim, theta, scaling).to(device), persistent=False
        )

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """``cos``/``sin`` ``[T, D]`` in ``dtype`` for the token positions ``[T]``."""
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


_SIGNS: dict[tuple, torch.Tensor] = {}  # (head_dim, dtype, device) -> (-1.., +1..)


def apply_rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate ``q [T, Hq, D]`` and ``k [T, Hk, D]`` by ``cos``/``sin`` ``[T, D]`` (one fused
    kernel on CUDA writing contiguous outputs; the same roundings either way)."""
    if fused_ops.fused_enabled(q):
        return fused_ops.rope(q, k, cos, sin)
    # rotate_half(x) * sin == roll(x) * (sign * sin), sign = (-1.., +1..): the same products
    # (negation is exact) in two ops per tensor fewer than chunk, neg and cat
    half = q.shape[-1] // 2
    key = (q.shape[-1], sin.dtype, sin.device)
    sign = _SIGNS.get(key)
    if sign is None:
        sign = _SIGNS[key] = torch.ones(q.shape[-1], dtype=sin.dtype, device=sin.device)
        sign[:half] = -1
    cos, sin = cos[:, None, :], (sin * sign)[:, None, :]
    # x * cos + roll(x) * sin with the roll's buffer reused for its product and the sum done in
    # place: the same two roundings and one addition, two buffers fewer per tensor
    return (
        (q * cos).add_(torch.roll(q, half, dims=-1).mul_(sin)),
        (k * cos).add_(torch.roll(k, half, dims=-1).mul_(sin)),
    )
