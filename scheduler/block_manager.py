"""The KV block pool: fixed-size blocks handed out to sequences and returned when they finish.

Pure bookkeeping: block ids only. The tensors behind the ids live in ``runtime.kv_cache``.

A sequence's whole lifetime is taken at admission as one run of consecutive ids where the pool
has one (the smallest that fits), else as whole tiles (``scheduler.free_runs``): attention
backends read such runs in place (``runtime.attention.fused_runs``) and the Hopper kernels load
each tile as one TMA box, in a pool that has been in use for hours as in a fresh one.
"""

from __future__ import annotations

from scheduler.errors import CapacityError, ConfigError
from scheduler.free_runs import FreeBlocks

TILE_KEYS = 128  # keys per tile the allocator keeps consecutive (the kernels' largest key tile)


class BlockAllocator:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1:
            raise ConfigError(f"num_blocks must be >= 1, got {num_blocks}")
        if block_size < 1:
            raise ConfigError(f"block_size must be >= 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free = FreeBlocks(0, num_blocks, TILE_KEYS // block_size)

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, num_tokens: int) -> bool:
        return self.blocks_for(num_tokens) <= len(self._free)

    def grow(self, table: list[int], num_tokens: int) -> None:
        """Append blocks to ``table`` until it holds ``num_tokens`` tokens."""
        need = self.blocks_for(num_tokens) - len(table)
        if need > len(self._free):
            raise CapacityError(
                f"KV cache needs {need} more blocks of {self.block_size} tokens, "
                f"only {len(self._free)} free of {self.num_blocks}"
            )
        if need > 0:
            table.extend(self._free.take_run(need))

    def free(self, table: list[int]) -> None:
        for block in table:
            self._free.release(block)
        table.clear()
