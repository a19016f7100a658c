"""CPU attention on our own FlashAttention-2 forward in C++ (``csrc/fa2_cpu.cpp``).

The kernel puts query rows in the vector lanes: the query heads that share a K/V head share each
key it loads, the softmax needs no horizontal reductions, and the exponentials are taken in
registers straight after the products. Against torch's CPU flash kernel, which runs both products
as GEMM calls on tiles and the softmax as passes over scores in memory between them, that is
1.2-1.6x on the demo model's heads on 2 cores (``scripts/bench_cpu_attention.py``).

It is built on first use with the machine's C++ compiler for this CPU (``runtime.cpu_module``);
a machine without one does not offer this backend. Prefill runs through
:class:`runtime.attention.fused_runs.FusedRunsBackend` (runs of blocks read in place, chunks
split at their start and merged through lse) with this kernel as the one call for float32 at
head dims 32, 64, 80, 96, 128 and 256. Calls with fewer query rows than one register tile (the
decode step), other dtypes and head dims go to torch's CPU flash kernel, as in ``flash_cpu``.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from runtime import cpu_module
from runtime.attention.cpu_flash import CpuFlashBackend

SOURCE = Path(__file__).with_name("csrc") / "fa2_cpu.cpp"
_ERRORS = {1: "bad shape", 2: "causal with a query count unlike the key count", 3: "no memory",
           4: "head dim not compiled in"}  # fmt: skip


class Fa2Library:
    """The built kernel's entry points."""

    def __init__(self, march: str = "native") -> None:
        lib = cpu_module.load(SOURCE, march)
        i64, i32, ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
        self.forward = lib.tilerun_fa2_cpu_f32
        self.forward.restype = i32
        self.forward.argtypes = [ptr, i64, i64] * 4 + [ptr] + [i32] * 6 + [ctypes.c_float, i32]
        self.head_dim_ok = lib.tilerun_fa2_cpu_head_dim_ok
        self.head_dim_ok.argtypes, self.head_dim_ok.restype = [i32], i32
        self.lanes = lib.tilerun_fa2_cpu_lanes()
        self.tile_rows = lib.tilerun_fa2_cpu_tile_rows()

    def attend(self, q, k, v, causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """``q [n, Hq, D]`` over ``k``/``v`` ``[1, Hkv, N, D]`` (float32, last dim contiguous)
        -> ``out [n, Hq, D]``, ``lse [n, Hq]``."""
        n, hq, d = q.shape
        hkv, nk = k.shape[1], k.shape[2]
        out = torch.empty(n, hq, d, dtype=torch.float32)
        lse = torch.empty(n, hq, dtype=torch.float32)
        rc = self.forward(
            q.data_ptr(), q.stride(0), q.stride(1),
            k.data_ptr(), k.stride(2), k.stride(1),
            v.data_ptr(), v.stride(2), v.stride(1),
            out.data_ptr(), out.stride(0), out.stride(1),
            lse.data_ptr(), n, nk, hq, hkv, d, int(causal), scale, torch.get_num_threads(),
        )  # fmt: skip
        if rc:
            raise RuntimeError(f"fa2_cpu kernel refused q {tuple(q.shape)} over "
                               f"{tuple(k.shape)}: {_ERRORS.get(rc, rc)}")  # fmt: skip
        return out, lse


_library: Fa2Library | None = None


def library() -> Fa2Library:
    """This process's kernel for this CPU (built or taken from the cache on first use)."""
    global _library
    if _library is None:
        _library = Fa2Library()
    return _library


class Fa2CpuBackend(CpuFlashBackend):
    """Our FlashAttention-2 kernel for CPUs, one call per run of consecutive blocks."""

    name = "fa2_cpu"

    @classmethod
    def supports(cls, device: torch.device) -> str | None:
        why = super().supports(device)  # torch's kernel takes the calls ours does not
        if why:
            return why
        try:
            library()  # built now, so a compiler that fails is one line at start, not mid-step
        except cpu_module.CpuBuildError as e:
            return str(e)
        return None

    def attend(self, q, k, v, causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        lib = library()
        n, hq, d = q.shape
        ours = (
            q.dtype == torch.float32
            and k.dtype == torch.float32
            and lib.head_dim_ok(d)
            and n * (hq // k.shape[1]) >= lib.tile_rows  # fewer rows: lanes left idle
            and q.stride(2) == 1 and k.stride(3) == 1 and v.stride(3) == 1
        )  # fmt: skip
        if not ours:
            return super().attend(q, k, v, causal, scale)
        return lib.attend(q, k, v, causal, scale)
