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
    "resolve_backend",
    "resolve_backend_name",
]


def _load(name: str) -> type[AttentionBackend]:
    check_backend_name(name)
    module, _, cls = _BACKENDS[name].partition(":")
    try:
        return getattr(importlib.import_module(module), cls)
    except ImportError as e:
        raise UnknownBackendError(f"attention backend {name!r} cannot be loaded: {e}") from e


# ``auto`` measured (on a CPU, or a GPU without the Triton kernels), per (device kind, shape,
# candidates, options), once per process: engines built one after another in a process (a
# test's two settings, a service's restarts of its loop) then run the same kernel and give
# bitwise the same logits, whatever the machine's load did to a second measurement.
_CHOICES: dict[tuple, tuple[str, str]] = {}


def resolve_backend(
    name: str, device: torch.device, shape=None, options: dict | None = None
) -> tuple[str, str]:
    """``(backend name, why)``: ``auto`` made concrete for ``device``, or a forced name checked.

    ``auto`` on CUDA with compute capability 8.0+ is ``triton``. On a CPU, and on a CUDA GPU
    before 8.0 (or without Triton), given the attention ``shape``
    (``runtime.attention.autotune.AttentionShape``), it is the fastest exact of the candidates
    for that kind of device, measured there (``fa2_cpu``, ``flash_cpu`` or ``torch`` on a CPU,
    ``efficient_cuda``, ``wmma_cuda`` or ``torch`` on such a GPU); without a shape, the first candidate that
    runs. Anything else gets the portable ``torch``. ``options`` are the portable backend's tile
    options, used when it is measured."""
    if name != "auto":
        cls = _load(name)
        reason = cls.supports(device)
        if reason is not None:
            raise UnknownBackendError(
                f"attention backend {name!r} does not run on {device}: {reason}"
            )
        return name, "asked for"
    if device.type == "cuda" and "triton" in _BACKENDS:
        cap = torch.cuda.get_device_capability(device)
        if cap >= (8, 0):
            try:
                if _load("triton").supports(device) is None:
                    return "triton", f"auto: compute capability {cap[0]}.{cap[1]}"
            except UnknownBackendError as e:
                log.info("triton attention unavailable (%s); measuring the others", e)
    if device.type in ("cpu", "cuda"):
        from runtime.attention import autotune

        runnable = [n for n in autotune.candidates_for(device) if n in _BACKENDS]
        runnable = [n for n in runnable if _load(n).supports(device) is None]
        if shape is not None and len(runnable) > 1:
            key = (device.type, shape, tuple(runnable), tuple(sorted((options or {}).items())))
            if key not in _CHOICES:
                opts = {n: (options or {}) if n == "torch" else {} for n in runnable}
                backends = {n: _load(n)(**opts[n]) for n in runnable}
                choice = autotune.choose_backend(shape, backends, device)
                _CHOICES[key] = choice.name, choice.reason
            return _CHOICES[key]
        if runnable:
            return runnable[0], f"auto: the {device.type.upper()} default"
    # The portable tiled backend: NPUs and anything else torch runs on.
    return "torch", "auto: the portable backend"


def resolve_backend_name(name: str, device: torch.device) -> str:
    """Turn ``auto`` into a concrete backend for ``device``; check a forced one runs there."""
    return resolve_backend(name, device)[0]


def get_backend(name: str, device: torch.device | str = "cpu", **options) -> AttentionBackend:
    """Instantiate backend ``name`` (or ``auto``) for ``device``."""
    dev = torch.device(device)
    resolved = resolve_backend_name(name, dev)
    return _load(resolved)(**options)
