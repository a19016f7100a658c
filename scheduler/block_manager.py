"""The KV block pool: fixed-size blocks handed out to sequences and returned when they finish.

Pure bookkeeping: block ids only. The tensors behind the ids live in ``runtime.kv_cache``.

The lowest free id goes out first (a heap), so a sequence that grows by many blocks at once (a
prefill chunk) gets runs of consecutive ids whenever the pool is not fragmented, whatever order
earlier sequences returned theirs in: attention backends read such runs in place
(``runtime.attention.cpu_flash``) instead of gathering them.
"""

from __future__ import annotations

import heapq

from scheduler.errors import CapacityError, ConfigError


class BlockAllocator:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1:
            raise ConfigError(f"num_blocks must be >= 1, got {num_blocks}")
        if block_size < 1:
            raise ConfigError(f"block_size must be >= 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: list[int] = list(range(num_blocks))  # a heap (sorted is one)

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
        for _ in range(max(need, 0)):
            table.append(heapq.heappop(self._free))

    def free(self, table: list[int]) -> None:
        for block in table:
            heapq.heappush(self._free, block)
        table.clear()
