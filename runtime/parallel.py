"""This worker's place in its tensor-parallel group, as the layers see it.

The model never talks to a communicator directly: the row-parallel linear calls
``collectives.tiled_allreduce.linear_all_reduce`` (the one AllReduce call site), and the
vocabulary-parallel head gathers logits. At TP = 1 every collective is the identity.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from collectives.base import Communicator, SingleRankCommunicator
from collectives.wait_clock import WaitClock
from scheduler.errors import ConfigError


@dataclass
class ParallelState:
    comm: Communicator = field(default_factory=SingleRankCommunicator)
    # Tiles for the overlapped AllReduce of one row-parallel projection; 1 = plain AllReduce.
    # A callable of the token count lets the cost model choose per step.
    allreduce_tiles: int | None = None
    overlap: bool = True
    # a mixture of experts: whole experts per rank instead of every expert sliced
    expert_parallel: bool = False
    tile_chooser: Callable[[int, int, int], int] | None = None  # (rows, out, in) -> tiles
    # the time this rank's steps wait on AllReduce (the worker resets and reads it per step)
    wait_clock: WaitClock = field(default_factory=WaitClock)

    @property
    def rank(self) -> int:
        return self.comm.rank

    @property
    def world_size(self) -> int:
        return self.comm.world_size

    @property
    def wants_tile_chooser(self) -> bool:
        """Whether ``tiles_for`` would consult a measured chooser (so it is worth measuring)."""
        return self.world_size > 1 and self.overlap and self.allreduce_tiles is None

    def tiles_for(self, rows: int, out_features: int, in_features: int) -> int:
        """The tile count of one row-parallel AllReduce: the one place it is decided.

        1 alone or with overlap off; the fixed count if one is set; else the measured cost
        model's choice (``collectives.cost.measured_tile_chooser``), or 1 before it exists.
        Every rank must choose the same: the chooser's figures are averaged over the group.
        """
        if self.world_size == 1 or not self.overlap:
            return 1
        if self.allreduce_tiles is not None:
            return self.allreduce_tiles
        if self.tile_chooser is not None:
            return int(self.tile_chooser(rows, out_features, in_features))
        return 1


def shard_size(total: int, world_size: int, what: str) -> int:
    """Split ``total`` evenly over ranks or refuse, naming the sizes."""
    if total % world_size:
        raise ConfigError(
            f"{what}={total} does not divide evenly over tensor-parallel size {world_size}; "
            f"choose a --tp that divides {total}"
        )
    return total // world_size
