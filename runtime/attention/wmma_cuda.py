"""CUDA attention on our own FlashAttention-2 kernel in CUDA C++ over the warp matrix API.

``csrc/fa2_wmma.cu`` compiles for every GPU with tensor cores from Volta (sm_70) on, the GPUs
the Triton kernels do not serve, which is where FastAttention's Volta port goes. It is built with
``nvcc`` for the GPU at hand on first use and kept (``runtime.cuda_module``); a machine without
``nvcc`` does not offer this backend.

Prefill runs through :class:`runtime.attention.fused_runs.FusedRunsBackend` like
``efficient_cuda`` (runs of blocks read in place, chunks split at their start and merged through
lse), with this kernel as the one call: float16 and bfloat16 at head dims 64 and 128, grouped
K/V heads read by head index. Anything else (float32, other head dims, unaligned views) and the
decode step go to torch's memory-efficient kernel, as in ``efficient_cuda``.
"""

from __future__ import annotations

import ctypes
import math
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from runtime.attention.cuda_efficient import CudaEfficientBackend
from runtime.cuda_module import CudaBuildError, Module, build, nvcc_path

SOURCE = Path(__file__).with_name("csrc") / "fa2_wmma.cu"
FLAGS = ("-O3", "--use_fast_math", "-std=c++17")
HEAD_DIMS = (64, 128)
_DTYPES = {torch.float16: "f16", torch.bfloat16: "bf16"}
_modules: dict[int, Module] = {}
_lock = threading.Lock()


@dataclass(frozen=True)
class Tile:
    """One compiled shape of the kernel: ``block_m`` query rows per thread block, ``frags``
    16-row fragments per warp (each K/V fragment read from shared memory feeds that many
    products), ``block_n`` keys per softmax step, ``sub`` steps per K/V tile (one barrier per
    tile), whether Q is read from shared memory per step (``q_smem``) instead of held in
    registers, and ``stages`` K/V buffers (1 for GPUs with less shared memory per block)."""

    block_m: int
    frags: int
    block_n: int
    sub: int = 1
    q_smem: bool = False
    stages: int = 2

    @property
    def threads(self) -> int:
        return self.block_m // (16 * self.frags) * 32

    def shared_bytes(self, d: int) -> int:
        """``Smem<...>::BYTES`` of the kernel source: Q, the K and V buffers (rows of ``d + 8``
        halves), and per warp a float32 and a half score tile and the rows' factors."""
        lanes_per_row = 32 // (16 * self.frags)
        lds, ldp = self.block_n + (4 if lanes_per_row == 1 else 8), self.block_n + 8
        ldh = d + 8
        kv = 2 * self.stages * self.block_n * self.sub * ldh * 2
        return self.block_m * ldh * 2 + kv + self.block_m * (lds * 4 + ldp * 2 + 4)


#: the shapes a launch takes by head dim, fastest first (H100, causal 4K-32K, 32 heads:
#: ``scripts/bench_wmma_tiles.py`` -> ``benchmarks/results/wmma-tiles-*.json``); a GPU takes the
#: first whose shared memory fits its per-block limit: 99 KB and 109 KB for the first ones, so
#: Volta (96 KB) takes the one-buffer 128-row tiles (81 KB, 57 KB) and Turing (64 KB) the
#: 64-row one at head dim 128 (49 KB)
PREFERRED = {
    64: (Tile(128, 2, 64), Tile(128, 2, 32, stages=1)),
    128: (
        Tile(128, 2, 32, q_smem=True),
        Tile(128, 2, 32, q_smem=True, stages=1),
        Tile(64, 2, 32, q_smem=True, stages=1),
    ),
}
#: every shape built (``FA2_KERNELS`` in the source): the preferred ones and the ones measured
#: against them
TILES = {
    64: (*PREFERRED[64], Tile(128, 2, 32, sub=2)),
    128: (*PREFERRED[128], Tile(64, 1, 64), Tile(256, 2, 32, q_smem=True)),
}
_chosen: dict[tuple[int, int], Tile] = {}


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def tile_for(head_dim: int, device: torch.device) -> Tile:
    """The fastest preferred tile whose shared memory fits ``device``'s per-block limit."""
    index = _index(device)
    key = (head_dim, index)
    if key not in _chosen:
        props = torch.cuda.get_device_properties(index)
        limit = getattr(props, "shared_memory_per_block_optin", 48 * 1024)
        fits = [t for t in PREFERRED[head_dim] if t.shared_bytes(head_dim) <= limit]
        if not fits:
            raise ValueError(
                f"wmma_cuda: no tile fits {limit} bytes of shared memory per block "
                f"at head dim {head_dim}; use --attention efficient_cuda"
            )
        _chosen[key] = fits[0]
    return _chosen[key]


