"""Which decoder layers keep their weights in a slower tier (Cambricon-LLM's idea: a model larger
than device memory, its weights streamed in tiles that keep movement low and hidden).

The tile here is one decoder layer. On an accelerator, streamed layers share a ring of two
device slots: while one slot's layer computes, the other slot receives the next streamed layer.
So streaming ``m`` layers frees their bytes minus the ring's, and every step moves the streamed
bytes once. On the CPU device the layers are read in place from a mapped file (no slots). Spreading the
streamed layers evenly between resident ones gives each copy the compute of several layers to hide
behind, where a contiguous run of streamed layers gives it one. Pure Python: sizes in, plan out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from scheduler.errors import ConfigError

SLOTS = 2  # device slots of the ring: one computing, one filling
TIER_SLOTS = {"host": SLOTS, "disk": 0}  # the disk tier maps its file: layers read in place


@dataclass(frozen=True)
class WeightPlan:
    """Streamed layer indices (ascending) and every layer's bytes on one rank."""

    streamed: tuple[int, ...]
    layer_bytes: tuple[int, ...]
    slots: int = SLOTS

    @property
    def streamed_bytes(self) -> int:
        """Bytes in the slower tier: moved to the device once per step."""
        return sum(self.layer_bytes[i] for i in self.streamed)

    @property
    def slot_bytes(self) -> int:
        """Bytes of the device ring: ``min(slots, m)`` slots of the largest streamed layer."""
        if not self.streamed:
            return 0
        return min(self.slots, len(self.streamed)) * max(self.layer_bytes[i] for i in self.streamed)

    @property
    def freed_bytes(self) -> int:
        """Device bytes the plan saves against holding every layer."""
        return self.streamed_bytes - self.slot_bytes


def spread(n: int, m: int) -> tuple[int, ...]:
    """``m`` of ``n`` layer indices, evenly spaced (the middle of each of ``m`` equal runs)."""
    return tuple(sorted({int((k + 0.5) * n / m) for k in range(m)}))


def plan_weights(
    layer_bytes: Sequence[int], offload_bytes: int, field: str, slots: int = SLOTS
) -> WeightPlan:
    """The fewest evenly spread layers whose streaming frees at least ``offload_bytes`` of device
    memory with ``slots`` device slots; ``field`` names the setting in the error when the layers
    cannot free that much."""
    sizes = tuple(int(b) for b in layer_bytes)
    if offload_bytes <= 0:
        return WeightPlan((), sizes, slots)
    n = len(sizes)
    for m in range(1, n + 1):
        plan = WeightPlan(spread(n, m), sizes, slots)
        if plan.freed_bytes >= offload_bytes:
            return plan
    most = WeightPlan(tuple(range(n)), sizes, slots).freed_bytes
    ring = f" less {slots} device slots" if slots else ""
    raise ConfigError(
        f"{field}={offload_bytes / 2**30:.3g} GiB: streaming every one of the {n} decoder layers "
        f"frees at most {most / 2**30:.3g} GiB per rank (their {sum(sizes) / 2**30:.3g} GiB"
        f"{ring}); ask for at most that"
    )


def resolve_tier(name: str, device_type: str) -> str:
    """``auto`` made concrete for ``device_type``; a tier that cannot serve it is one line."""
    if name == "auto":
        return "disk" if device_type == "cpu" else "host"
    if name == "host" and device_type == "cpu":
        raise ConfigError(
            "weight_tier=host on the CPU device: its weights are in host memory already; use "
            "weight_tier=disk (or auto) to keep offloaded layers in a file"
        )
    if name == "disk" and device_type != "cpu":
        raise ConfigError(
            f"weight_tier=disk streams to the CPU device only; on {device_type} use "
            "weight_tier=host (or auto)"
        )
    return name


__all__ = ["SLOTS", "TIER_SLOTS", "WeightPlan", "plan_weights", "resolve_tier", "spread"]
