"""Our C++ FlashAttention-2 kernel for CPUs (``fa2_cpu``) against float64 references.

The kernel alone at ragged lengths around its tiles (48 query rows per register tile on AVX-512,
16 otherwise; 64 keys per block; 288 rows per work item; the query heads of a K/V head share a
tile), causal and not, every head dim compiled in, GQA ratios 1 to 8, strided views as the
paged cache gives them, scores large enough that the running max is raised mid-block; built for
this CPU and, on x86, for AVX2 and for the x86-64 baseline (the lanes the CI machine may have). Then the backend over
the paged cache (``flash_cpu``'s cases run it too, in ``test_attention_cpu_flash.py``), its
hand-offs to torch's kernel, and what a machine without a compiler gets.
"""

from __future__ import annotations

import platform

import pytest
import torch

from runtime import cpu_module
from runtime.attention import fa2_cpu
from runtime.attention.cpu_flash import CpuFlashBackend
from runtime.attention.fa2_cpu import Fa2CpuBackend, Fa2Library
from runtime.attention.reference import reference_attention
from runtime.attention.registry import UnknownBackendError, resolve_backend_name
from tests.test_attention_cpu_flash import consecutive_case
from tests.test_attention_torch import max_err

pytestmark = pytest.mark.skipif(cpu_module.compiler() is None, reason="needs a C++ compiler")

X86 = platform.machine() in ("x86_64", "AMD64")
# this CPU's build, and on x86 the AVX2 (8 lanes) and baseline SSE2 builds as well
MARCHES = ["native"] + (["x86-64-v3", "x86-64"] if X86 else [])


@pytest.fixture(scope="module", params=MARCHES)
def lib(request) -> Fa2Library:
    return Fa2Library(request.param)


def reference(q, k, v, causal: bool, scale: float):
    """float64 ``(out [n, Hq, D], lse [n, Hq])`` of ``q [n, Hq, D]`` over ``k, v [N, Hkv, D]``."""
    n, hq, d = q.shape
    g = hq // k.shape[1]
    kd, vd = k.double().repeat_interleave(g, 1), v.double().repeat_interleave(g, 1)
    s = torch.einsum("nhd,mhd->hnm", q.double(), kd) * scale
    if causal:
        s = s.masked_fill(torch.ones(n, k.shape[0], dtype=torch.bool).triu(1), float("-inf"))
    out = torch.einsum("hnm,mhd->nhd", torch.softmax(s, -1), vd)
    return out, torch.logsumexp(s, -1).T


def as_cache_view(x: torch.Tensor) -> torch.Tensor:
    """``[N, Hkv, D]`` as the backend hands it to the kernel: ``[1, Hkv, N, D]``, strided."""
    return x.permute(1, 0, 2).unsqueeze(0)


SHAPES = [  # (n, N, Hq, Hkv, D, causal)
    (1, 1, 8, 2, 32, True),
    (47, 47, 8, 2, 32, True),
    (48, 48, 4, 4, 64, True),
    (49, 49, 8, 1, 128, True),
    (300, 300, 8, 2, 32, True),
    (97, 97, 32, 8, 128, True),
    (33, 500, 8, 2, 32, False),
    (77, 1000, 4, 4, 64, False),
    (130, 129, 16, 2, 80, False),
    (70, 70, 12, 4, 96, True),
    (20, 65, 4, 1, 256, False),
    (600, 600, 4, 4, 32, True),  # several items a head (288 rows each)
    (290, 700, 2, 1, 64, False),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "-".join(map(str, s)))
def test_kernel_matches_float64(lib, shape):
    n, nk, hq, hkv, d, causal = shape
    g = torch.Generator().manual_seed(n * 7 + d)
    q = torch.randn(n, hq, d, generator=g)
    k, v = torch.randn(nk, hkv, d, generator=g), torch.randn(nk, hkv, d, generator=g)
    out, lse = lib.attend(q, as_cache_view(k), as_cache_view(v), causal, d**-0.5)
    ref_out, ref_lse = reference(q, k, v, causal, d**-0.5)
    assert max_err(out, ref_out) < 2e-5 and max_err(lse, ref_lse) < 2e-5


def test_kernel_raises_the_running_max_mid_block(lib):
    # scores in the hundreds that grow along the keys: the max is exceeded by more than 2^8
    # again and again inside blocks, each time rescaling O, the sum and the block's
    # probabilities so far
    g = torch.Generator().manual_seed(3)
    n, hq, hkv, d = 150, 8, 2, 32
    q = torch.randn(n, hq, d, generator=g) * 4
    k = torch.randn(n, hkv, d, generator=g) * torch.linspace(0.1, 6, n).view(n, 1, 1)
    v = torch.randn(n, hkv, d, generator=g)
    kv = as_cache_view(k), as_cache_view(v)
    for causal in (True, False):
        out, lse = lib.attend(q, *kv, causal, 1.0)
        ref_out, ref_lse = reference(q, k, v, causal, 1.0)
        # scores near 1000 carry float32 rounding of ~1e-4 into exp: torch's kernel (FMA, MKL)
        # is the bound; the baseline x86-64 build has no FMA, one rounding more per product
        peer_out, peer_lse = CpuFlashBackend().attend(q, *kv, causal, 1.0)
        assert torch.isfinite(out).all()
        assert max_err(out, ref_out) <= 3 * max_err(peer_out, ref_out) + 1e-5
        assert max_err(lse, ref_lse) <= 3 * max_err(peer_lse, ref_lse) + 1e-5


