"""On a CUDA GPU with nvcc: the ``wmma_cuda`` backend (our FlashAttention-2 CUDA kernel on the
warp matrix API) against the float64 reference.

The kernel alone at ragged lengths (partial query blocks and key tiles, chunk queries over longer
keys, causal and not, grouped K/V heads, strided views), float16 and bfloat16, head dims 64 and
128, both block heights; then the backend over the paged cache with the portable backend's cases,
blocks at shuffled ids (gathered) and consecutive ids (read in place). The bound for half inputs
is the one the other backends meet: twice the error of the textbook computation in the inputs'
dtype. Skips without a CUDA GPU or without nvcc; the device and build checks run everywhere.
"""

from __future__ import annotations

import ctypes
import math

import pytest
import torch

from runtime import cuda_module
from runtime.attention import wmma_cuda
from runtime.attention.reference import reference_attention
from runtime.attention.registry import UnknownBackendError, get_backend, resolve_backend_name
from runtime.attention.wmma_cuda import WmmaCudaBackend, fa2_forward
from tests.test_attention_cpu_flash import consecutive_case
from tests.test_attention_cuda_efficient import _on_gpu, assert_within_half_rule
from tests.test_attention_torch import CASE_IDS, CASES, make_case, max_err

pytestmark = pytest.mark.gpu

gpu = pytest.mark.skipif(
    not torch.cuda.is_available() or cuda_module.nvcc_path() is None,
    reason="needs a CUDA GPU and nvcc",
)


def test_wmma_cuda_refuses_a_cpu_by_name():
    reason = WmmaCudaBackend.supports(torch.device("cpu"))
    assert reason and "CUDA" in reason
    with pytest.raises(UnknownBackendError, match="wmma_cuda.*does not run on cpu"):
        resolve_backend_name("wmma_cuda", torch.device("cpu"))


@gpu
def test_a_kernel_that_does_not_build_is_refused_at_start(monkeypatch, tmp_path):
    # the build runs when the backend is resolved, so `--attention wmma_cuda` with an nvcc that
    # cannot build it (CUDA 13 on Volta) is one line at start, not an error mid-prefill
    def fails(*a, **k):
        raise cuda_module.CudaBuildError("nvcc failed building fa2_wmma.cu for sm_70: no")

    monkeypatch.setattr(wmma_cuda, "_modules", {})
    monkeypatch.setattr(wmma_cuda, "build", fails)
    with pytest.raises(UnknownBackendError, match="wmma_cuda.*does not build here.*sm_70"):
        resolve_backend_name("wmma_cuda", torch.device("cuda"))


def test_build_without_nvcc_names_the_fix(monkeypatch, tmp_path):
    monkeypatch.setattr(cuda_module, "nvcc_path", lambda: None)
    with pytest.raises(cuda_module.CudaBuildError, match="needs the CUDA compiler.*nvcc"):
        cuda_module.build(wmma_cuda.SOURCE, (9, 0))


@pytest.mark.skipif(cuda_module.nvcc_path() is None, reason="needs nvcc (no GPU needed)")
def test_kernel_source_builds_for_turing_and_hopper(monkeypatch, tmp_path):
    # runs where nvcc is (CI has it, no GPU): the source compiles for the oldest target CUDA 13
    # still builds and for Hopper, every kernel the Python side names is in the cubin, and a
    # second build is the cached file
    monkeypatch.setenv("TILERUN_CACHE", str(tmp_path))
    for cap in ((7, 5), (9, 0)):
        cubin = cuda_module.build(wmma_cuda.SOURCE, cap, wmma_cuda.FLAGS)
        data = cubin.read_bytes()
        dtypes = (torch.float16,) if cap < (8, 0) else (torch.float16, torch.bfloat16)
        for d, tiles in wmma_cuda.TILES.items():
            for tile in tiles:
                for dt in dtypes:
                    assert wmma_cuda.kernel_name(dt, d, tile).encode() in data, (cap, d, tile)
        if cap < (8, 0):
            assert b"fa2_bf16" not in data  # bfloat16 tensor cores start at sm_80
        before = cubin.stat().st_mtime_ns
        assert cuda_module.build(wmma_cuda.SOURCE, cap, wmma_cuda.FLAGS) == cubin
        assert cubin.stat().st_mtime_ns == before


