"""The CPU part of cooperative attention (``runtime.attention.partial.host_attention``): every
method equals the float64 reference over the union of the runs, at ragged run lengths, grouped
query heads, several queries, key splits and grouped merges; in bf16 within twice torch's own
bf16 error."""

from __future__ import annotations

import pytest
import torch

import runtime.attention.partial as partial
from runtime.attention.partial import CPU_METHODS, _splits, host_attention


def reference(q, ks, vs, scale):
    k = torch.cat(ks).double()
    v = torch.cat(vs).double()
    group = q.shape[1] // k.shape[1]
    kr, vr = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    s = torch.einsum("qhd,khd->hqk", q.double(), kr) * scale
    out = torch.einsum("hqk,khd->qhd", torch.softmax(s, -1), vr)
    return out, torch.logsumexp(s, -1).T


def runs(lengths, hkv, d, dtype, seed=0):
    """Runs as the host pool hands them out: each a contiguous view of its own allocation."""
    g = torch.Generator().manual_seed(seed)
    ks, vs = [], []
    for n in lengths:
        kv = torch.randn(2, n, hkv, d, generator=g).to(dtype)
        ks.append(kv[0])
        vs.append(kv[1])
    return ks, vs


SHAPES = {  # (queries, Hq, Hkv, D, run lengths)
    "decode-mha": (1, 8, 8, 16, [2048, 7, 113]),
    "decode-gqa4-split": (1, 8, 2, 16, [4096, 1023]),
    "decode-one-kv-head": (1, 4, 1, 32, [2048]),
    "chunk-gqa": (17, 8, 2, 16, [112, 17, 1024]),
    "chunk-head-dim-128": (3, 4, 4, 128, [1536, 16]),
}


@pytest.mark.parametrize("method", CPU_METHODS)
@pytest.mark.parametrize("shape", SHAPES)
def test_every_method_equals_the_float64_reference(shape, method):
    n, hq, hkv, d, lengths = SHAPES[shape]
    ks, vs = runs(lengths, hkv, d, torch.float32)
    q = torch.randn(n, hq, d, generator=torch.Generator().manual_seed(1))
    out, lse = host_attention(q, ks, vs, d**-0.5, method)
    ref, ref_lse = reference(q, ks, vs, d**-0.5)
    assert out.dtype == lse.dtype == torch.float32
    assert out.shape == (n, hq, d) and lse.shape == (n, hq)
    assert (out.double() - ref).abs().max().item() < 1e-5
    assert (lse.double() - ref_lse).abs().max().item() < 1e-5


@pytest.mark.parametrize("method", CPU_METHODS)
@pytest.mark.parametrize("shape", ["decode-mha", "chunk-gqa"])
def test_bf16_runs_within_twice_torchs_own_bf16_error(shape, method):
    n, hq, hkv, d, lengths = SHAPES[shape]
    ks, vs = runs(lengths, hkv, d, torch.bfloat16, seed=2)
    q = torch.randn(n, hq, d, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    out, lse = host_attention(q, ks, vs, d**-0.5, method)
    ref, ref_lse = reference(q, ks, vs, d**-0.5)
    # torch's own bf16 attention over the concatenated keys, as the yardstick
    group = hq // hkv
    k = torch.cat(ks).repeat_interleave(group, 1).transpose(0, 1)
    v = torch.cat(vs).repeat_interleave(group, 1).transpose(0, 1)
    plain = torch.nn.functional.scaled_dot_product_attention(q.transpose(0, 1), k, v)
    plain_err = (plain.transpose(0, 1).double() - ref).abs().max().item()
    assert (out.double() - ref).abs().max().item() <= 2 * plain_err + 1e-3
    assert (lse.double() - ref_lse).abs().max().item() < 1e-3


def test_key_splits_feed_the_threads_and_divide_the_run():
    # 32 kv heads, one query: 32 work items already cover 16 threads twice
    assert _splits(2048, 32, 1, 16) == 1
    # 8 kv heads (GQA, 4 query heads folded into rows): split the run 4 ways, 512 keys each
    assert _splits(2048, 8, 4, 16) == 4
    # never below 512 keys a split, always a divisor of the run
    assert _splits(1024, 1, 1, 64) == 2
    assert _splits(1500, 1, 1, 64) == 2
    assert _splits(1501, 1, 1, 64) == 1
    assert _splits(100, 1, 1, 64) == 1
    # fused-keys: one contiguous range per thread, at least 128 keys each
    assert _splits(2048, 32, 1, 16, by_keys=True) == 16
    assert _splits(2048, 8, 4, 64, by_keys=True) == 16
    assert _splits(1000, 8, 1, 16, by_keys=True) == 5


def test_many_runs_merge_in_groups(monkeypatch):
    """Partials are merged every ``GROUP_BYTES``: a tiny budget merges after every run."""
    monkeypatch.setattr(partial, "GROUP_BYTES", 1)
    ks, vs = runs([16] * 9 + [700], 2, 16, torch.float32, seed=4)
    q = torch.randn(5, 4, 16, generator=torch.Generator().manual_seed(5))
    out, lse = host_attention(q, ks, vs, 0.25, "fused")
    ref, ref_lse = reference(q, ks, vs, 0.25)
    assert (out.double() - ref).abs().max().item() < 1e-5
    assert (lse.double() - ref_lse).abs().max().item() < 1e-5


def test_a_strided_run_and_no_keys_at_all():
    g = torch.Generator().manual_seed(6)
    big = torch.randn(2, 1024, 4, 16, generator=g)
    ks, vs = [big[0, :, :2]], [big[1, :, 2:]]  # not contiguous: read as it is, unsplit
    q = torch.randn(1, 2, 16, generator=g)
    out, lse = host_attention(q, ks, vs, 0.25, "fused")
    ref, ref_lse = reference(q, ks, vs, 0.25)
    assert (out.double() - ref).abs().max().item() < 1e-5
    empty = torch.zeros(0, 2, 16)
    out, lse = host_attention(q, [empty], [empty], 0.25, "fused")
    assert torch.equal(out, torch.zeros(1, 2, 16)) and torch.isneginf(lse).all()


def test_an_unknown_method_is_refused():
    q = torch.zeros(1, 2, 16)
    with pytest.raises(ValueError, match="'fast' is not one of fused, fused-keys, fused-f32"):
        host_attention(q, [q], [q], 1.0, "fast")
