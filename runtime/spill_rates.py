"""Measures the rates the spill cost model (``scheduler.spill_cost``) weighs, once at warm-up.

Host->device bandwidth from pinned memory, the attention rate of the device backend, and the
rate of the CPU part of cooperative attention, each in a decode shape (bytes of KV read per
second) and a prefill shape (FLOP/s). The CPU is timed on the path the step runs:
``runtime.attention.partial.host_attention`` over host KV laid out as the host pool holds it
(runs of contiguous blocks, each run a separate tensor read in place), with the threads the
step gets; every method in ``CPU_METHODS`` is timed and the fastest is the one the step uses.
Small, fixed problems, best of a few runs, so that it costs well under a second on a GPU
machine. ``scripts/bench_long_context.py`` reports the same figures beside its bounds.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from runtime import device as dev
from runtime import kv_quant
from runtime.attention.base import AttentionBackend, AttentionMetadata
from runtime.attention.partial import CPU_METHODS, fused_available, host_attention
from scheduler.spill_cost import SpillRates, attention_flops

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CpuAttentionRate:
    """The CPU part's method (``CPU_METHODS``) and its decode rate, with every method's rate."""

    method: str
    bytes_per_s: float  # host KV bytes (as stored) read per second, one query per sequence
    tried: dict[str, float] = field(default_factory=dict)  # method -> bytes/s


@dataclass(frozen=True)
class MeasuredRates:
    """What a worker measured: the cost model's rates and the CPU method the step uses."""

    spill: SpillRates
    cpu: CpuAttentionRate


def best_time(fn, device: torch.device, repeats: int = 3) -> float:
    """Seconds of the fastest of ``repeats`` calls of ``fn`` after one warm-up call, each
    synchronised with ``device``."""
    fn()  # warm
    dev.synchronize(device)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        dev.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return max(best, 1e-9)


def link_rate(device: torch.device, nbytes: int = 64 << 20) -> float:
    """Host->device bytes/s from pinned memory (a host memcpy rate where there is no link)."""
    pin = device.type == "cuda"
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    return nbytes / best_time(lambda: dst.copy_(src, non_blocking=True), device)


