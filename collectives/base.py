"""The Communicator interface every backend implements.

All collectives are sum-reductions or copies over the ranks of one tensor-parallel group. Each
call takes ``async_op``; when true it returns a :class:`Handle` whose ``wait()`` blocks until the
result is in the tensor (for device backends, until the work is ordered before later work on the
current stream).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch


class Handle:
    """An in-flight collective. ``wait()`` is idempotent."""

    def wait(self) -> None:  # pragma: no cover - trivial
        return None


class DoneHandle(Handle):
    """A collective that already finished."""


class Communicator(ABC):
    """One rank's view of a tensor-parallel group."""

    backend: str = "base"

    def __init__(self, rank: int, world_size: int) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside a group of world_size {world_size}")
        self.rank = rank
        self.world_size = world_size

    @abstractmethod
    def all_reduce(self, tensor: torch.Tensor, async_op: bool = False) -> Handle | None:
        """Sum ``tensor`` over all ranks, in place."""

    @abstractmethod
    def all_gather(self, tensor: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """Concatenate every rank's ``tensor`` (same shape on all ranks) along ``dim``."""

    @abstractmethod
    def broadcast(
        self, tensor: torch.Tensor, src: int = 0, async_op: bool = False
    ) -> Handle | None:
        """Copy ``src``'s ``tensor`` into every rank's ``tensor``, in place."""

    @abstractmethod
    def barrier(self) -> None:
        """Block until every rank has reached the barrier."""

    def close(self) -> None:  # noqa: B027 - optional hook, most groups hold nothing to free
        """Release the group's resources; safe to call twice."""


class SingleRankCommunicator(Communicator):
    """The group of one: every collective is the identity. Used for TP = 1."""

    backend = "none"

    def __init__(self) -> None:
        super().__init__(0, 1)

    def all_reduce(self, tensor: torch.Tensor, async_op: bool = False) -> Handle | None:
        return DoneHandle() if async_op else None

    def all_gather(self, tensor: torch.Tensor, dim: int = 0) -> torch.Tensor:
        return tensor

    def broadcast(
        self, tensor: torch.Tensor, src: int = 0, async_op: bool = False
    ) -> Handle | None:
        return DoneHandle() if async_op else None

    def barrier(self) -> None:
        return None
