"""The host tier of the KV cache: blocks in host memory, allocated in chunks as they are needed.

Host block ``i`` lives in chunk ``i // chunk_blocks`` at row ``i % chunk_blocks``; a chunk holds
every layer's keys and values of its blocks, ``[layers, 2, chunk_blocks, block_size, Hkv, D]``,
so one layer's rows of consecutive host blocks are one contiguous slice (one copy per run).

On a CUDA worker the chunks are pinned (page-locked), which is what lets host->device copies run
at link speed on a copy stream. Pinning is slow (about 1 GiB/s), so a background thread pins the
chunks in order from start-up on, and a chunk asked for before the thread reached it is pinned on
the spot; start-up itself waits for none of it. Elsewhere the chunks are plain ``torch.empty``
memory (the OS hands pages out when they are first written).

With an 8-bit host dtype (``fp8``/``int8``) a chunk stores bytes plus one float32 scale per
block, layer and K/V (``runtime.kv_quant``).
"""

from __future__ import annotations

import logging
import threading

import torch

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 30  # pinned memory is handed out in powers of two: stay just under one


class HostPool:
    """``num_blocks`` host blocks of ``num_layers`` layers, each ``block_shape`` per K and V."""

    def __init__(
        self,
        num_blocks: int,
        num_layers: int,
        block_shape: tuple[int, int, int],
        dtype: torch.dtype,
        *,
        pin: bool,
        scaled: bool = False,
        chunk_bytes: int = CHUNK_BYTES,
        background: bool = True,
    ) -> None:
        self.num_blocks = num_blocks
        self.num_layers = num_layers
        self.block_shape = block_shape
        self.dtype = dtype
        self.pin = pin
        self.scaled = scaled
        elem = torch.empty((), dtype=dtype).element_size()
        self.block_bytes = 2 * num_layers * block_shape[0] * block_shape[1] * block_shape[2] * elem
        self.chunk_blocks = max(1, min(num_blocks, chunk_bytes // self.block_bytes))
        self.num_chunks = -(-num_blocks // self.chunk_blocks)
        self._chunks: list[torch.Tensor | None] = [None] * self.num_chunks
        self._scales: list[torch.Tensor | None] = [None] * self.num_chunks
        self._lock = threading.Lock()
        self._stop = False
        self._thread: threading.Thread | None = None
        if pin and background and self.num_chunks:
            self._thread = threading.Thread(target=self._pin_all, name="kv-host-pin", daemon=True)
            self._thread.start()

    @property
    def nbytes(self) -> int:
        return self.num_blocks * self.block_bytes

    @property
    def allocated_bytes(self) -> int:
        return sum(c.nbytes for c in self._chunks if c is not None)

    def _rows(self, i: int) -> int:
        return min(self.chunk_blocks, self.num_blocks - i * self.chunk_blocks)

    def _allocate(self, i: int) -> None:
        with self._lock:
            if self._chunks[i] is not None:
                return
            shape = (self.num_layers, 2, self._rows(i), *self.block_shape)
            self._chunks[i] = torch.empty(shape, dtype=self.dtype, pin_memory=self.pin)
            if self.scaled:
                self._scales[i] = torch.ones(
                    (self.num_layers, 2, self._rows(i)), dtype=torch.float32, pin_memory=self.pin
                )

    def _pin_all(self) -> None:
        try:
            for i in range(self.num_chunks):
                if self._stop:
                    return
                self._allocate(i)
        except Exception as e:  # noqa: BLE001 - the foreground pins what it needs itself
            log.warning("background pinning of the KV host pool stopped: %s", e)

    def wait_allocated(self, timeout: float | None = None) -> bool:
        """Block until the background thread has pinned every chunk (True) or ``timeout``
        passed (False); benchmarks call it so that pinning does not run inside their timings."""
        if self._thread is not None:
            self._thread.join(timeout)
            return not self._thread.is_alive()
        return True

    def chunk(self, i: int) -> torch.Tensor:
        """Chunk ``i`` ``[layers, 2, rows, block_size, Hkv, D]``, allocated on first use."""
        c = self._chunks[i]
        if c is None:
            self._allocate(i)
            c = self._chunks[i]
        return c

    def scales(self, i: int) -> torch.Tensor:
        """Chunk ``i``'s per-block scales ``[layers, 2, rows]`` (8-bit host dtypes only)."""
        self.chunk(i)
        return self._scales[i]

    def locate(self, host_index: int) -> tuple[int, int]:
        """``(chunk, row)`` of host block ``host_index``."""
        if not 0 <= host_index < self.num_blocks:
            raise IndexError(f"host block {host_index} is outside the pool of {self.num_blocks}")
        return divmod(host_index, self.chunk_blocks)

    def close(self) -> None:
        self._stop = True
        self._chunks = [None] * self.num_chunks
        self._scales = [None] * self.num_chunks
