"""What a worker needs from the user: the model, the device and numerics, attention, the cache
budget and the AllReduce switch. Frozen and checked field by field (``scheduler.fields``)."""

from __future__ import annotations

from dataclasses import dataclass

from runtime.names import (
    DTYPE_NAMES,
    HOST_DTYPE_NAMES,
    SPILL_MODES,
    available_backends,
    check_backend_name,
)
from scheduler.errors import ConfigError
from scheduler.fields import check_fields, option


@dataclass(frozen=True)
class WorkerConfig:
    """The model, device, numerics, attention, KV budget and AllReduce switch of every worker."""

    model: str = option(
        "demo-small", help="a preset name (tiny, demo-small, ...) or a HF checkpoint directory"
    )
    device: str = option("auto", help="auto|cpu|cuda|npu, optionally with an index (cuda:1)")
    dtype: str = option(
        "auto",
        help="auto (bfloat16 on accelerators, float16 on GPUs before sm_80, float32 on CPU)|"
        + "|".join(DTYPE_NAMES),
        choices=("auto", *DTYPE_NAMES),
    )
    attention: str = option(
        "auto", help="attention backend: auto|" + "|".join(available_backends())
    )
    q_tile: int = option(128, help="query rows per tile of the portable torch backend", minimum=1)
    kv_tile: int = option(512, help="keys per tile of the portable torch backend", minimum=1)
    cuda_graphs: bool = option(
        True, help="replay pure-decode steps from CUDA graphs (CUDA, triton, one rank or NCCL)"
    )
    overlap: bool = option(True, help="tile the row-parallel AllReduce to overlap it with compute")
    expert_parallel: bool = option(
        False,
        help="a mixture of experts under --tp N: whole experts per rank (a contiguous 1/N of "
        "them), not every expert's intermediate size sliced over the ranks",
    )
    allreduce_tiles: int | None = option(
        None,
        help="fixed tile count for the overlapped AllReduce (default: the cost model's choice)",
        minimum=1,
    )
    kv_cache_tokens: int | None = option(
        None,
        help="device KV capacity in tokens (default: sized from free device memory, or from "
        "available memory on CPU, with headroom)",
        minimum=1,
    )
    kv_host_tokens: int | None = option(
        None,
        help="host KV capacity in tokens, where blocks spill to (0: none; default: sized from "
        "available host memory with headroom on accelerators, none on CPU)",
        minimum=0,
    )
    spill: str = option(
        "auto",
        help="attention over host-resident KV: auto (a cost model picks per step)|stream "
        "(copy to the device)|cooperate (the CPU attends over part)|off (no host tier)",
        choices=SPILL_MODES,
    )
    kv_host_dtype: str = option(
        "auto",
        help="host KV storage: auto (the KV dtype)|bfloat16|float16|float32|fp8|int8 (8-bit "
        "with per-block scales)",
        choices=HOST_DTYPE_NAMES,
    )
    gpu_memory_utilization: float = option(
        0.9, help="share of the accelerator's memory the worker may fill", positive=True
    )
    weights_seed: int = option(0, help="seed of a preset's random weights (not of sampling)")
    offload_weights_gib: float = option(
        0.0,
        help="device memory (GiB per rank) to free by keeping some decoder layers' weights in a "
        "slower tier and streaming them in every step (0: every weight on the device)",
        minimum=0,
    )
    weight_tier: str = option(
        "auto",
        help="where offloaded weights live: auto|host (page-locked host memory; accelerators)|"
        "disk (a file; the CPU device)",
        choices=("auto", "host", "disk"),
    )
    weight_tier_dir: str | None = option(
        None,
        help="directory for the disk tier's weight file (default: the system's temporary "
        "directory; the file is unlinked at once and never outlives the worker)",
    )

    def __post_init__(self) -> None:
        check_fields(self)
        if not self.model:
            raise ConfigError("model must name a preset or a checkpoint directory")
        if self.gpu_memory_utilization > 1:
            raise ConfigError(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )
        if self.spill == "off" and self.kv_host_tokens:
            raise ConfigError(
                f"spill=off leaves no host tier but kv_host_tokens={self.kv_host_tokens}; "
                "drop one of them"
            )
        if self.weight_tier_dir is not None and not self.weight_tier_dir:
            raise ConfigError("weight_tier_dir is empty; name a directory or leave it unset")
        try:
            check_backend_name(self.attention)
        except ConfigError as e:
            raise ConfigError(f"attention: {e}") from None
