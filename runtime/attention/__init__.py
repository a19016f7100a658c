"""Attention backends over the paged KV cache, chosen by name from a registry.

The names below are loaded on first use, so that importing a torch-free module of this package
(or ``runtime.names``, the registry's table) does not import torch."""

from __future__ import annotations

_WHERE = {
    "AttentionBackend": "runtime.attention.base",
    "AttentionMetadata": "runtime.attention.base",
    "available_backends": "runtime.names",
    "get_backend": "runtime.attention.registry",
    "resolve_backend": "runtime.attention.registry",
    "resolve_backend_name": "runtime.attention.registry",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'runtime.attention' has no attribute {name!r}")
