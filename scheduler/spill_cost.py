"""Which way to attend over host-resident KV blocks this step: stream them, or let the CPU help.

Pure arithmetic over measured rates (the runtime measures them at warm-up). Per layer, with a
fraction ``f`` of the host blocks' work given to the CPU:

* the link carries the other ``1 - f`` into the device staging area; double buffering hides it
  behind the previous layer, so it costs ``max(0, link - compute)``, modelled as a ``max``;
* the device attends over its own blocks and the streamed ones: ``max(flops / device_flops,
  bytes / device_bandwidth)``;
* the CPU attends over its ``f`` at the same time: ``max(flops / cpu_flops, bytes / cpu_bw)``
  plus moving the queries out and the float32 partial result back over the link (whatever
  ``f``: 192 MB a layer for an 8K-token chunk of 32 heads, which is why prefill chunks stream)
  and a fixed cost per layer.

A layer takes the longest of the three; ``f`` is picked from a grid of sixteenths, and under
``auto`` kept only where it beats ``f == 0`` by ``MIN_GAIN``. ``f == 0`` is the ``stream`` mode,
anything else ``cooperate``. Both are exact, so the model only ever costs
speed, never correctness. Forcing ``cooperate`` lets the CPU take its modelled share, and at
least one block per sequence where that does not slow the layer (model-wise); a prefill chunk,
whose FLOPs the CPU cannot keep up with, then still streams everything.
"""

from __future__ import annotations

from dataclasses import dataclass

MODES = ("auto", "stream", "cooperate", "off")
GRID = 16
# ``auto`` lets the CPU help only where the model says it saves at least this share of the
# layer. Decode over host KV saves 40-50 % (link and CPU read in parallel); a prefill chunk's
# FLOPs leave the CPU a share worth a fraction of a percent, less than the model's error: on
# an H200 (8B shape at 512K) such a chunk's CPU part ran 120 ms a layer past the device's.
MIN_GAIN = 0.05


@dataclass(frozen=True)
class SpillRates:
    """Measured rates; any of them ``<= 0`` means unknown."""

    link_bytes_per_s: float  # host -> device, pinned
    device_flops: float  # attention FLOP/s of the device kernel, long-prefill shaped
    device_bytes_per_s: float  # KV bytes/s the device kernel reads, decode shaped
    cpu_flops: float
    cpu_bytes_per_s: float
    cpu_overhead_s: float = 50e-6  # queries out, partial result back, per layer

    @property
    def known(self) -> bool:
        return (
            min(
                self.link_bytes_per_s,
                self.device_flops,
                self.device_bytes_per_s,
                self.cpu_flops,
                self.cpu_bytes_per_s,
            )
            > 0
        )


@dataclass(frozen=True)
class StepShape:
    """One layer's attention work of a step, split by where the keys live."""

    device_flops: float  # over device-resident keys
    device_bytes: float  # device-resident KV bytes read
    host_flops: float  # over host-resident keys
    host_bytes: float  # host-resident KV bytes as stored on the host (what the link carries)
    host_bytes_on_device: float  # the same blocks once staged (the device kernel reads these)
    host_blocks: int = 0  # host block reads (per layer), all sequences
    host_seqs: int = 0  # sequences with at least one host block
    cpu_io_bytes: float = 0.0  # queries to the host and the partial (out, lse) back, per layer


@dataclass(frozen=True)
class SpillChoice:
    mode: str  # "stream" or "cooperate"
    cpu_fraction: float
    layer_seconds: float  # the model's estimate for one layer, nan when rates are unknown
    cpu_min_blocks: int = 0  # per sequence, whatever the fraction gives


def attention_flops(query_tokens: int, keys: int, num_heads: int, head_dim: int) -> float:
    """Multiply-adds of ``QK^T`` and ``PV`` as FLOPs (no causal halving: the host keys are all
    visible, and the device side is dominated by them in the cases that matter)."""
    return 4.0 * query_tokens * keys * num_heads * head_dim


def layer_seconds(shape: StepShape, rates: SpillRates, f: float) -> float:
    link = (1 - f) * shape.host_bytes / rates.link_bytes_per_s
    dev = max(
        (shape.device_flops + (1 - f) * shape.host_flops) / rates.device_flops,
        (shape.device_bytes + (1 - f) * shape.host_bytes_on_device) / rates.device_bytes_per_s,
    )
    cpu = 0.0
    if f > 0:
        cpu = (
            rates.cpu_overhead_s
            + shape.cpu_io_bytes / rates.link_bytes_per_s
            + max(
                f * shape.host_flops / rates.cpu_flops,
                f * shape.host_bytes / rates.cpu_bytes_per_s,
            )
        )
    return max(link, dev, cpu)


def choose(shape: StepShape, rates: SpillRates | None, forced: str = "auto") -> SpillChoice:
    """The mode and CPU share for a step; ``forced`` is ``auto``, ``stream`` or ``cooperate``."""
    if forced not in MODES:
        raise ValueError(f"spill mode {forced!r} is not one of {', '.join(MODES)}")
    if forced in ("stream", "off") or shape.host_bytes == 0:
        est = layer_seconds(shape, rates, 0.0) if rates and rates.known else float("nan")
        return SpillChoice("stream", 0.0, est)
    if rates is None or not rates.known:
        if forced == "cooperate":
            return SpillChoice("cooperate", 0.5, float("nan"))
        return SpillChoice("stream", 0.0, float("nan"))
    best = min(range(GRID + 1), key=lambda i: (layer_seconds(shape, rates, i / GRID), i))
    f = best / GRID
    t = layer_seconds(shape, rates, f)
    streamed = layer_seconds(shape, rates, 0.0)
    if f > 0 and forced == "auto" and t > (1 - MIN_GAIN) * streamed:
        f, t = 0.0, streamed  # within the model's error: stream
    if f == 0 and forced == "cooperate" and shape.host_blocks and shape.host_seqs:
        one = layer_seconds(shape, rates, shape.host_seqs / shape.host_blocks)
        if one <= t:  # one block per sequence costs nothing the layer waits for
            return SpillChoice("cooperate", 0.0, one, cpu_min_blocks=1)
    return SpillChoice("stream" if f == 0 else "cooperate", f, t)