@pytest.mark.skipif(cuda_module.nvcc_path() is None, reason="needs nvcc (no GPU needed)")
def test_a_failed_build_says_what_nvcc_said(monkeypatch, tmp_path):
    # a source that does not compile: one line naming the file, the target and nvcc's last words
    monkeypatch.setenv("TILERUN_CACHE", str(tmp_path))
    bad = tmp_path / "bad.cu"
    bad.write_text('extern "C" __global__ void k() { undefined_thing(); }\n')
    with pytest.raises(
        cuda_module.CudaBuildError, match=r"nvcc failed building bad.cu for sm_90: .*undefined"
    ):
        cuda_module.build(bad, (9, 0))


@pytest.mark.parametrize(
    "limit,want128,want64",
    [
        (227 * 1024, "m128_r2_n32_qs", "m128_r2_n64"),  # Hopper, Ampere data-centre parts
        (96 * 1024, "m128_r2_n32_b1_qs", "m128_r2_n32_b1"),  # Volta
        (64 * 1024, "m64_r2_n32_b1_qs", "m128_r2_n32_b1"),  # Turing
    ],
)
def test_each_gpu_takes_the_fastest_tile_its_shared_memory_holds(
    monkeypatch, limit, want128, want64
):
    # runs everywhere: the choice reads only the device's per-block shared-memory limit
    monkeypatch.setattr(wmma_cuda, "_chosen", {})
    props = type("Props", (), {"shared_memory_per_block_optin": limit})()
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: props)
    dev = torch.device("cuda", 0)
    for d, want in ((128, want128), (64, want64)):
        tile = wmma_cuda.tile_for(d, dev)
        assert wmma_cuda.kernel_name(torch.float16, d, tile) == f"fa2_f16_d{d}_{want}"
        assert tile.shared_bytes(d) <= limit
    monkeypatch.setattr(wmma_cuda, "_chosen", {})
    props.shared_memory_per_block_optin = 40 * 1024
    with pytest.raises(ValueError, match="no tile fits 40960 bytes.*efficient_cuda"):
        wmma_cuda.tile_for(128, dev)


