"""How many tiles the row-parallel AllReduce should be cut into: a small pipeline cost model.

Pure Python (no torch): the figures it needs are measured on the workers
(``collectives.cost``) and handed to the scheduler as numbers.

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
class OverlapConfig:
    """The tiling-AllReduce switch.

    Attributes:
        enabled: False for the plain path (one AllReduce after the whole matmul).
        num_tiles: a fixed tile count that overrides the cost model (and ``max_tiles``); None
            lets the cost model choose.
        max_tiles: the largest tile count the cost model may choose.
    """

    enabled: bool = True
    num_tiles: int | None = None
    max_tiles: int = 16

    def __post_init__(self) -> None:
        if not isinstance(self.enabled, bool):
            raise ValueError(
                f"overlap.enabled must be true or false, got {self.enabled!r}; "
                "set overlap.enabled: true (tiled AllReduce) or false (plain)"
            )
        if self.num_tiles is not None and (
            isinstance(self.num_tiles, bool)
            or not isinstance(self.num_tiles, int)
            or self.num_tiles < 1
        ):
            raise ValueError(
                f"overlap.num_tiles must be an integer >= 1 or null, got {self.num_tiles!r}; "
                "set it to null to let the cost model choose, or to 1 for no tiling"
            )
        if (
            isinstance(self.max_tiles, bool)
            or not isinstance(self.max_tiles, int)
            or (self.max_tiles < 1)
        ):
            raise ValueError(
                f"overlap.max_tiles must be an integer >= 1, got {self.max_tiles!r}; "
                "set overlap.max_tiles to 1 (never tile) or more (16 is a good default)"
            )


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


def resolve_num_tiles(
    config: OverlapConfig,
    rows: int,
    out_features: int,
    in_features: int,
    element_bytes: int,
    world_size: int,
    costs: LinkCosts | None,
) -> int:
    """The tile count to use under ``config``: 1 when disabled, the override if set, else the
    cost model's choice (1 when no measured ``costs`` are available yet).

    Every rank must use the same count, so compute it once (driver or rank 0) and send it out.
    """
    if not config.enabled:
        return 1
    if config.num_tiles is not None:
        return config.num_tiles
    if costs is None:
        return 1
    return choose_num_tiles(
        rows,
        out_features,
        in_features,
        element_bytes,
        world_size,
        costs.bandwidth,
        costs.latency_s,
        costs.flops,
        max_tiles=config.max_tiles,
        tile_overhead_s=costs.tile_overhead_s,
        weight_read_rate=costs.weight_read_rate,
    )


__all__ = [
    "OverlapConfig",
    "LinkCosts",
    "allreduce_time",
    "pipeline_time",
    "choose_num_tiles",
    "resolve_num_tiles",
]
