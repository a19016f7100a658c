"""Two KV tiers over one id space: device blocks ``0 .. D-1``, host blocks ``D .. D+H-1``.

Pure bookkeeping (block ids, free lists); the tensors live in ``runtime.kv_cache``. The id space
is the contract of /work/coord/SPILL.md: a block table entry is a global id, and its tier is
read off the id alone.
"""

from __future__ import annotations

from scheduler.block_manager import TILE_KEYS
from scheduler.errors import CapacityError, ConfigError
from scheduler.free_runs import FreeBlocks


class TierAllocator:
    """Free lists of device and host blocks. A block taken for a sequence follows the
    sequence's previous one where that is free (``scheduler.free_runs``: whole tiles of
    consecutive ids, even for sequences that grow in the same steps), so kernels read its tiles
    in place and the host blocks a sequence spills in order get consecutive ids: the runtime
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
        extent = TILE_KEYS // block_size  # FreeBlocks takes at least 1
        self._free_dev = FreeBlocks(0, device_blocks, extent)
        self._free_host = FreeBlocks(device_blocks, device_blocks + host_blocks, extent)

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
    def take_device(self, after: int | None = None) -> int:
        """A free device id; ``after``: the sequence's block before it (kept consecutive)."""
        if not self._free_dev:
            raise CapacityError(f"no free device KV block (all {self.device_blocks} in use)")
        return self._free_dev.take(after)

    def take_host(self, after: int | None = None) -> int:
        """A free host id; ``after``: the sequence's block before it (kept consecutive)."""
        if not self._free_host:
            raise CapacityError(f"no free host KV block (all {self.host_blocks} in use)")
        return self._free_host.take(after)

    def release(self, block_id: int) -> None:
        """Return one block to its tier's free list."""
        if not 0 <= block_id < self.num_blocks:
            raise ValueError(f"block id {block_id} outside 0..{self.num_blocks - 1}")
        (self._free_dev if self.on_device(block_id) else self._free_host).release(block_id)

    def free(self, table: list[int]) -> None:
        for b in table:
            self.release(b)
        table.clear()

    def free_ids(self) -> tuple[frozenset[int], frozenset[int]]:
        """The free device and host ids (tests check that no id is both free and in a table)."""
        return self._free_dev.ids(), self._free_host.ids()
