"""The tiling-AllReduce tile count: the cost model (collectives/tile_model.py), when tiling pays
and when it does not, and the one decision that applies it (ParallelState.tiles_for)."""

from __future__ import annotations

import pytest

from collectives.tile_model import LinkCosts, choose_num_tiles, pipeline_time
from runtime.parallel import ParallelState

# Llama-7B o_proj at TP=2, 8K tokens, bf16
SHAPE = dict(rows=8192, out_features=4096, in_features=2048, element_bytes=2, world_size=2)
FLOPS = 100e12
COMPUTE_S = 2 * 8192 * 4096 * 2048 / FLOPS  # ~1.4 ms
MESSAGE = 8192 * 4096 * 2  # bytes of the AllReduce


def _bandwidth_for(seconds: float) -> float:
    """Bus bandwidth at which the whole AllReduce takes ``seconds`` (2 ranks: factor 1)."""
    return MESSAGE / seconds


def test_negligible_communication_gives_one_tile() -> None:
    n = choose_num_tiles(**SHAPE, bandwidth=1e18, latency_s=1e-7, flops=FLOPS)
    assert n == 1


def test_latency_dominated_communication_gives_one_tile() -> None:
    # each message costs far more than the whole matmul: every extra tile only adds latency
    n = choose_num_tiles(**SHAPE, bandwidth=1e18, latency_s=10 * COMPUTE_S, flops=FLOPS)
    assert n == 1


def test_comparable_compute_and_communication_gives_many_tiles() -> None:
    n = choose_num_tiles(
        **SHAPE, bandwidth=_bandwidth_for(COMPUTE_S), latency_s=5e-6, flops=FLOPS, max_tiles=16
    )
    assert n >= 8
    costs = LinkCosts(_bandwidth_for(COMPUTE_S), 5e-6, FLOPS)
    plain = pipeline_time(1, **SHAPE, costs=costs)
    tiled = pipeline_time(n, **SHAPE, costs=costs)
    assert plain == pytest.approx(2 * COMPUTE_S + 5e-6, rel=1e-6)  # compute, then communication
    assert tiled < 0.7 * plain


def test_choice_respects_max_tiles_and_rows() -> None:
    common = dict(bandwidth=_bandwidth_for(COMPUTE_S), latency_s=0.0, flops=FLOPS)
    assert choose_num_tiles(**SHAPE, **common, max_tiles=4) <= 4
    assert choose_num_tiles(**{**SHAPE, "rows": 3}, **common, max_tiles=16) <= 3
    assert choose_num_tiles(**{**SHAPE, "world_size": 1}, **common) == 1


def test_per_tile_overhead_limits_the_tile_count() -> None:
    common = dict(bandwidth=_bandwidth_for(COMPUTE_S), latency_s=0.0, flops=FLOPS, max_tiles=64)
    free = choose_num_tiles(**SHAPE, **common)
    costly = choose_num_tiles(**SHAPE, **common, tile_overhead_s=COMPUTE_S / 20)
    assert 1 < costly < free


def test_slow_weight_reads_make_thin_tiles_lose() -> None:
    # every tile's matmul streams the whole weight again: at the rate of a CPU BLAS (~15 GB/s)
    # that costs more than the communication it would hide
    weight_bytes = SHAPE["out_features"] * SHAPE["in_features"] * SHAPE["element_bytes"]
    common = dict(bandwidth=_bandwidth_for(COMPUTE_S / 30), latency_s=5e-6, flops=FLOPS)
    assert choose_num_tiles(**SHAPE, **common) > 1
    slow = weight_bytes / (COMPUTE_S / 10)  # one weight read costs a tenth of the matmul
    assert choose_num_tiles(**SHAPE, **common, weight_read_rate=slow) == 1


class _Group:
    """Only rank and world size are read by the decision."""

    def __init__(self, world_size: int) -> None:
        self.rank, self.world_size = 0, world_size


def _chooser(costs: LinkCosts, max_tiles: int = 16):
    calls = []

    def choose(rows: int, out_features: int, in_features: int) -> int:
        calls.append((rows, out_features, in_features))
        return choose_num_tiles(
            rows, out_features, in_features, SHAPE["element_bytes"], 2,
            costs.bandwidth, costs.latency_s, costs.flops, max_tiles=max_tiles,
        )  # fmt: skip

    return choose, calls


ROWS = (SHAPE["rows"], SHAPE["out_features"], SHAPE["in_features"])


def test_tile_decision_follows_the_model_where_it_pays() -> None:
    costs = LinkCosts(_bandwidth_for(COMPUTE_S), 5e-6, FLOPS)
    choose, calls = _chooser(costs)
    state = ParallelState(comm=_Group(2), tile_chooser=choose)
    assert state.wants_tile_chooser
    assert state.tiles_for(*ROWS) >= 8
    assert calls == [ROWS]  # the model saw this projection's shape
    idle, _ = _chooser(LinkCosts(1e18, 1e-7, FLOPS))
    assert ParallelState(comm=_Group(2), tile_chooser=idle).tiles_for(*ROWS) == 1


def test_tile_decision_honours_switch_override_and_single_rank() -> None:
    choose, calls = _chooser(LinkCosts(_bandwidth_for(COMPUTE_S), 5e-6, FLOPS))
    off = ParallelState(comm=_Group(2), overlap=False, tile_chooser=choose)
    assert off.tiles_for(*ROWS) == 1 and not off.wants_tile_chooser
    fixed = ParallelState(comm=_Group(2), allreduce_tiles=3, tile_chooser=choose)
    assert fixed.tiles_for(*ROWS) == 3 and not fixed.wants_tile_chooser
    alone = ParallelState(tile_chooser=choose)
    assert alone.tiles_for(*ROWS) == 1 and not alone.wants_tile_chooser
    assert calls == []  # none of these consulted the model
    # a group before its figures are measured runs the plain AllReduce
    assert ParallelState(comm=_Group(2)).tiles_for(*ROWS) == 1


def test_bad_costs_name_the_field() -> None:
    with pytest.raises(ValueError, match="bandwidth"):
        LinkCosts(0.0, 1e-6, FLOPS)
    with pytest.raises(ValueError, match="latency_s"):
        LinkCosts(1e9, -1.0, FLOPS)
