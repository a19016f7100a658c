"""Measure the figures the tile-count model (``collectives/tile_model.py``) needs, on a live group,
and turn them into the tile chooser a worker's row-parallel linears consult.

``measure_link`` and ``measured_tile_chooser`` are collective: every rank of the group calls them
together, and every rank gets the same figures, so every rank chooses the same tile count.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable

import torch

from collectives.base import Communicator
from collectives.tile_model import LinkCosts, choose_num_tiles


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_all_reduce(comm: Communicator, t: torch.Tensor, iters: int) -> float:
    comm.all_reduce(t)  # warm-up: connection set-up and buffer registration are not the link
    _sync(t.device)
    comm.barrier()
    start = time.perf_counter()
    for _ in range(iters):
        comm.all_reduce(t)
    _sync(t.device)
    return (time.perf_counter() - start) / iters


def measure_link(
    comm: Communicator,
    device: torch.device | str = "cpu",
    small_bytes: int = 4096,
    large_bytes: int = 32 << 20,
    iters: int = 5,
) -> tuple[float, float]:
    """``(bus bandwidth in bytes/s, per-message latency in s)`` of ``comm``'s AllReduce.

    Latency is the time of a small AllReduce; bandwidth follows from the extra time of a large
    one, in nccl-tests' ``busbw`` convention (a ring moves ``2 (p - 1) / p`` of the message per
    link). The figures are averaged over the ranks so that every rank gets the same numbers, and
    hence plans the same tile count.
    """
    device = torch.device(device)
    p = comm.world_size
    if p == 1:
        return float("inf"), 0.0
    small = torch.zeros(max(1, small_bytes // 4), dtype=torch.float32, device=device)
    large = torch.zeros(max(2, large_bytes // 4), dtype=torch.float32, device=device)
    t_small = _time_all_reduce(comm, small, iters * 4)
    t_large = _time_all_reduce(comm, large, iters)
    moved = 2.0 * (p - 1) / p * (large.numel() - small.numel()) * 4
    bandwidth = moved / max(t_large - t_small, 1e-9)
    # float32: every backend (HCCL included) can sum it, and 7 digits are plenty here
    figures = torch.tensor([bandwidth, t_small], dtype=torch.float32, device=device)
    comm.all_reduce(figures)
    figures /= p
    return float(figures[0]), float(figures[1])


def _time_matmul(x: torch.Tensor, w: torch.Tensor, iters: int) -> float:
    x @ w.T  # warm-up
    _sync(x.device)
    best = float("inf")
    for _ in range(iters):  # best of: noise from other work only ever adds time
        start = time.perf_counter()
        x @ w.T
        _sync(x.device)
        best = min(best, time.perf_counter() - start)
    return best


def measure_matmul_costs(
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    out_features: int = 2048,
    in_features: int = 2048,
    rows: tuple[int, int] = (32, 512),
    iters: int = 5,
) -> tuple[float, float]:
    """``(FLOP/s, weight read rate in bytes/s)`` of ``x @ W.T`` on ``device`` (local).

    Times a thin and a thick ``x`` against the same weight: ``t(r) = w_bytes / weight_rate +
    2 r out in / flops``. The constant part is what every extra tile of a tiled matmul pays again
    (streaming the weight, packing it for the BLAS kernel); ``inf`` when it is lost in the noise.
    """
    device = torch.device(device)
    w = torch.randn(out_features, in_features, device=device).to(dtype)
    thin, thick = (torch.randn(r, in_features, device=device).to(dtype) for r in rows)
    t_thin, t_thick = _time_matmul(thin, w, iters), _time_matmul(thick, w, iters)
    flop_per_row = 2.0 * out_features * in_features
    flops = flop_per_row * (rows[1] - rows[0]) / max(t_thick - t_thin, 1e-12)
    fixed = t_thin - flop_per_row * rows[0] / flops
    w_bytes = w.numel() * w.element_size()
    return flops, (w_bytes / fixed if fixed > 0 else float("inf"))


def measured_tile_chooser(
    comm: Communicator,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    max_tiles: int = 16,
) -> Callable[[int, int, int], int]:
    """Measure ``comm``'s link and this device's matmul rate once; return
    ``choose(rows, out_features, in_features) -> num_tiles`` for the row-parallel linears.

    Collective. The compute rate is averaged over the ranks like the link figures, so the
    returned chooser is the same function on every rank. ``dtype`` is the activations' dtype
    (default float32 on CPU, bfloat16 elsewhere).
    """
    device = torch.device(device)
    if dtype is None:
        dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    if comm.world_size == 1:
        return lambda rows, out_features, in_features: 1
    on_cpu = device.type == "cpu"
    bandwidth, latency = measure_link(comm, device, large_bytes=(8 << 20) if on_cpu else 64 << 20)
    flops, weight_rate = measure_matmul_costs(
        device, dtype, *((2048, 2048, (32, 512)) if on_cpu else (4096, 4096, (256, 8192)))
    )
    # average over ranks as seconds per unit, so that one slow rank weighs in properly
    rate = torch.tensor([1.0 / flops, 1.0 / weight_rate], dtype=torch.float32, device=device)
    comm.all_reduce(rate)
    rate /= comm.world_size
    costs = LinkCosts(
        bandwidth,
        latency,
        1.0 / float(rate[0]),
        weight_read_rate=1.0 / float(rate[1]) if float(rate[1]) > 0 else float("inf"),
    )
    element_bytes = torch.empty((), dtype=dtype).element_size()

    @functools.lru_cache(maxsize=1024)
    def choose(rows: int, out_features: int, in_features: int) -> int:
        return choose_num_tiles(
            rows,
            out_features,
            in_features,
            element_bytes,
            comm.world_size,
            costs.bandwidth,
            costs.latency_s,
            costs.flops,
            max_tiles=max_tiles,
            weight_read_rate=costs.weight_read_rate,
        )

    choose.costs = costs  # for logs and benchmarks
    return choose


__all__ = [
    "measure_link",
    "measure_matmul_costs",
    "measured_tile_chooser",
]