def _reference(q, k, v, causal, scale):
    """float64: q [n, Hq, D] over k, v [Hkv, N, D], bottom-right causal."""
    n, hq, _ = q.shape
    hkv, keys, _ = k.shape
    kk = k.double().repeat_interleave(hq // hkv, 0)
    vv = v.double().repeat_interleave(hq // hkv, 0)
    s = torch.einsum("qhd,hkd->hqk", q.double(), kk) * scale
    if causal:
        hidden = torch.arange(keys)[None, :] > torch.arange(keys - n, keys)[:, None]
        s = s.masked_fill(hidden.to(s.device), float("-inf"))
    lse = torch.logsumexp(s, -1)
    out = torch.einsum("hqk,hkd->qhd", torch.softmax(s, -1), vv)
    return out, lse.transpose(0, 1)


def _naive(q, k, v, causal, scale):
    """The textbook computation in the inputs' dtype: what half precision allows."""
    n, hq, _ = q.shape
    hkv, keys, _ = k.shape
    kk, vv = (x.repeat_interleave(hq // hkv, 0) for x in (k, v))
    s = torch.einsum("qhd,hkd->hqk", q, kk) * scale
    if causal:
        hidden = torch.arange(keys)[None, :] > torch.arange(keys - n, keys)[:, None]
        s = s.masked_fill(hidden.to(s.device), float("-inf"))
    return torch.einsum("hqk,hkd->qhd", torch.softmax(s.float(), -1).to(q.dtype), vv)


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "d,tile", [(d, t) for d, ts in wmma_cuda.TILES.items() for t in ts], ids=str
)
@pytest.mark.parametrize(
    "n,keys,causal,hq,hkv",
    [
        (1, 1, True, 4, 4),
        (63, 63, True, 8, 2),
        (200, 200, True, 8, 8),
        (1000, 1000, True, 32, 8),
        (17, 1000, True, 8, 1),  # chunk queries at the end of longer keys
        (130, 77, False, 4, 2),  # ragged tiles both ways, no mask
        (5, 4099, False, 8, 2),
    ],
)
def test_kernel_matches_float64(dtype, d, tile, n, keys, causal, hq, hkv):
    if dtype == torch.bfloat16 and torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("bfloat16 tensor cores need compute capability 8.0")
    g = torch.Generator(device="cuda").manual_seed(n * 7 + keys)
    q = torch.randn(n, hq, d, device="cuda", generator=g).to(dtype)
    # k, v as the cache lays them out: [N, Hkv, D] viewed as [Hkv, N, D] (key stride Hkv * D)
    k = torch.randn(keys, hkv, d, device="cuda", generator=g).to(dtype).transpose(0, 1)
    v = torch.randn(keys, hkv, d, device="cuda", generator=g).to(dtype).transpose(0, 1)
    scale = d**-0.5
    out, lse = fa2_forward(q, k, v, causal, scale, tile)
    ref_out, ref_lse = _reference(q, k, v, causal, scale)
    bound = max_err(_naive(q, k, v, causal, scale), ref_out)
    assert out.dtype == dtype and out.shape == q.shape and lse.shape == (n, hq)
    assert max_err(out, ref_out) <= 2 * bound + 1e-3, (max_err(out, ref_out), bound)
    assert max_err(lse, ref_lse) < 2e-3


@gpu
def test_kernel_large_logits_stay_finite():
    # scores in the hundreds: the running maximum keeps every exp finite
    g = torch.Generator(device="cuda").manual_seed(3)
    q = (torch.randn(300, 8, 128, device="cuda", generator=g) * 8).half()
    k = (torch.randn(8, 700, 128, device="cuda", generator=g) * 8).half()
    v = torch.randn(8, 700, 128, device="cuda", generator=g).half()
    out, lse = fa2_forward(q, k, v, True, 128**-0.5)
    ref_out, ref_lse = _reference(q, k, v, True, 128**-0.5)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    assert max_err(out, ref_out) <= 2 * max_err(_naive(q, k, v, True, 128**-0.5), ref_out) + 1e-3
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-4, atol=1e-2)


@gpu
def test_shared_memory_size_is_the_kernels():
    # the launch's dynamic shared memory is computed in Python; the kernels' own figures agree
    for d, tiles in wmma_cuda.TILES.items():
        for tile in tiles:
            name = wmma_cuda.kernel_name(torch.float16, d, tile)
            kern = wmma_cuda.module(torch.device("cuda")).kernel(name + "_smem")
            got = torch.zeros(1, dtype=torch.int32, device="cuda")
            kern(1, 1, 0, ctypes.c_void_p(got.data_ptr()))
            assert got.item() == tile.shared_bytes(d), (d, tile)


@gpu
@pytest.mark.parametrize("layout", ["shuffled", "consecutive"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", CASE_IDS)
def test_backend_over_the_paged_cache(case, dtype, layout):
    if dtype == torch.bfloat16 and torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("bfloat16 tensor cores need compute capability 8.0")
    build = make_case if layout == "shuffled" else consecutive_case
    args = CASES[CASE_IDS.index(case)]
    q, kc, vc, meta = _on_gpu(*build(*args, 16, 4, 128, 16, dtype, 2))
    backend = get_backend("wmma_cuda", "cuda")
    assert isinstance(backend, WmmaCudaBackend)
    assert_within_half_rule(backend, q, kc, vc, meta, lse_tol=2e-3)


@gpu
def test_backend_sends_float32_and_other_head_dims_to_the_efficient_kernel():
    q, kc, vc, meta = _on_gpu(*make_case([113], [113], 8, 2, 32, 16, torch.float32, 4))
    out, lse = WmmaCudaBackend().forward(q, kc, vc, meta, 32**-0.5)
    ref_out, ref_lse = reference_attention(q, kc, vc, meta, 32**-0.5)
    assert max_err(out, ref_out) < 1e-4 and max_err(lse, ref_lse) < 1e-4
    assert not math.isnan(out.sum().item())