def test_kernel_refuses_what_it_cannot_do():
    lib = fa2_cpu.library()
    q, k = torch.randn(60, 4, 40), torch.randn(1, 2, 60, 40)
    assert not lib.head_dim_ok(40)
    with pytest.raises(RuntimeError, match="head dim not compiled in"):
        lib.attend(q, k, k, True, 1.0)
    q, k = torch.randn(60, 4, 32), torch.randn(1, 2, 61, 32)
    with pytest.raises(RuntimeError, match="causal with a query count unlike the key count"):
        lib.attend(q, k, k, True, 1.0)


def test_backend_runs_the_kernel_for_prefill_and_torch_for_the_rest(monkeypatch):
    calls = []
    real = Fa2Library.attend
    monkeypatch.setattr(Fa2Library, "attend", lambda *a: calls.append(a[1].shape) or real(*a))
    backend = Fa2CpuBackend()
    # a chunk of 113 queries after 910 earlier keys, and a decode step: the chunk's two calls
    # (its own keys, causal; the earlier ones) are ours, the decode step's is torch's
    q, kc, vc, meta = consecutive_case([113, 1], [1023, 300], 8, 2, 64, 16, seed=4)
    out, lse = backend.forward(q, kc, vc, meta, 0.125)
    ref_out, ref_lse = reference_attention(q, kc, vc, meta, 0.125)
    assert max_err(out, ref_out) < 2e-5 and max_err(lse, ref_lse) < 2e-5
    assert calls == [(113, 8, 64), (113, 8, 64)]
    # bfloat16: torch's kernel, bit for bit what flash_cpu gives
    calls.clear()
    qb, kb, vb = q.bfloat16(), kc.bfloat16(), vc.bfloat16()
    out = backend.forward(qb, kb, vb, meta, 0.125)[0]
    assert calls == [] and torch.equal(out, CpuFlashBackend().forward(qb, kb, vb, meta, 0.125)[0])


def test_without_a_compiler_the_backend_is_refused_in_one_line(monkeypatch, tmp_path):
    monkeypatch.setattr(cpu_module, "compiler", lambda: None)
    monkeypatch.setattr(fa2_cpu, "_library", None)
    monkeypatch.setattr(cpu_module, "_loaded", {})
    monkeypatch.setenv("TILERUN_CACHE", str(tmp_path))  # nothing cached to fall back on
    reason = Fa2CpuBackend.supports(torch.device("cpu"))
    assert reason and "needs a C++ compiler" in reason and "\n" not in reason
    with pytest.raises(UnknownBackendError, match="fa2_cpu.*does not run on cpu.*C\\+\\+ comp"):
        resolve_backend_name("fa2_cpu", torch.device("cpu"))
    # auto leaves it out: torch's kernel is the CPU default
    assert resolve_backend_name("auto", torch.device("cpu")) == "flash_cpu"
    assert Fa2CpuBackend.supports(torch.device("cuda")) is not None


def test_a_failed_build_quotes_the_compiler_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TILERUN_CACHE", str(tmp_path))
    bad = tmp_path / "bad.cpp"
    bad.write_text("int f() { return undefined_name; }\n")
    with pytest.raises(cpu_module.CpuBuildError, match=r"failed building bad.cpp for .*undefined"):
        cpu_module.build(bad)
    assert not list((tmp_path / "cpu").glob("*.tmp"))  # nothing half-written left behind


def test_the_build_is_cached_by_source_and_target(tmp_path, monkeypatch):
    monkeypatch.setenv("TILERUN_CACHE", str(tmp_path))
    first = cpu_module.build(fa2_cpu.SOURCE)
    stamp = first.stat().st_mtime_ns
    assert cpu_module.build(fa2_cpu.SOURCE) == first and first.stat().st_mtime_ns == stamp
    if X86:
        assert cpu_module.build(fa2_cpu.SOURCE, "x86-64-v3") != first


def test_an_unwritable_cache_is_one_line_naming_the_fix(tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    monkeypatch.setenv("TILERUN_CACHE", str(blocker))  # the cache root is a file
    with pytest.raises(cpu_module.CpuBuildError, match="not writable.*set TILERUN_CACHE"):
        cpu_module.build(fa2_cpu.SOURCE)
    monkeypatch.setattr(fa2_cpu, "_library", None)
    monkeypatch.setattr(cpu_module, "_loaded", {})
    reason = Fa2CpuBackend.supports(torch.device("cpu"))
    assert reason and "TILERUN_CACHE" in reason and "\n" not in reason
