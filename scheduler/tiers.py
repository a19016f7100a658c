"""Two KV tiers over one id space: device blocks ``0 .. D-1``, host blocks ``D .. D+H-1``.

Pure bookkeeping (block ids, free lists); the tensors live in ``runtime.kv_cache``. The id space
is the contract of /work/coord/SPILL.md: a block table entry is a global id, and its tier is
read off the id alone.
"""

from __future__ import annotations

import heapq

from scheduler.errors import CapacityError, ConfigError


class TierAllocator:
    """Free lists of device and host blocks. Ids are handed out lowest first (heaps), so the
    host blocks a sequence spills in order get consecutive ids where they are free: the runtime
    copies a run of consecutive host ids in one copy."""

    def __init__(self, device_blocks: int, host_blocks: int, block_size: int) -> None:
        if not isinstance(device_blocks, int) or device_blocks < 1:
            raise ConfigError(f"device_blocks must be >= 1, got {device_blocks!r}")
        if not isinstance(host_blocks, int) or host_blocks < 0:
            raise ConfigError(f"host_blocks must be >= 0, got {host_blocks!r}")
        if not isinstance(block_size, int) or block_size < 1:
            raise ConfigError(f"block_size must be >= 1, got {block_size!r}")
        self.device_blocks = device_blocks
        self.host_blocks = host_blocks
        self.block_size = block_size
        self._free_dev: list[int] = list(range(device_blocks))  # sorted: a valid heap
        self._free_host: list[int] = list(range(device_blocks, device_blocks + host_blocks))

    # -- queries -------------------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return self.device_blocks + self.host_blocks

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def num_free_device(self) -> int:
        return len(self._free_dev)

    @property
    def num_free_host(self) -> int:
        return len(self._free_host)

    def on_device(self, block_id: int) -> bool:
        return block_id < self.device_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # -- moves ---------------------------------------------------------------------------------
    def take_device(self) -> int:
        if not self._free_dev:
            raise CapacityError(f"no free device KV block (all {self.device_blocks} in use)")
        return heapq.heappop(self._free_dev)

    def take_host(self) -> int:
        if not self._free_host:
            raise CapacityError(f"no free host KV block (all {self.host_blocks} in use)")
        return heapq.heappop(self._free_host)

    def release(self, block_id: int) -> None:
        """Return one block to its tier's free list."""
        if not 0 <= block_id < self.num_blocks:
            raise ValueError(f"block id {block_id} outside 0..{self.num_blocks - 1}")
        heapq.heappush(self._free_dev if self.on_device(block_id) else self._free_host, block_id)

    def free(self, table: list[int]) -> None:
        for b in table:
            self.release(b)
        table.clear()

    def free_ids(self) -> tuple[frozenset[int], frozenset[int]]:
        """The free device and host ids (tests check that no id is both free and in a table)."""
        return frozenset(self._free_dev), frozenset(self._free_host)
