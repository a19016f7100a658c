"""``auto`` on a CPU, or on a GPU the Triton kernels do not serve: the fastest exact backend,
decided by measuring the candidates at start-up.

CPUs differ (vector width, cores, torch build), and so do the GPUs before compute capability 8.0
(Volta, Turing), so the choice is measured rather than assumed:
each candidate runs the model's attention shape on two small cases, a prefill chunk over earlier
keys and a decode step, with the keys in whole runs of blocks as the allocator lays them out.
A candidate whose result differs from the float64 reference by more than float rounding is not
exact and drops out; of the others the one with the least total time wins, each case timed by
its best of a few rounds (each timed call right after an untimed one of the same candidate),
candidates interleaved so that a busy moment hits all alike. Tens of milliseconds on an idle
machine.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from runtime.attention.base import AttentionBackend, AttentionMetadata
from runtime.attention.reference import reference_attention

log = logging.getLogger(__name__)

CPU_CANDIDATES = ("fa2_cpu", "flash_cpu", "torch")
# a CUDA GPU without the Triton kernels (compute capability below 8.0, or no Triton)
CUDA_CANDIDATES = ("efficient_cuda", "wmma_cuda", "torch")
ROUNDS = 5
# (query length, sequence length): a chunk after earlier chunks, and a decode step
CASES = ((128, 512), (1, 1024))


@dataclass(frozen=True)
class AttentionShape:
    """What one rank's attention computes: its query and key/value heads, head size, dtype and
    the KV cache's block size."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    block_size: int


@dataclass(frozen=True)
class Choice:
    name: str
    reason: str  # one line for the start-up log
    ms: dict[str, float]  # candidate -> measured milliseconds (inexact ones absent)


def candidates_for(device: torch.device) -> tuple[str, ...]:
    """The backends ``auto`` measures on ``device``'s kind, in order of preference."""
    return CUDA_CANDIDATES if device.type == "cuda" else CPU_CANDIDATES


def _inputs(shape: AttentionShape, qlen: int, slen: int, gen: torch.Generator, device):
    bs = shape.block_size
    n = -(-slen // bs)
    kc = torch.randn(n + 2, bs, shape.num_kv_heads, shape.head_dim, generator=gen)
    vc = torch.randn(n + 2, bs, shape.num_kv_heads, shape.head_dim, generator=gen)
    q = torch.randn(qlen, shape.num_heads, shape.head_dim, generator=gen)
    # two runs of consecutive blocks, as a pool that has been used for a while hands them out
    half = n // 2
    table = list(range(2 + half, 2 + n)) + list(range(2, 2 + half))
    dt = shape.dtype
    meta = AttentionMetadata.build([qlen], [slen], [table], bs, device=device)
    return q.to(device, dt), kc.to(device, dt), vc.to(device, dt), meta


def choose_backend(
    shape: AttentionShape,
    candidates: dict[str, AttentionBackend],
    device: torch.device | str = "cpu",
) -> Choice:
    """Measure ``candidates`` (name -> instance) on ``shape`` on ``device``; the fastest exact
    one wins."""
    device = torch.device(device)
    where = "this CPU" if device.type == "cpu" else f"this {device.type} device"
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    gen = torch.Generator().manual_seed(0)
    scale = shape.head_dim**-0.5
    cases = [_inputs(shape, qlen, slen, gen, device) for qlen, slen in CASES]
    tol = 1e-4 if shape.dtype == torch.float32 else 3e-2
    exact: dict[str, AttentionBackend] = {}
    dropped: list[str] = []
    for name, backend in candidates.items():
        ok = True
        for q, kc, vc, meta in cases:
            ref_out, ref_lse = reference_attention(q, kc, vc, meta, scale)
            try:
                out, lse = backend.forward(q, kc, vc, meta, scale)
            except Exception as e:  # a candidate that cannot run this shape drops out
                log.info("attention candidate %s failed on this shape: %s", name, e)
                ok = False
                break
            err = max((out.double() - ref_out).abs().max().item(),
                      (lse.double() - ref_lse).abs().max().item())  # fmt: skip
            ok = ok and err < tol
        (exact.__setitem__(name, backend) if ok else dropped.append(name))
    if not exact:
        raise RuntimeError(f"no exact attention backend among {list(candidates)} on {where}")
    # best time of each (candidate, case): on a busy machine a call is sometimes descheduled
    # for a time slice (worse for a kernel whose threads wait for each other), and the best of
    # a few tries is the cost of the work itself
    best = {(name, i): float("inf") for name in exact for i in range(len(cases))}
    for _ in range(ROUNDS):
        for name, backend in exact.items():  # interleaved: load changes hit every candidate
            for i, (q, kc, vc, meta) in enumerate(cases):
                # untimed first: the timed call does not pay for the caches and freed pages the
                # previous candidate left (the portable backend's large temporaries)
                backend.forward(q, kc, vc, meta, scale)
                sync()
                t0 = time.perf_counter()
                backend.forward(q, kc, vc, meta, scale)
                sync()
                best[name, i] = min(best[name, i], time.perf_counter() - t0)
    ms = {name: 1000 * sum(best[name, i] for i in range(len(cases))) for name in exact}
    name = min(ms, key=ms.get)
    timings = ", ".join(f"{n} {t:.2f} ms" for n, t in sorted(ms.items(), key=lambda x: x[1]))
    reason = f"auto: fastest exact on {where}: {timings}"
    reason += f"; not exact: {', '.join(dropped)}" if dropped else ""
    return Choice(name, reason, ms)
