"""8-bit KV for the host tier: fp8 e4m3 or int8 with one float32 scale per block (and layer, K/V).

A block is quantised on the device as it is spilled (so the link carries half the bytes of bf16)
and dequantised on the device as it is staged back; the CPU side of cooperative attention
dequantises on the CPU. The scale maps the block's largest magnitude onto the format's largest
finite value, so nothing saturates; an all-zero block gets scale 1.
"""

from __future__ import annotations

import torch

from runtime.names import HOST_DTYPE_NAMES
from scheduler.errors import ConfigError

FP8_MAX = 448.0  # largest finite float8_e4m3fn
INT8_MAX = 127.0

HOST_DTYPES = HOST_DTYPE_NAMES
EIGHT_BIT = ("fp8", "int8")


def resolve_host_dtype(name: str | None, kv_dtype: torch.dtype) -> tuple[torch.dtype, str | None]:
    """``(storage dtype, quantisation)`` of the host tier: quantisation is ``fp8``/``int8`` or
    ``None`` (values stored as they are, converted to ``storage dtype`` if it differs)."""
    if name in (None, "auto"):
        return kv_dtype, None
    if name in EIGHT_BIT:
        return torch.uint8, name
    plain = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
    if name not in plain:
        raise ConfigError(
            f"kv_host_dtype={name!r} is not valid; choose one of {', '.join(HOST_DTYPES)}"
        )
    return plain[name], None


def quantize(x: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocks ``x [n, ...]`` -> ``(bytes uint8 [n, ...], scales float32 [n])``."""
    xf = x.to(torch.float32)
    amax = xf.abs().amax(dim=tuple(range(1, x.dim())))
    top = FP8_MAX if kind == "fp8" else INT8_MAX
    scale = torch.where(amax > 0, amax / top, torch.ones_like(amax))
    y = xf / scale.view(-1, *([1] * (x.dim() - 1)))
    if kind == "fp8":
        return y.to(torch.float8_e4m3fn).view(torch.uint8), scale
    return y.round_().clamp_(-INT8_MAX, INT8_MAX).to(torch.int8).view(torch.uint8), scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, kind: str, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of ``quantize``: ``(uint8 [n, ...], float32 [n])`` -> ``dtype [n, ...]``."""
    view = torch.float8_e4m3fn if kind == "fp8" else torch.int8
    x = q.view(view).to(torch.float32) * scale.view(-1, *([1] * (q.dim() - 1)))
    return x.to(dtype)
