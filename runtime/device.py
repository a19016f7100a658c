"""The device a worker owns: CUDA GPU, Ascend NPU (through torch_npu) or CPU.

Everything device-specific that is not a kernel lives here: resolving ``auto``, capability
queries, synchronisation and memory figures, so the rest of ``runtime/`` stays device-agnostic.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import resource
import sys
from dataclasses import dataclass

import torch

from runtime.names import DTYPE_NAMES
from scheduler.errors import ConfigError

DEVICE_TYPES = ("auto", "cpu", "cuda", "npu")


def npu_available() -> bool:
    """True when torch_npu is importable and reports an NPU."""
    if importlib.util.find_spec("torch_npu") is None:
        return False
    import torch_npu  # noqa: F401  (registers torch.npu)

    return bool(getattr(torch, "npu", None) and torch.npu.is_available())


def resolve_device(kind: str = "auto", index: int | None = None) -> torch.device:
    """Map ``auto|cpu|cuda|npu`` (optionally ``cuda:1``) to a concrete, present device."""
    if ":" in kind:
        kind, _, idx = kind.partition(":")
        index = int(idx)
    if kind not in DEVICE_TYPES:
        raise ConfigError(f"device={kind!r} is not valid; choose one of {', '.join(DEVICE_TYPES)}")
    if kind == "auto":
        if torch.cuda.is_available():
            kind = "cuda"
        elif npu_available():
            kind = "npu"
        else:
            kind = "cpu"
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "device='cuda' was asked for but torch sees no CUDA GPU; use --device cpu"
        )
    if kind == "npu" and not npu_available():
        raise ConfigError("device='npu' was asked for but torch_npu is missing or sees no NPU")
    if kind == "cpu":
        return torch.device("cpu")
    return torch.device(kind, index if index is not None else 0)


@dataclass(frozen=True)
class DeviceInfo:
    type: str
    name: str
    capability: tuple[int, int] | None
    total_memory_bytes: int | None


def device_info(device: torch.device) -> DeviceInfo:
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return DeviceInfo("cuda", p.name, (p.major, p.minor), p.total_memory)
    if device.type == "npu":
        return DeviceInfo("npu", torch.npu.get_device_name(device), None, None)
    return DeviceInfo("cpu", _cpu_name(), None, None)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "cpu"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "npu":
        torch.npu.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elif device.type == "npu":
        torch.npu.reset_peak_memory_stats(device)


def peak_memory_bytes(device: torch.device) -> int:
    """Peak device memory allocated by torch; on CPU, the process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    if device.type == "npu":
        return torch.npu.max_memory_allocated(device)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


@contextlib.contextmanager
def torch_threads(n: int | None):
    """Run the block with ``n`` torch intra-op CPU threads (``None``: as set), then restore.

    GPU workers under Ray get one torch thread; the CPU part of cooperative attention is the one
    piece of their work that wants the node's cores."""
    prev = torch.get_num_threads()
    if not n or n == prev:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


def empty_cache(device: torch.device) -> None:
    """Hand cached, unused device memory back (so that ``free_memory_bytes`` counts it)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


def free_memory_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    if device.type == "npu":
        free, _ = torch.npu.mem_get_info(device)
        return free
    return None


@functools.cache
def _multiprocessors(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def multiprocessors(device: torch.device) -> int:
    """SMs of CUDA ``device`` (its index, or the current device's), read once per device."""
    return _multiprocessors(
        device.index if device.index is not None else torch.cuda.current_device()
    )


DTYPES = dict(zip(DTYPE_NAMES, (torch.float32, torch.bfloat16, torch.float16)))


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """The model's dtype on ``device`` (see :func:`dtype_for`)."""
    cap = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    return dtype_for(name, device.type, cap)


def dtype_for(
    name: str | None, device_type: str, capability: tuple[int, int] | None = None
) -> torch.dtype:
    """``None``/``auto``: float32 on CPU; float16 on CUDA GPUs before compute capability 8.0
    (Volta, Turing: no bfloat16 in their tensor cores, nor in torch's fused attention kernels
    there); bfloat16 on other accelerators. ``bfloat16`` asked for on such a GPU is refused with
    the fix, rather than run emulated."""
    old_gpu = device_type == "cuda" and capability is not None and capability < (8, 0)
    if name in (None, "auto"):
        if device_type == "cpu":
            return torch.float32
        return torch.float16 if old_gpu else torch.bfloat16
    if name not in DTYPES:
        raise ConfigError(f"dtype={name!r} is not valid; choose one of auto, {', '.join(DTYPES)}")
    if name == "bfloat16" and old_gpu:
        raise ConfigError(
            f"dtype=bfloat16 needs a GPU of compute capability 8.0 or newer (this one is "
            f"{capability[0]}.{capability[1]}); use --dtype float16 (what auto picks there)"
        )
    return DTYPES[name]


def host_memory_bytes() -> tuple[int, int]:
    """``(available, total)`` host memory in bytes (Linux ``/proc/meminfo``; else from sysconf,
    counting all of it as available)."""
    info: dict[str, int] = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                key, _, rest = line.partition(":")
                info[key] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    if "MemTotal" in info:
        return info.get("MemAvailable", info.get("MemFree", 0)), info["MemTotal"]
    import os

    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return total, total


def host_headroom_bytes(total: int) -> int:
    """Host memory left alone when sizing KV pools automatically: a tenth, at least 2 GiB."""
    return max(total // 10, 2 << 30)
