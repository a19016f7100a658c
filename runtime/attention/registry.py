"""Attention backends by name.

Backends are registered as import paths so that asking for ``torch`` never imports Triton, and a
backend whose dependency is missing fails with a message that says so.
"""

from __future__ import annotations

import importlib
import logging

import torch

from runtime.attention.base import AttentionBackend
from scheduler.errors import ConfigError

log = logging.getLogger(__name__)

# name -> "module:Class"
_BACKENDS: dict[str, str] = {
    "torch": "runtime.attention.torch_tiled:TorchTiledBackend",
    "sdpa": "runtime.attention.sdpa:SdpaBackend",
    "triton": "runtime.attention.triton_backend:TritonBackend",
    "flash_cpu": "runtime.attention.cpu_flash:CpuFlashBackend",
}


class UnknownBackendError(ConfigError):
    """An attention backend name that is not registered, or cannot run here."""


def register_backend(name: str, target: str) -> None:
    """Register ``target`` ("module:Class") under ``name``; later registrations win."""
    _BACKENDS[name] = target


def available_backends() -> list[str]:
    return sorted(_BACKENDS)


def check_backend_name(name: str) -> None:
    if name != "auto" and name not in _BACKENDS:
        raise UnknownBackendError(
            f"unknown attention backend {name!r}; valid: auto, {', '.join(available_backends())}"
        )


def _load(name: str) -> type[AttentionBackend]:
    check_backend_name(name)
    module, _, cls = _BACKENDS[name].partition(":")
    try:
        return getattr(importlib.import_module(module), cls)
    except ImportError as e:
        raise UnknownBackendError(f"attention backend {name!r} cannot be loaded: {e}") from e


def resolve_backend_name(name: str, device: torch.device) -> str:
    """Turn ``auto`` into a concrete backend for ``device``; check a forced one runs there."""
    if name == "auto":
        if device.type == "cuda" and "triton" in _BACKENDS:
            cap = torch.cuda.get_device_capability(device)
            if cap >= (8, 0):
                try:
                    if _load("triton").supports(device) is None:
                        return "triton"
                except UnknownBackendError as e:
                    log.info("triton attention unavailable (%s); using torch", e)
        # The portable tiled backend: CPU, Volta, NPU and anything else torch runs on.
        return "torch"
    cls = _load(name)
    reason = cls.supports(device)
    if reason is not None:
        raise UnknownBackendError(f"attention backend {name!r} does not run on {device}: {reason}")
    return name


def get_backend(name: str, device: torch.device | str = "cpu", **options) -> AttentionBackend:
    """Instantiate backend ``name`` (or ``auto``) for ``device``."""
    dev = torch.device(device)
    resolved = resolve_backend_name(name, dev)
    return _load(resolved)(**options)
