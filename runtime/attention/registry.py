"""Attention backends by name.

Backends are registered as import paths so that asking for ``torch`` never imports Triton, and a
backend whose dependency is missing fails with a message that says so.
"""

from __future__ import annotations

import importlib
import logging

import torch

from runtime.attention.base import AttentionBackend
from runtime.names import ATTENTION_BACKENDS as _BACKENDS
from runtime.names import (
    UnknownBackendError,
    available_backends,
    check_backend_name,
    register_backend,
)

log = logging.getLogger(__name__)

__all__ = [
    "UnknownBackendError",
    "available_backends",
    "check_backend_name",
    "get_backend",
    "register_backend",
    "resolve_backend_name",
]


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
