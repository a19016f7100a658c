"""Attention backends over the paged KV cache, chosen by name from a registry."""

from runtime.attention.base import AttentionBackend, AttentionMetadata
from runtime.attention.registry import (
    available_backends,
    get_backend,
    resolve_backend,
    resolve_backend_name,
)

__all__ = [
    "AttentionBackend",
    "AttentionMetadata",
    "available_backends",
    "get_backend",
    "resolve_backend",
    "resolve_backend_name",
]
