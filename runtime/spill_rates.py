"""Measures the rates the spill cost model (``scheduler.spill_cost``) weighs, once at warm-up.

Host->device bandwidth from pinned memory, and the attention rate of the device backend and of
the CPU path (``runtime.attention.partial``), each in a decode shape (bytes of KV read per
second) and a prefill shape (FLOP/s). Small, fixed problems, best of a few runs, so that it
costs well under a second on a GPU machine.
"""

from __future__ import annotations

import time

import torch

from runtime import device as dev
from runtime.attention.base import AttentionBackend, AttentionMetadata
from runtime.attention.partial import visible_attention
from scheduler.spill_cost import SpillRates, attention_flops


def _best(fn, device: torch.device, repeats: int = 3) -> float:
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
    return nbytes / _best(lambda: dst.copy_(src, non_blocking=True), device)


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
    link_bytes: int = 64 << 20,
) -> SpillRates:
    """Rates of this worker's device and CPU for attention over ``keys`` cached keys."""
    g = torch.Generator().manual_seed(0)
    nblk = -(-keys // block_size)
    shape = (nblk, block_size, num_kv_heads, head_dim)
    kc = torch.randn(shape, generator=g).to(dtype)
    vc = torch.randn(shape, generator=g).to(dtype)
    kd, vd = kc.to(device), vc.to(device)
    table = [list(range(nblk))]
    scale = head_dim**-0.5
    kv_bytes = 2 * keys * num_kv_heads * head_dim * kc.element_size()

    def device_time(qlen: int) -> float:
        meta = AttentionMetadata.build([qlen], [keys], table, block_size, device)
        q = torch.randn(qlen, num_heads, head_dim, generator=g).to(dtype).to(device)
        return _best(lambda: backend.forward(q, kd, vd, meta, scale), device)

    cpu = torch.device("cpu")
    kf = kc.view(-1, num_kv_heads, head_dim)[:keys]
    vf = vc.view(-1, num_kv_heads, head_dim)[:keys]

    def cpu_time(qlen: int) -> float:
        q = torch.randn(qlen, num_heads, head_dim, generator=g).to(dtype)
        return _best(lambda: visible_attention(q, kf, vf, scale), cpu, repeats=2)

    flops = attention_flops(queries, keys, num_heads, head_dim)
    return SpillRates(
        link_bytes_per_s=link_rate(device, link_bytes),
        device_flops=flops / device_time(queries),
        device_bytes_per_s=kv_bytes / device_time(1),
        cpu_flops=flops / cpu_time(queries),
        cpu_bytes_per_s=kv_bytes / cpu_time(1),
    )