def kernel_name(dtype: torch.dtype, head_dim: int, tile: Tile) -> str:
    """The cubin's kernel for ``dtype``, ``head_dim`` and ``tile``."""
    t = tile
    sub = f"_s{t.sub}" if t.sub > 1 else ""
    one = "_b1" if t.stages == 1 else ""
    qs = "_qs" if t.q_smem else ""
    name = f"fa2_{_DTYPES[dtype]}_d{head_dim}_m{t.block_m}_r{t.frags}_n{t.block_n}"
    return name + sub + one + qs


def module(device: torch.device) -> Module:
    """The built kernels, loaded on ``device`` (built on first use, then cached on disk)."""
    index = _index(device)
    with _lock:
        if index not in _modules:
            cap = torch.cuda.get_device_capability(index)
            _modules[index] = Module(build(SOURCE, cap, FLAGS), torch.device("cuda", index))
        return _modules[index]


def _aligned(*xs: torch.Tensor) -> bool:
    # 16-byte rows: cp.async and the vector stores move 8 halves at a time
    return all(
        x.stride(-1) == 1 and x.data_ptr() % 16 == 0 and all(s % 8 == 0 for s in x.stride()[:-1])
        for x in xs
    )


class WmmaCudaBackend(CudaEfficientBackend):
    """Our FlashAttention-2 CUDA kernel (WMMA) for prefill over the paged cache; decode and the
    shapes it does not take on torch's memory-efficient kernel."""

    name = "wmma_cuda"

    @classmethod
    def supports(cls, device: torch.device) -> str | None:
        reason = super().supports(device)
        if reason is not None:
            return reason.replace("it is torch's CUDA kernel", "it is a CUDA kernel")
        if torch.cuda.get_device_capability(device) < (7, 0):
            return "it needs tensor cores (compute capability 7.0 or newer)"
        if nvcc_path() is None:
            return "it is built on first use and this machine has no CUDA compiler (nvcc)"
        try:  # built here, once (cached on disk), so a failure is told now, not mid-prefill
            module(device)
        except CudaBuildError as e:  # e.g. CUDA 13's nvcc, which no longer targets Volta
            return f"its kernel does not build here: {e}"
        return None

    def attend(self, q, k, v, causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        n, hq, d = q.shape
        _, hkv, keys, _ = k.shape
        if q.dtype not in _DTYPES or d not in HEAD_DIMS or not _aligned(q, k, v):
            return super().attend(q, k, v, causal, scale)
        if q.dtype == torch.bfloat16 and torch.cuda.get_device_capability(q.device) < (8, 0):
            raise ValueError(
                "wmma_cuda: bfloat16 needs compute capability 8.0 or newer; "
                "run this GPU with --dtype float16"
            )
        return fa2_forward(q, k[0], v[0], causal, scale)


def fa2_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    scale: float,
    tile: Tile | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One launch: ``q [n, Hq, D]`` over ``k, v [Hkv, N, D]`` (strided; rows 16-byte aligned)
    -> ``out [n, Hq, D]`` and float32 ``lse [n, Hq]``. ``causal``: query ``i`` sees keys ``0 ..
    i + N - n``. ``tile``: the kernel shape (default: ``tile_for`` the head dim and GPU)."""
    n, hq, d = q.shape
    hkv, keys, _ = k.shape
    out = torch.empty(n, hq, d, dtype=q.dtype, device=q.device)
    lse = torch.empty(n, hq, dtype=torch.float32, device=q.device)
    if n == 0:
        return out, lse
    if keys == 0:
        raise ValueError("wmma_cuda: attention over zero keys")
    try:
        tile = tile or tile_for(d, q.device)
        kern = module(q.device).kernel(kernel_name(q.dtype, d, tile))
    except CudaBuildError as e:
        raise RuntimeError(f"wmma_cuda: {e}") from e
    shared = tile.shared_bytes(d)
    kern.allow_shared(shared)
    c = ctypes
    args = [
        c.c_void_p(q.data_ptr()), c.c_void_p(k.data_ptr()), c.c_void_p(v.data_ptr()),
        c.c_void_p(out.data_ptr()), c.c_void_p(lse.data_ptr()),
        c.c_int(n), c.c_int(keys), c.c_int(hq), c.c_int(hq // hkv),
        c.c_longlong(q.stride(0)), c.c_longlong(q.stride(1)),
        c.c_longlong(k.stride(1)), c.c_longlong(k.stride(0)),
        c.c_longlong(v.stride(1)), c.c_longlong(v.stride(0)),
        c.c_longlong(out.stride(0)), c.c_longlong(out.stride(1)),
        c.c_float(scale * math.log2(math.e)), c.c_int(int(causal)),
    ]  # fmt: skip
    kern(-(-n // tile.block_m) * hq, tile.threads, shared, *args)
    return out, lse
