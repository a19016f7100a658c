"""The host tier of the KV cache: blocks in host memory, allocated in chunks as they are needed.

Host block ``i`` lives in chunk ``i // chunk_blocks`` at row ``i % chunk_blocks``; a chunk holds
every layer's keys and values of its blocks, ``[layers, 2, chunk_blocks, block_size, Hkv, D]``,
so one layer's rows of consecutive host blocks are one contiguous slice (one copy per run).

On a CUDA worker the chunks are pinned (page-locked), which is what lets host->device copies run
at link speed on a copy stream. Pinning is slow (about 1 GiB/s), and a pool sized from free host
memory may be ~100 GiB that a short task never touches, so the pool grows as it fills: a
background thread keeps ``ahead`` chunks pinned beyond the highest chunk used so far (the first
ones once the worker sees the device tier filling, ``pin_ahead``); a chunk needed before the
thread reached it is pinned on the spot. Start-up waits for none of it and pins nothing: pinning
contends with the CUDA calls of start-up (a 7B worker on an H200 was ready 2-3 s later with
8 GiB pinning beside its warm-up); ``pin_all`` asks for everything (benchmarks, then
``wait_allocated``). Elsewhere the chunks are plain ``torch.empty`` memory (the OS hands pages out
when they are first written).

With an 8-bit host dtype (``fp8``/``int8``) a chunk stores bytes plus one float32 scale per
block, layer and K/V (``runtime.kv_quant``).
"""

from __future__ import annotations

import logging
import threading

import torch

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 30  # pinned memory is handed out in powers of two: stay just under one
AHEAD_CHUNKS = 8  # pinned ahead of use: what a burst of spills may take before pinning stalls


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
        ahead: int = AHEAD_CHUNKS,
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
        self._cv = threading.Condition()
        self._ahead = ahead
        self._want = 0  # chunks the background thread should hold (pin_ahead, chunk, pin_*)
        self._done = 0  # chunks the background thread has walked past
        self._stop = False
        self._thread: threading.Thread | None = None
        if background and self.num_chunks:
            self._thread = threading.Thread(target=self._pin_ahead, name="kv-host-pin", daemon=True)
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

    def _pin_ahead(self) -> None:
        try:
            while True:
                with self._cv:
                    while not self._stop and self._done >= self._want:
                        self._cv.wait()
                    if self._stop:
                        return
                    i = self._done
                self._allocate(i)
                with self._cv:
                    self._done = i + 1
                    self._cv.notify_all()
        except Exception as e:  # noqa: BLE001 - the foreground pins what it needs itself
            log.warning("background pinning of the KV host pool stopped: %s", e)

    def _grow_to(self, n: int) -> None:
        n = min(n, self.num_chunks)
        if self._thread is not None and n > self._want:
            with self._cv:
                self._want = max(self._want, n)
                self._cv.notify_all()

    def pin_ahead(self) -> None:
        """Ask the background thread for the first ``ahead`` chunks: the worker calls this once
        the device tier is filling, before the first block spills."""
        self._grow_to(self._ahead)

    def pin_all(self) -> None:
        """Ask the background thread for every chunk (not only those ahead of use)."""
        self._grow_to(self.num_chunks)

    def pin_first(self, blocks: int) -> None:
        """Ask the background thread for the chunks holding host blocks ``0 .. blocks-1`` (ids
        are handed out lowest first, so these are the ones a task of that size uses)."""
        self._grow_to(-(-blocks // self.chunk_blocks))

    def wait_allocated(self, timeout: float | None = None) -> bool:
        """Wait until the chunks asked of the background thread exist (True), or ``timeout``
        passed (False)."""
        if self._thread is None:
            return True
        with self._cv:
            return self._cv.wait_for(lambda: self._done >= self._want or self._stop, timeout)

    def chunk(self, i: int) -> torch.Tensor:
        """Chunk ``i`` ``[layers, 2, rows, block_size, Hkv, D]``, allocated on first use."""
        if i + 1 + self._ahead > self._want:
            self._grow_to(i + 1 + self._ahead)
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
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        self._chunks = [None] * self.num_chunks
        self._scales = [None] * self.num_chunks