def host_kv_runs(
    keys: int, run_tokens: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, seed: int = 0
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Host KV of ``keys`` tokens as the host pool hands it to the CPU part: runs of at most
    ``run_tokens`` tokens (one host chunk's rows of one layer), each a contiguous
    ``[n, Hkv, D]`` view of its own allocation. Every run holds a copy of one random run (a
    GiB of random numbers would cost seconds; the time to read them does not depend on them)."""
    g = torch.Generator().manual_seed(seed)
    n0 = min(run_tokens, keys)
    pattern = torch.randn(2, n0, num_kv_heads, head_dim, generator=g).to(dtype)
    ks, vs = [], []
    for start in range(0, keys, run_tokens):
        n = min(run_tokens, keys - start)
        block = pattern[:, :n].clone()
        ks.append(block[0])
        vs.append(block[1])
    return ks, vs


def cpu_attention_rate(
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    *,
    keys: int = 32768,
    run_tokens: int = 2048,
    queries: int = 1,
    methods: tuple[str, ...] | None = None,
    threads: int | None = None,
    repeats: int = 3,
    runs: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None,
    quant: str | None = None,
    block_size: int = 16,
) -> CpuAttentionRate:
    """Time ``host_attention`` of ``queries`` queries over ``keys`` host tokens in runs of
    ``run_tokens``, with ``threads`` torch threads, by each method; the fastest wins (a tie
    within 5 % goes to the one listed first in ``CPU_METHODS``: the fused kernel on float32
    rounds least). ``runs``: the host KV to read, if already made (``host_kv_runs``).
    ``quant`` (``fp8``/``int8``): the host pool stores 8-bit blocks, which the step
    dequantizes to ``dtype`` before it attends: that is timed too, and the rate is in stored
    bytes (what the cost model counts)."""
    if methods is None:
        methods = CPU_METHODS if fused_available() else ("tiled",)
    ks, vs = runs or host_kv_runs(keys, run_tokens, num_kv_heads, head_dim, dtype)
    q = torch.randn(queries, num_heads, head_dim, generator=torch.Generator().manual_seed(1))
    q = q.to(dtype)
    nbytes = sum(k.nbytes + v.nbytes for k, v in zip(ks, vs))
    stored = None
    if quant:
        stored = [[_quantize_run(x, quant, block_size) for x in side] for side in (ks, vs)]
        nbytes = sum(qx.nbytes + sx.nbytes for side in stored for qx, sx in side)

    def read():
        """The K and V runs the step attends over, dequantized each time as the step does."""
        if stored is None:
            return ks, vs
        return tuple(
            [kv_quant.dequantize(qx, sx, quant, dtype).flatten(0, 1) for qx, sx in side]
            for side in stored
        )

    cpu = torch.device("cpu")
    scale = head_dim**-0.5
    tried = {}
    with dev.torch_threads(threads):
        for m in methods:
            try:
                t = best_time(lambda m=m: host_attention(q, *read(), scale, m), cpu, repeats)
            except (RuntimeError, NotImplementedError) as e:  # this torch's kernel refuses it
                log.warning("cpu attention method %s does not run here: %s", m, e)
                continue
            tried[m] = nbytes / t
    order = [m for m in CPU_METHODS if m in tried]
    top = max(tried.values())
    method = next(m for m in order if tried[m] >= 0.95 * top)
    return CpuAttentionRate(method, tried[method], tried)


def causal_flops(queries: int, keys: int, num_heads: int, head_dim: int) -> float:
    """FLOPs of causal attention for the last ``queries`` positions of a ``keys``-long sequence:
    query ``i`` of them sees ``keys - queries + 1 + i`` keys."""
    visible = queries * (keys - queries) + queries * (queries + 1) / 2
    return 4.0 * visible * num_heads * head_dim


def _quantize_run(x: torch.Tensor, quant: str, block_size: int):
    """A run ``[n, Hkv, D]`` as the host pool stores it: 8-bit blocks and one scale each."""
    n = x.shape[0] // block_size * block_size
    return kv_quant.quantize(x[:n].reshape(-1, block_size, *x.shape[1:]), quant)


def measure_rates(
    backend: AttentionBackend,
    device: torch.device,
    dtype: torch.dtype,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    *,
    keys: int = 8192,
    queries: int = 256,
    prefill_queries: int = 4096,
    link_bytes: int = 64 << 20,
    cpu_keys: int = 32768,
    run_tokens: int = 2048,
    host_dtype: torch.dtype | None = None,
    cpu_threads: int | None = None,
    quant: str | None = None,
) -> MeasuredRates:
    """Rates of this worker's device and CPU for attention over ``keys`` cached keys on the
    device and ``cpu_keys`` host keys (stored as ``host_dtype``, in runs of ``run_tokens``;
    ``quant``: stored as 8-bit blocks, dequantized to ``host_dtype`` by the CPU part).

    The device's FLOP rate is taken at a prefill chunk's shape, ``prefill_queries`` queries at
    the end of a sequence twice as long (at least ``keys``): with a few hundred queries the
    kernel fills a fraction of the device, and the model, told the device is that slow, gave
    the CPU a share of long prefill chunks it then waited for (measured on an H200: 8B shape
    at 512K, prefill 2.2x its attention time). The CPU's FLOP rate stays at ``queries``: its
    kernel is compute-bound at any query count."""
    g = torch.Generator().manual_seed(0)
    keys = max(keys, 2 * prefill_queries)
    nblk = -(-keys // block_size)
    shape = (nblk, block_size, num_kv_heads, head_dim)
    kc = torch.randn(shape, generator=g).to(dtype)
    vc = torch.randn(shape, generator=g).to(dtype)
    kd, vd = kc.to(device), vc.to(device)
    table = [list(range(nblk))]
    scale = head_dim**-0.5
    kv_bytes = 2 * keys * num_kv_heads * head_dim * kc.element_size()
    del kc, vc

    def device_time(qlen: int) -> float:
        meta = AttentionMetadata.build([qlen], [keys], table, block_size, device)
        q = torch.randn(qlen, num_heads, head_dim, generator=g).to(dtype).to(device)
        return best_time(lambda: backend.forward(q, kd, vd, meta, scale), device)

    host_dtype = host_dtype or dtype
    ks, vs = host_kv_runs(cpu_keys, run_tokens, num_kv_heads, head_dim, host_dtype)
    cpu = cpu_attention_rate(
        num_heads, num_kv_heads, head_dim, host_dtype, threads=cpu_threads, runs=(ks, vs),
        quant=quant, block_size=block_size,
    )  # fmt: skip
    # the prefill shape, by the method the decode shape chose, over the first runs
    pre_keys, n = 0, 0
    while n < len(ks) and pre_keys < min(cpu_keys, keys):
        pre_keys += ks[n].shape[0]
        n += 1
    ks, vs = ks[:n], vs[:n]
    q = torch.randn(queries, num_heads, head_dim, generator=g).to(dtype)
    with dev.torch_threads(cpu_threads):
        t = best_time(
            lambda: host_attention(q, ks, vs, scale, cpu.method), torch.device("cpu"), repeats=2
        )
    spill = SpillRates(
        link_bytes_per_s=link_rate(device, link_bytes),
        device_flops=causal_flops(prefill_queries, keys, num_heads, head_dim)
        / device_time(prefill_queries),
        device_bytes_per_s=kv_bytes / device_time(1),
        cpu_flops=attention_flops(queries, pre_keys, num_heads, head_dim) / t,
        cpu_bytes_per_s=cpu.bytes_per_s,
    )
    return MeasuredRates(spill, cpu)
