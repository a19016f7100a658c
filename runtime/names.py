"""Names a worker config may use, importable without torch: dtypes, host KV dtypes, spill
modes and the attention backend registry's table (``runtime.attention.registry`` loads the
classes). The CLI's service commands (submit, status, ...) build their flags and check job
fields from these, so they start in well under a second."""

from __future__ import annotations

from scheduler.errors import ConfigError
from scheduler.spill_cost import MODES as SPILL_MODES

DTYPE_NAMES = ("float32", "bfloat16", "float16")  # runtime.device.DTYPES maps them to torch
HOST_DTYPE_NAMES = ("auto", "bfloat16", "float16", "float32", "fp8", "int8")  # runtime.kv_quant

__all__ = [
    "ATTENTION_BACKENDS",
    "DTYPE_NAMES",
    "HOST_DTYPE_NAMES",
    "SPILL_MODES",
    "UnknownBackendError",
    "available_backends",
    "check_backend_name",
    "register_backend",
]

# attention backend name -> "module:Class"
ATTENTION_BACKENDS: dict[str, str] = {
    "torch": "runtime.attention.torch_tiled:TorchTiledBackend",
    "sdpa": "runtime.attention.sdpa:SdpaBackend",
    "triton": "runtime.attention.triton_backend:TritonBackend",
    "flash_cpu": "runtime.attention.cpu_flash:CpuFlashBackend",
    "fa2_cpu": "runtime.attention.fa2_cpu:Fa2CpuBackend",
    "efficient_cuda": "runtime.attention.cuda_efficient:CudaEfficientBackend",
    "wmma_cuda": "runtime.attention.wmma_cuda:WmmaCudaBackend",
}


class UnknownBackendError(ConfigError):
    """An attention backend name that is not registered, or cannot run here."""


def register_backend(name: str, target: str) -> None:
    """Register ``target`` ("module:Class") under ``name``; later registrations win."""
    ATTENTION_BACKENDS[name] = target


def available_backends() -> list[str]:
    return sorted(ATTENTION_BACKENDS)


def check_backend_name(name: str) -> None:
    if name != "auto" and name not in ATTENTION_BACKENDS:
        raise UnknownBackendError(
            f"unknown attention backend {name!r}; valid: auto, {', '.join(available_backends())}"
        )
