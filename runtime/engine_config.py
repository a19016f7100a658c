"""Everything that shapes one engine: model, device, numerics, cache, parallelism.

A frozen dataclass validated in one place; the CLI, job YAML files and the Python API all build
one of these, and every worker receives the same copy.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from scheduler.errors import ConfigError

COMM_CHOICES = ("auto", "nccl", "hccl", "gloo", "mpi")


@dataclass(frozen=True)
class EngineConfig:
    model: str = "demo-small"
    """A preset name (``runtime.presets``) or a Hugging Face checkpoint directory."""
    device: str = "auto"
    dtype: str = "auto"
    attention: str = "auto"
    block_size: int = 16
    prefill_chunk: int = 512
    max_num_seqs: int = 8
    max_model_len: int | None = None
    kv_cache_tokens: int | None = None
    """KV capacity in tokens; default: max_model_len x max_num_seqs on CPU, memory-sized on GPU."""
    gpu_memory_utilization: float = 0.9
    tp: int = 1
    comm: str = "auto"
    overlap: bool = True
    allreduce_tiles: int | None = None
    seed: int = 0
    placement_timeout_s: float = 60.0
    """How long to wait for the cluster to place all workers before failing with the fix."""
    q_tile: int = 128
    kv_tile: int = 512
    cuda_graphs: bool = True
    """Replay pure-decode steps from CUDA graphs (CUDA, triton attention, single rank or NCCL)."""

    def __post_init__(self) -> None:
        for name in ("block_size", "prefill_chunk", "max_num_seqs", "tp", "q_tile", "kv_tile"):
            _positive_int(name, getattr(self, name))
        for name in ("max_model_len", "kv_cache_tokens", "allreduce_tiles"):
            v = getattr(self, name)
            if v is not None:
                _positive_int(name, v)
        if not isinstance(self.cuda_graphs, bool):
            raise ConfigError(f"cuda_graphs must be true or false, got {self.cuda_graphs!r}")
        if not self.placement_timeout_s > 0:
            raise ConfigError(f"placement_timeout_s must be > 0, got {self.placement_timeout_s}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )
        if self.comm not in COMM_CHOICES:
            raise ConfigError(
                f"comm={self.comm!r} is not valid; choose one of {', '.join(COMM_CHOICES)}"
            )
        from runtime.attention.registry import check_backend_name

        try:
            check_backend_name(self.attention)
        except ConfigError as e:
            raise ConfigError(f"attention: {e}") from None
        if not isinstance(self.model, str) or not self.model:
            raise ConfigError("model must name a preset or a checkpoint directory")

    @staticmethod
    def field_names() -> list[str]:
        return [f.name for f in fields(EngineConfig)]

    @staticmethod
    def from_dict(d: dict[str, Any]) -> EngineConfig:
        unknown = sorted(set(d) - set(EngineConfig.field_names()))
        if unknown:
            raise ConfigError(
                f"unknown engine field(s) {', '.join(unknown)}; valid: "
                + ", ".join(EngineConfig.field_names())
            )
        return EngineConfig(**d)


def _positive_int(name: str, v: Any) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ConfigError(f"{name} must be a positive integer, got {v!r}")
