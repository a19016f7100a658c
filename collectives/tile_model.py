"""How many tiles the row-parallel AllReduce should be cut into: a small pipeline cost model.

Pure Python (no torch): ``collectives.cost`` measures the figures on a live group and builds the
chooser from it; ``runtime.parallel.ParallelState.tiles_for`` is the one place that decides
between the switch (off: 1), a fixed count and this model.

Model, for ``n`` tiles of a ``[T, out] = [T, in] @ [in, out]`` row-parallel projection over ``p``
ranks, with a ring AllReduce over links of bandwidth ``B`` and per-message latency ``a``::

    compute of one tile   c = 2 * T * out * in / (n * flops) + tile_overhead
                              + out * in * bytes / weight_read_rate
    AllReduce of one tile m = a + 2 * (p - 1) / p * (T * out * bytes / n) / B
    pipeline              t(n) = c + (n - 1) * max(c, m) + m

``n = 1`` is the plain path (all compute, then one AllReduce). More tiles hide more communication
behind compute but pay, ``n`` times, the message latency, the launch overhead and the weight read:
each tile's matmul streams (and a CPU BLAS packs) the whole weight again, which is what makes thin
tiles slow. The model picks the smallest ``n`` within ``rel_tol`` of the best, so it only tiles
when tiling pays.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LinkCosts:
    """Measured figures of one tensor-parallel group (all positive).

    Attributes:
        bandwidth: link (bus) bandwidth in bytes/s, as in nccl-tests' ``busbw``: a ring
            AllReduce of ``S`` bytes over ``p`` ranks moves ``2 (p - 1) / p * S`` bytes per link.
        latency_s: fixed cost of one AllReduce message, seconds.
        flops: matmul rate of one rank, FLOP/s.
        tile_overhead_s: fixed cost of launching one tile's matmul, seconds.
        weight_read_rate: bytes/s at which one matmul call gets through its weight, whatever the
            rows (memory streaming, BLAS packing); ``inf`` when that is free.
    """

    bandwidth: float
    latency_s: float
    flops: float
    tile_overhead_s: float = 0.0
    weight_read_rate: float = float("inf")

    def __post_init__(self) -> None:
        for name in ("bandwidth", "flops", "weight_read_rate"):
            if not getattr(self, name) > 0:
                raise ValueError(f"LinkCosts.{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("latency_s", "tile_overhead_s"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"LinkCosts.{name} must be >= 0, got {getattr(self, name)!r}")


def allreduce_time(nbytes: float, world_size: int, costs: LinkCosts) -> float:
    """Modelled time of one ring AllReduce of ``nbytes`` over ``world_size`` ranks."""
    if world_size <= 1:
        return 0.0
    return costs.latency_s + 2.0 * (world_size - 1) / world_size * nbytes / costs.bandwidth


def pipeline_time(
    num_tiles: int,
    rows: int,
    out_features: int,
    in_features: int,
    element_bytes: int,
    world_size: int,
    costs: LinkCosts,
) -> float:
    """Modelled time of the row-parallel projection cut into ``num_tiles`` row tiles."""
    n = max(1, min(num_tiles, rows)) if rows > 0 else 1
    c = (
        2.0 * rows * out_features * in_features / (n * costs.flops)
        + costs.tile_overhead_s
        + out_features * in_features * element_bytes / costs.weight_read_rate
    )
    m = allreduce_time(rows * out_features * element_bytes / n, world_size, costs)
    return c + (n - 1) * max(c, m) + m


def choose_num_tiles(
    rows: int,
    out_features: int,
    in_features: int,
    element_bytes: int,
    world_size: int,
    bandwidth: float,
    latency_s: float,
    flops: float,
    max_tiles: int = 16,
    tile_overhead_s: float = 0.0,
    weight_read_rate: float = float("inf"),
    rel_tol: float = 0.02,
) -> int:
    """The tile count in ``[1, max_tiles]`` (and ``<= rows``) the model predicts is fastest.

    Among counts whose modelled time is within ``rel_tol`` of the best, the smallest wins: fewer,
    larger tiles keep the matmul efficient in ways the model does not see.
    """
    if world_size <= 1 or rows <= 1 or max_tiles <= 1:
        return 1
    costs = LinkCosts(bandwidth, latency_s, flops, tile_overhead_s, weight_read_rate)
    limit = min(max_tiles, rows)
    times = {
        n: pipeline_time(n, rows, out_features, in_features, element_bytes, world_size, costs)
        for n in range(1, limit + 1)
    }
    best = min(times.values())
    return min(n for n, t in times.items() if t <= best * (1.0 + rel_tol))


__all__ = [
    "LinkCosts",
    "allreduce_time",
    "pipeline_time",
    "choose_num_tiles",
]
