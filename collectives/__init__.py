"""How workers talk: one Communicator interface, several backends, the tiled AllReduce.

The names below are loaded on first use: ``collectives.names`` (what configs and the CLI need)
imports no torch, and importing this package must not either."""

from __future__ import annotations

__all__ = ["Communicator", "Handle", "SingleRankCommunicator"]


def __getattr__(name: str):
    if name in __all__:
        from collectives import base

        return getattr(base, name)
    raise AttributeError(f"module 'collectives' has no attribute {name!r}")
