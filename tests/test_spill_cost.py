"""The spill cost model: which share of host-resident KV the CPU attends, from measured rates."""

from __future__ import annotations

import pytest

from scheduler.spill_cost import (
    GRID,
    SpillRates,
    StepShape,
    attention_flops,
    choose,
    layer_seconds,
)

# an H100-like device, a PCIe 5 link, a many-core host
H100 = SpillRates(
    link_bytes_per_s=50e9,
    device_flops=400e12,
    device_bytes_per_s=2.5e12,
    cpu_flops=2e12,
    cpu_bytes_per_s=60e9,
)


def decode_shape(device_keys: int, host_keys: int, heads=32, kv_heads=32, d=128, elem=2):
    per_key = 2 * kv_heads * d * elem
    return StepShape(
        device_flops=attention_flops(1, device_keys, heads, d),
        device_bytes=device_keys * per_key,
        host_flops=attention_flops(1, host_keys, heads, d),
        host_bytes=host_keys * per_key,
        host_bytes_on_device=host_keys * per_key,
        host_blocks=host_keys // 16,
        host_seqs=1 if host_keys else 0,
    )


def prefill_shape(queries: int, device_keys: int, host_keys: int, heads=32, kv_heads=32, d=128):
    per_key = 2 * kv_heads * d * 2
    return StepShape(
        # bf16 queries out, float32 out and lse back (runtime.worker._step_shape)
        cpu_io_bytes=queries * heads * (d * (2 + 4) + 4),
        device_flops=attention_flops(queries, device_keys, heads, d),
        device_bytes=device_keys * per_key,
        host_flops=attention_flops(queries, host_keys, heads, d),
        host_bytes=host_keys * per_key,
        host_bytes_on_device=host_keys * per_key,
        host_blocks=host_keys // 16,
        host_seqs=1 if host_keys else 0,
    )


def test_decode_over_host_kv_shares_the_reads_between_link_and_cpu():
    # decode reads every host byte once: the link (50 GB/s) and the CPU (60 GB/s) together
    # beat either alone, so the model gives the CPU about 60/110 of the host blocks
    c = choose(decode_shape(64_000, 192_000), H100)
    assert c.mode == "cooperate"
    assert 0.4 < c.cpu_fraction < 0.7
    assert c.layer_seconds < layer_seconds(decode_shape(64_000, 192_000), H100, 0.0)
    assert c.layer_seconds < layer_seconds(decode_shape(64_000, 192_000), H100, 1.0)


def test_prefill_chunks_stream_because_the_cpu_cannot_keep_up_with_the_flops():
    # a 4096-query chunk over 128K host keys: the CPU's 2 TFLOP/s is 200x too slow
    c = choose(prefill_shape(4096, 8192, 131_072), H100)
    assert c.mode == "stream" and c.cpu_fraction == 0.0


def test_a_chunk_with_few_host_blocks_streams_them():
    # the first spilled chunk of the 8B shape at 512K on an H200 (rates the worker measured
    # there): 445 host blocks beside 361K device keys. The CPU's sixteenth saved 0.1 % on
    # paper; in the run its part ran ~120 ms a layer past the device's (3.8 s exposed)
    h200 = SpillRates(52.9e9, 379.4e12, 269e9, 0.89e12, 36.2e9)
    shape = prefill_shape(8192, 361_520, 445 * 16, kv_heads=8)
    assert choose(shape, h200).mode == "stream"
    # forced, the CPU still takes its modelled share
    assert choose(shape, h200, "cooperate").mode == "cooperate"
    # decode's queries and partials are a few KB: the split still pays there
    d = decode_shape(361_520, 162_784, kv_heads=8)
    assert choose(d, h200).mode == "cooperate"


def test_forced_modes_and_unknown_rates():
    shape = decode_shape(1000, 5000)
    assert choose(shape, H100, "stream").cpu_fraction == 0.0
    forced = choose(shape, H100, "cooperate")
    assert forced.mode == "cooperate" and forced.cpu_fraction >= 1 / GRID
    # forced cooperate on a prefill chunk: the CPU takes one block per sequence (its FLOPs hide
    # behind the device's), never a fixed share of the chunk
    big = prefill_shape(4096, 8192, 131_072)
    c = choose(big, H100, "cooperate")
    assert c.mode == "cooperate" and c.cpu_fraction == 0.0 and c.cpu_min_blocks == 1
    assert c.layer_seconds <= layer_seconds(big, H100, 0.0)
    # ... unless even that would make the layer wait for the CPU: then everything streams
    slow = SpillRates(50e9, 400e12, 2.5e12, cpu_flops=1e9, cpu_bytes_per_s=1e8)
    s = choose(big, slow, "cooperate")
    assert s.mode == "stream" and s.cpu_fraction == 0.0 and s.cpu_min_blocks == 0
    unknown = SpillRates(0, 0, 0, 0, 0)
    assert choose(shape, unknown).mode == "stream"
    assert choose(shape, None, "cooperate").cpu_fraction == 0.5
    assert choose(decode_shape(1000, 0), H100, "cooperate").mode == "stream"  # nothing on host
    with pytest.raises(ValueError, match="spill mode 'fast'"):
        choose(shape, H100, "fast")


def test_the_choice_is_the_grid_minimum():
    for shape in (decode_shape(10, 100_000), prefill_shape(64, 1000, 20_000)):
        c = choose(shape, H100)
        best = min(layer_seconds(shape, H100, i / GRID) for i in range(GRID + 1))
        assert c.layer_seconds == pytest.approx(best)


def test_a_slow_cpu_is_never_asked():
    slow = SpillRates(50e9, 400e12, 2.5e12, cpu_flops=1e9, cpu_bytes_per_s=1e8)
    assert choose(decode_shape(64_000, 192_000), slow).mode == "stream"
