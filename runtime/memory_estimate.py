"""How much memory a model config needs on one rank, computed from its sizes before anything is
allocated, and the budget it must fit.

A config comes from anywhere (a downloaded ``config.json``, a job file): a vocabulary of 2^25 or a
billion layers must be refused with the figure and the budget, not discovered by the allocator
after the machine has started swapping. The estimate is deliberately simple and slightly high:
weights, the KV cache the run needs, and the activations of one prefill step.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from runtime.config import ModelConfig
from scheduler.errors import CapacityError
from scheduler.weight_plan import TIER_SLOTS, WeightPlan, plan_weights, resolve_tier

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one rank needs, by part."""

    weights: int
    kv_cache: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.activations

    def describe(self) -> str:
        return (
            f"{gib(self.total)} (weights {gib(self.weights)}, KV cache {gib(self.kv_cache)}, "
            f"activations {gib(self.activations)})"
        )


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def layer_parameters(c: ModelConfig, tp: int = 1) -> dict[str, int]:
    """Parameters one rank holds in a decoder layer of each type (``full_attention``,
    ``linear_attention``): attention and MLP sharded over ``tp``, norms and router whole."""
    q = c.num_attention_heads * c.head_dim
    kv = c.num_key_value_heads * c.head_dim
    mlp = 3 * c.hidden_size * c.intermediate_size * (c.num_local_experts or 1)
    whole = 2 * c.hidden_size + c.hidden_size * (c.num_local_experts or 0)  # norms, router
    softmax = c.hidden_size * (2 * q + 2 * kv)
    lightning = c.hidden_size * 5 * q  # q|k|v, output gate, output projection
    return {
        "full_attention": -(-(softmax + mlp) // tp) + whole,
        "linear_attention": -(-(lightning + mlp + q) // tp) + whole,  # + the norm over heads
    }


def layer_bytes(c: ModelConfig, dtype: str, tp: int = 1) -> list[int]:
    """Bytes of each decoder layer on one rank, in layer order (a checked config's layers)."""
    per = layer_parameters(c, tp)
    types = c.layer_types or ("full_attention",) * c.num_hidden_layers
    return [per[t] * DTYPE_BYTES[dtype] for t in types]


def offload_plan(
    c: ModelConfig, dtype: str, tp: int, offload_gib: float, tier: str = "host"
) -> WeightPlan:
    """Which layers stream so that ``offload_gib`` GiB per rank are freed (none for 0), with
    ``tier``'s device slots (``host``: a ring of two; ``disk``: none, the file is mapped)."""
    if offload_gib <= 0 or dtype not in DTYPE_BYTES:
        return WeightPlan((), ())
    sizes = layer_bytes(c, dtype, tp)
    return plan_weights(sizes, int(offload_gib * 2**30), "offload_weights_gib", TIER_SLOTS[tier])


def run_weight_plan(
    c: ModelConfig, dtype: str, tp: int, offload_gib: float, weight_tier: str, device_type: str
) -> tuple[WeightPlan, str]:
    """A run's settings made a plan: ``(offload_plan, tier)`` with ``weight_tier`` resolved for
    ``device_type`` (``auto``, or a wrong pair refused in one line) when anything is offloaded.
    The driver's preflight and each worker plan alike through here."""
    tier = resolve_tier(weight_tier, device_type) if offload_gib > 0 else "host"
    return offload_plan(c, dtype, tp, offload_gib, tier), tier


def parameter_count(c: ModelConfig, tp: int = 1) -> int:
    """Parameters one rank holds (attention and MLP sharded over ``tp``, the vocabulary too)."""
    per = layer_parameters(c, tp)
    vocab = c.vocab_size * c.hidden_size * (1 if c.tie_word_embeddings else 2)
    layers = c.num_kv_layers * per["full_attention"]
    layers += c.num_lightning_layers * per["linear_attention"]
    return -(-vocab // tp) + c.hidden_size + layers  # the final norm too


def estimate(
    c: ModelConfig,
    dtype: str,
    tp: int = 1,
    kv_tokens: int = 0,
    prefill_chunk: int = 512,
    block_size: int = 16,
    offloaded: int = 0,
) -> MemoryEstimate:
    """Bytes per rank for ``c`` in ``dtype`` (``float32``/``bfloat16``/``float16``) with ``tp``
    ranks, a KV cache of ``kv_tokens`` tokens and prefill steps of ``prefill_chunk`` tokens;
    ``offloaded``: weight bytes a ``WeightPlan`` frees from the device."""
    elem = DTYPE_BYTES[dtype]
    weights = parameter_count(c, tp) * elem - offloaded
    kv_heads = max(c.num_key_value_heads // tp, 1)
    blocks = -(-max(kv_tokens, 1) // block_size)
    kv = 2 * c.num_kv_layers * blocks * block_size * kv_heads * c.head_dim * elem
    t = prefill_chunk
    # a few hidden- and intermediate-sized tensors of one chunk (per rank share of the MLP), the
    # chunk's attention scores tile by tile, and float32 logits of the rows that sample
    hidden = t * elem * (8 * c.hidden_size + 3 * -(-c.intermediate_size // tp))
    logits = 4 * c.vocab_size * 8  # up to max_num_seqs rows sample per step; 8 is the default
    activations = hidden + logits
    return MemoryEstimate(weights, kv, activations)


def available_host_bytes() -> int | None:
    """Memory the kernel says can be allocated without swapping (``MemAvailable``), or None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return None


def check_fits(est: MemoryEstimate, budget: int | None, where: str, ranks_sharing: int = 1) -> None:
    """Refuse, with the figure and the budget, an estimate that ``ranks_sharing`` ranks together
    cannot fit in ``budget`` bytes of ``where``. A budget of None (unknown) passes."""
    if budget is None:
        return
    need = est.total * ranks_sharing
    if need > budget:
        per = f" ({ranks_sharing} ranks x {gib(est.total)})" if ranks_sharing > 1 else ""
        short = (need - budget) / ranks_sharing  # per rank
        stream = (
            f"stream some layers' weights from a slower tier (--offload-weights-gib "
            f"{math.ceil(short / 2**30 * 100) / 100:g} or more), "
            if short < est.weights
            else ""
        )
        raise CapacityError(
            f"the model needs about {gib(need)}{per} on {where}: {est.describe()} per rank, but "
            f"{gib(budget)} is available; use a smaller model or dtype (--dtype bfloat16), a "
            f"larger --tp over more devices, {stream}a smaller --max-model-len/--kv-cache-tokens, "
            "or a machine with more memory"
        )


__all__ = [
    "MemoryEstimate",
    "estimate",
    "parameter_count",
    "layer_parameters",
    "layer_bytes",
    "offload_plan",
    "run_weight_plan",
    "available_host_bytes",
    "check_fits",
    "gib",
]
