"""The fused CUDA kernels of runtime/layers/fused_ops.py against the torch code they replace,
run under Triton's interpreter on CPU (conftest sets TRITON_INTERPRET=1) and, where there is
one, compiled on a CUDA GPU, at ragged row counts and in every activation dtype: the same
roundings, so equal up to one unit in the last place where a reduction's order or a
transcendental's last bit differs.

The interpreter converts float32 to bfloat16 by truncation where the GPU rounds to nearest, so
under the interpreter bfloat16 results are held to two units in the last place; float16 and
float32 (numpy rounds those to nearest) and every dtype on the GPU are held to one, with nearly
all elements equal bit for bit (float32 results, not rounded to a coarser type, to a few ulps)."""

from __future__ import annotations

import os

import pytest
import torch

from runtime.layers import fused_ops
from runtime.layers.norm import RMSNorm
from runtime.layers.rotary import RotaryEmbedding, _rotate_half, inverse_frequencies

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
ROWS = [1, 3, 17]
# compiled on a GPU where there is one; on the CPU under the interpreter (conftest sets it
# when there is no GPU)
DEVICES = (["cpu"] if os.environ.get("TRITON_INTERPRET") == "1" else []) + (
    ["cuda"] if torch.cuda.is_available() else []
)


def _ulp(dtype: torch.dtype) -> float:
    return {torch.bfloat16: 2**-7, torch.float16: 2**-10, torch.float32: 2**-23}[dtype]


def _close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, ulps: int = 1) -> None:
    """Within ``ulps`` units in the last place of ``want`` (float32: a few, as its outputs are not
    rounded to a coarser type; interpreter bfloat16: of the row's largest magnitude, as the
    interpreter truncates), and nearly all elements equal bit for bit where both round alike."""
    assert got.dtype == want.dtype and got.shape == want.shape
    diff = (got.float() - want.float()).abs()
    truncating = dtype == torch.bfloat16 and not got.is_cuda
    scale = want.float().abs()
    if truncating:
        scale = scale.amax(-1, keepdim=True).expand_as(scale)
        ulps *= 4
    elif dtype == torch.float32:
        ulps *= 8
    bad = diff > ulps * _ulp(dtype) * scale.clamp_min(1e-3)
    assert not bad.any(), f"{int(bad.sum())} of {diff.numel()} differ, max {diff.max().item()}"
    if not truncating and dtype != torch.float32:
        assert (got == want).float().mean().item() > 0.98


def _exact_or_close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    """Bit for bit where the platform rounds to nearest; else within the truncation's ulps."""
    if dtype == torch.bfloat16 and not got.is_cuda:
        _close(got, want, dtype)
    else:
        assert torch.equal(got, want)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_matches_torch(device, dtype, rows, with_residual):
    g = torch.Generator().manual_seed(rows)
    n = 96  # not a power of two: the masked tail is exercised
    x = torch.randn(rows, n, generator=g).to(device, dtype)
    r = torch.randn(rows, n, generator=g).to(device, dtype) if with_residual else None
    norm = RMSNorm(n, 1e-5, dtype, torch.device(device))
    norm.weight.data = (1 + 0.1 * torch.randn(n, generator=g)).to(device, dtype)
    y, res = fused_ops.rms_norm(x, norm.weight, norm.eps, r)
    if with_residual:
        want_res = r + x
        _exact_or_close(res, want_res, dtype)  # the add rounds exactly as torch's does
        _close(y, norm._norm(want_res), dtype)
    else:
        assert res is None
        _close(y, norm._norm(x), dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", ROWS)
def test_rope_matches_torch_on_strided_views(device, dtype, rows):
    """q and k are views into one fused QKV row, as the attention layer hands them over."""
    g = torch.Generator().manual_seed(100 + rows)
    hq, hk, d = 6, 2, 32  # GQA, heads not a power of two
    qkv = torch.randn(rows, (hq + 2 * hk) * d, generator=g).to(device, dtype)
    q = qkv[:, : hq * d].view(rows, hq, d)
    k = qkv[:, hq * d : (hq + hk) * d].view(rows, hk, d)
    rot = RotaryEmbedding(d, 10000.0, None, device)
    positions = torch.randint(0, 5000, (rows,), generator=g).to(device)
    cos, sin = rot.cos_sin(positions, dtype)
    qo, ko = fused_ops.rope(q, k, cos, sin)
    c, s = cos[:, None, :], sin[:, None, :]
    _exact_or_close(qo, q * c + _rotate_half(q) * s, dtype)
    _exact_or_close(ko, k * c + _rotate_half(k) * s, dtype)
    assert qo.is_contiguous() and ko.is_contiguous()
    assert inverse_frequencies(d, 10000.0, None).shape == (d // 2,)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", ROWS)
def test_silu_mul_matches_torch(device, dtype, rows):
    g = torch.Generator().manual_seed(200 + rows)
    n = 1500  # spans two column blocks, with a masked tail
    gate_up = (3 * torch.randn(rows, 2 * n, generator=g)).to(device, dtype)
    gate, up = gate_up.chunk(2, dim=-1)
    # the activation's last-bit difference is scaled by ``up`` in the product: a few ulps
    _close(fused_ops.silu_mul(gate_up), torch.nn.functional.silu(gate) * up, dtype, ulps=4)


def test_fused_path_is_off_on_cpu_and_on_for_cuda_unless_interpreted(monkeypatch):
    assert not fused_ops.fused_enabled(torch.zeros(2))
    if torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        assert fused_ops.fused_enabled(torch.zeros(2, device="cuda"))
        monkeypatch.setenv("TILERUN_FUSED_OPS", "0")
        assert not fused_ops.fused_enabled(torch.zeros(2, device="cuda"))
        monkeypatch.setenv("TILERUN_FUSED_OPS", "1")
        assert fused_ops.fused_enabled(torch.zeros(2, device="cuda"))
        # a GPU before compute capability 8.0 (Triton's floor) keeps the torch code
        index = torch.zeros(1, device="cuda").device.index
        monkeypatch.setitem(fused_ops._SUPPORTED_GPU, index, False)
        assert not fused_ops.fused_enabled(torch.zeros(2, device="cuda"))
