"""Column- and row-parallel linear layers (Megatron style), sharded at load time.

Each weight parameter carries a ``weight_loader(param, full_tensor_or_slice_fn, part)`` that copies
this rank's slice of the *unsharded* checkpoint tensor into place, so checkpoints stay in the
Hugging Face layout and each rank reads only its slice.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from collectives.tiled_allreduce import linear_all_reduce
from runtime.parallel import ParallelState, shard_size

# A loaded tensor is either materialised or a function (dim, start, stop) -> slice of it, so a
# loader can read just its rows/columns from a safetensors file.
Loadable = torch.Tensor | Callable[[int, int, int], torch.Tensor]


def take(src: Loadable, dim: int, start: int, stop: int) -> torch.Tensor:
    if isinstance(src, torch.Tensor):
        return src.narrow(dim, start, stop - start)
    return src(dim, start, stop)


class ColumnParallelLinear(nn.Module):
    """``y = x W^T`` with W's output rows split over ranks; several fused parts (q|k|v, gate|up).

    ``part_sizes`` are the *unsharded* output sizes of the fused parts; each is divided over ranks
    and rank r holds the r-th slice of every part, concatenated.
    """

    def __init__(
        self,
        in_features: int,
        part_sizes: Sequence[int],
        tp: ParallelState,
        names: Sequence[str],
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        super().__init__()
        self.tp = tp
        self.full_sizes = list(part_sizes)
        self.local_sizes = [
            shard_size(n, tp.world_size, what) for n, what in zip(part_sizes, names)
        ]
        self.offsets = [sum(self.local_sizes[:i]) for i in range(len(self.local_sizes))]
        self.weight = nn.Parameter(
            torch.empty(sum(self.local_sizes), in_features, dtype=dtype, device=device),
            requires_grad=False,
        )
        self.weight.weight_loader = self.load_part

    def load_part(self, src: Loadable, part: int = 0) -> None:
        n = self.local_sizes[part]
        start = self.tp.rank * n
        self.weight.data.narrow(0, self.offsets[part], n).copy_(take(src, 0, start, start + n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.weight)


class RowParallelLinear(nn.Module):
    """``y = sum_r x_r W_r^T``: input columns split over ranks, partial sums AllReduced.

    The AllReduce is issued by ``linear_all_reduce``, tiled over output rows and overlapped with
    the computation of the next tile when the parallel state asks for more than one tile.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        tp: ParallelState,
        name: str,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        super().__init__()
        self.tp = tp
        self.local_in = shard_size(in_features, tp.world_size, name)
        self.weight = nn.Parameter(
            torch.empty(out_features, self.local_in, dtype=dtype, device=device),
            requires_grad=False,
        )
        self.weight.weight_loader = self.load_part

    def load_part(self, src: Loadable, part: int = 0) -> None:
        start = self.tp.rank * self.local_in
        self.weight.data.copy_(take(src, 1, start, start + self.local_in))

    def forward(
        self,
        x: torch.Tensor,
        prologue: Callable[[torch.Tensor], torch.Tensor] | None = None,
        prologue_cost: float = 0.0,
    ) -> torch.Tensor:
        """``prologue`` (row-wise) turns ``x`` into this layer's input, tile by tile when the
        AllReduce is tiled; ``prologue_cost`` is its FLOPs relative to this matmul's, for the
        tile-count model."""
        out_f, in_f = self.weight.shape
        tiles = self.tp.tiles_for(x.shape[0], out_f, int(in_f * (1 + prologue_cost)))
        return linear_all_reduce(
            x, self.weight, self.tp.comm, tiles, prologue=prologue, clock=self.tp.wait_clock
        )
