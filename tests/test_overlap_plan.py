"""The tiling-AllReduce cost model (scheduler/overlap.py): when tiling pays and when it does not."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from scheduler.overlap import (
    LinkCosts,
    OverlapConfig,
    choose_num_tiles,
    pipeline_time,
    resolve_num_tiles,
)

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


def test_resolve_honours_switch_and_override() -> None:
    costs = LinkCosts(_bandwidth_for(COMPUTE_S), 5e-6, FLOPS)
    assert resolve_num_tiles(OverlapConfig(enabled=False), **SHAPE, costs=costs) == 1
    assert resolve_num_tiles(OverlapConfig(num_tiles=3), **SHAPE, costs=costs) == 3
    # the override wins even where the model would not tile at all
    idle = LinkCosts(1e18, 1e-7, FLOPS)
    assert resolve_num_tiles(OverlapConfig(num_tiles=5), **SHAPE, costs=idle) == 5
    assert resolve_num_tiles(OverlapConfig(), **SHAPE, costs=None) == 1
    assert resolve_num_tiles(OverlapConfig(max_tiles=2), **SHAPE, costs=costs) == 2


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"max_tiles": 0}, "max_tiles"),
        ({"max_tiles": 2.5}, "max_tiles"),
        ({"num_tiles": 0}, "num_tiles"),
        ({"num_tiles": "4"}, "num_tiles"),
        ({"enabled": "yes"}, "enabled"),
    ],
)
def test_bad_config_names_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=rf"overlap\.{field}"):
        OverlapConfig(**kwargs)


def test_bad_costs_name_the_field() -> None:
    with pytest.raises(ValueError, match="bandwidth"):
        LinkCosts(0.0, 1e-6, FLOPS)
    with pytest.raises(ValueError, match="latency_s"):
        LinkCosts(1e9, -1.0, FLOPS)


def test_scheduler_overlap_does_not_import_torch() -> None:
    import subprocess

    code = "import sys, scheduler.overlap; assert 'torch' not in sys.modules"
    repo = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=repo)
