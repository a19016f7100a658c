"""KV cache storage: per layer, two tensors of fixed-size blocks ``[num_blocks, block_size, Hkv, D]``.

Which block belongs to which sequence is the scheduler's business (block ids only); this module
owns the memory and sizes it.
"""

from __future__ import annotations

import torch

from scheduler.errors import CapacityError


def bytes_per_block(
    num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
) -> int:
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * num_layers * block_size * num_kv_heads * head_dim * elem


class KVCache:
    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        try:
            self.layers = [
                (
                    torch.zeros(shape, dtype=dtype, device=device),
                    torch.zeros(shape, dtype=dtype, device=device),
                )
                for _ in range(num_layers)
            ]
        except torch.OutOfMemoryError as e:
            need = bytes_per_block(num_layers, block_size, num_kv_heads, head_dim, dtype)
            raise CapacityError(
                f"cannot allocate a KV cache of {num_blocks} blocks "
                f"({num_blocks * need / 2**30:.2f} GiB) on {device}; ask for fewer tokens"
            ) from e

    @property
    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in self.layers)
