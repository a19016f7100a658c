"""The row-parallel linear's AllReduce: plain, or tiled and overlapped (FastAttention's
tiling-AllReduce).

Each tensor-parallel rank holds a slice of the input features, so its ``x @ W.T`` is a partial sum
that must be summed over the ranks. Plain: compute all ``T`` rows, then one AllReduce. Tiled: split
the ``T`` rows into tiles; the AllReduce of tile ``i`` is in flight while tile ``i + 1`` is
computed, so only the last tile's communication (plus what compute could not hide) is exposed.

Rows are independent in both the matmul and the reduction, so the two paths compute the same sums;
they agree bitwise whenever the matmul of a row tile equals those rows of the full matmul (exact
for integer-valued inputs; otherwise up to the BLAS kernel's blocking, i.e. float rounding).

Every rank of the group must call with the same ``T`` and ``num_tiles`` (the tiles are separate
collectives, matched by order).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from collectives.base import Communicator, Handle
from collectives.wait_clock import WaitClock

# One side stream per CUDA device for launching tile AllReduces (created on first use).
_COMM_STREAMS: dict[int, torch.cuda.Stream] = {}


def tile_bounds(rows: int, num_tiles: int) -> list[tuple[int, int]]:
    """``[start, stop)`` of each tile: ``min(num_tiles, rows)`` tiles, sizes differing by at most 1.

    The larger tiles come first so the last tile, whose AllReduce nothing hides, is the smaller.
    """
    n = max(1, min(num_tiles, rows))
    if rows <= 0:
        return []
    base, extra = divmod(rows, n)
    bounds, start = [], 0
    for i in range(n):
        stop = start + base + (1 if i < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


def _comm_stream(device: torch.device) -> torch.cuda.Stream:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _COMM_STREAMS:
        # High priority: a tile's AllReduce should start as soon as its tile is ready, not queue
        # behind the next tile's matmul blocks.
        _COMM_STREAMS[index] = torch.cuda.Stream(device=index, priority=-1)
    return _COMM_STREAMS[index]


def _poll(handles: list[Handle]) -> None:
    # Backends without a progress engine of their own (MPI) move a non-blocking collective only
    # inside library calls; a poll between tiles lets the in-flight tiles advance.
    for h in handles:
        poll = getattr(h, "poll", None)
        if poll is not None:
            poll()


@torch.no_grad()  # inference only: the in-place collectives are invisible to autograd anyway
def linear_all_reduce(
    x: torch.Tensor,
    weight: torch.Tensor,
    comm: Communicator,
    num_tiles: int = 1,
    prologue: Callable[[torch.Tensor], torch.Tensor] | None = None,
    clock: WaitClock | None = None,
) -> torch.Tensor:
    """``sum over ranks of x @ weight.T`` for a row-parallel linear layer.

    Args:
        x: ``[T, in_local]`` (leading dims beyond one are flattened and restored), this rank's
            slice of the input features.
        weight: ``[out, in_local]``, this rank's slice of the weight's input features.
        comm: the tensor-parallel group.
        num_tiles: ``<= 1`` for the plain path; ``> 1`` splits the rows into that many tiles (at
            most ``T``) whose AllReduces overlap the next tile's matmul.
        prologue: row-wise work that produces this linear's input from ``x`` (the MLP's
            gate/up projection and activation, say). With tiles it runs per tile, so tile i's
            AllReduce also overlaps tile i+1's prologue: more computation to hide behind, which
            is what makes the overlap pay at large TP, where the row-parallel matmul alone is
            shorter than its AllReduce.
        clock: where the time the computation waits on the AllReduce goes (the whole plain
            call; the tiled path's waits on its handles, after the last tile's compute).

    Returns:
        ``[T, out]``, identical on every rank.
    """
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    rows, out_features = x2.shape[0], weight.shape[0]

    if rows == 0:
        # Every rank of the group has the same T, so all of them skip the collective together.
        return x.new_empty((*lead, out_features))

    if num_tiles <= 1 or comm.world_size == 1 or rows == 1:
        y = (prologue(x2) if prologue is not None else x2) @ weight.T
        return sum_over_ranks(y, comm, clock).reshape(*lead, out_features)

    # One preallocated output: each tile is a contiguous row slice of it, so the tiles need no
    # concatenation and each slice is a valid in-place collective buffer.
    out = torch.empty((rows, out_features), dtype=x2.dtype, device=x.device)
    w_t = weight.T
    handles: list[Handle] = []
    on_cuda = out.device.type == "cuda"
    if on_cuda:
        compute = torch.cuda.current_stream(out.device)
        side = _comm_stream(out.device)
        # ``out`` is used on the side stream; if the caller frees it early, the allocator must not
        # hand its memory out again before the side stream is done with it.
        out.record_stream(side)
    for start, stop in tile_bounds(rows, num_tiles):
        tile = out[start:stop]
        rows_in = x2[start:stop] if prologue is None else prologue(x2[start:stop])
        torch.matmul(rows_in, w_t, out=tile)
        if on_cuda:
            # The side stream waits for this tile's matmul only; the next tile's matmul, queued on
            # the compute stream afterwards, runs while the collective is in flight.
            side.wait_stream(compute)
            with torch.cuda.stream(side):
                handles.append(comm.all_reduce(tile, async_op=True))
        else:
            handles.append(comm.all_reduce(tile, async_op=True))
            _poll(handles)
    # wait() on the compute stream: later work on it is ordered after every tile's collective.
    with _waiting(clock, out.device):
        for h in handles:
            h.wait()
    return out.reshape(*lead, out_features)


@torch.no_grad()
def sum_over_ranks(
    t: torch.Tensor, comm: Communicator, clock: WaitClock | None = None
) -> torch.Tensor:
    """``t`` summed over the tensor-parallel group, in place, and returned: the plain AllReduce
    (the untiled row-parallel linear, the vocabulary-parallel embedding, the lightning norm's
    sums of squares, the experts' partial outputs). A group of one returns ``t`` untouched."""
    if comm.world_size > 1:  # a group of one has nothing to wait for
        with _waiting(clock, t.device):
            comm.all_reduce(t)
    return t


def _waiting(clock: WaitClock | None, device: torch.device):
    return clock.waiting(device) if clock is not None else contextlib.nullcontext()


__all__ = ["linear_all_reduce", "sum_over_ranks", "tile_bounds"]
