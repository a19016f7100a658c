"""The CPU device's weight tier: the streamed layers' bytes in one file, mapped and read in place.

On the CPU device "device memory" is host memory, so the slower tier is disk, as flash is
Cambricon-LLM's. Copying a layer from the file into a slot every step would move each byte
twice (disk or page cache to the slot, the slot to the cores); instead the layers' parameters
are views of a private mapping of the file (never written), and the kernel pages them in. When
a streamed layer starts, a thread faults the next streamed layer's range in
(``MADV_POPULATE_READ``; ``MADV_WILLNEED`` on kernels before 5.14), so its pages are read from
the file, where memory no longer holds them, while this layer and the resident ones after it
compute, and the compute thread finds them mapped. (Advising ``MADV_WILLNEED`` from the
compute thread itself blocked it while the reads were submitted: measured slower than no
read-ahead at all.) The pages belong to the page cache, not to
the process: under memory pressure the kernel drops them and reads them again from the file,
which is what lets a model larger than memory run. The file is unlinked as soon as it is
created, so it never outlives the process, even one that is killed.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import errno
import mmap
import os
import tempfile

import torch
from torch import nn

from runtime.weight_tier import align_up, bytes_of, move_buffers
from scheduler.errors import CapacityError

AHEAD = 2  # streamed layers read ahead of the one computing
MADV_POPULATE_READ = 22  # Linux 5.14+: fault a range in (reading it) ahead of use
_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)


def _populate(addr: int, length: int) -> None:
    """Fault ``[addr, addr + length)`` in, reading from the file what memory does not hold.
    Called on a thread: ctypes lets go of the GIL for the call."""
    if _libc.madvise(addr, length, MADV_POPULATE_READ) == 0:
        return
    if ctypes.get_errno() == errno.EINVAL:  # an older kernel: ask for read-ahead instead
        _libc.madvise(addr, length, mmap.MADV_WILLNEED)


class MappedWeights:
    """Keeps the ``streamed`` layers of ``layers`` (built in host memory) in a file in
    ``directory``: :meth:`take` writes a loaded layer there and frees it, :meth:`finish` maps
    the file and points the layers' parameters at it."""

    tier = "disk"

    def __init__(
        self,
        layers: nn.ModuleList,
        streamed: tuple[int, ...],
        device: torch.device,
        directory: str | None = None,
    ) -> None:
        if device.type != "cpu":
            raise ValueError("the disk tier serves the CPU device; accelerators stream from host")
        self.streamed, self.device, self._layers = tuple(streamed), device, layers
        self.position = {layer: j for j, layer in enumerate(self.streamed)}
        self.ranges: list[tuple[int, int]] = []  # (start, length) of each streamed layer
        self.layouts: list[list[tuple[nn.Parameter, int, torch.Size]]] = []
        pos = 0
        for i in self.streamed:
            start, layout = pos, []
            for p in layers[i].parameters():  # each shared parameter once
                pos = align_up(pos)
                layout.append((p, pos, p.shape))
                pos += p.numel() * p.element_size()
            self.ranges.append((start, pos - start))
            self.layouts.append(layout)
            pos = align_up(pos, mmap.PAGESIZE)  # each layer's range starts on a page, for madvise
        self.nbytes = max(pos, 1)
        self._where = directory or tempfile.gettempdir()
        try:
            fd, path = tempfile.mkstemp(prefix="tilerun-weights-", suffix=".bin", dir=directory)
        except OSError as e:
            raise CapacityError(
                f"weight_tier_dir={directory!r}: cannot create the weight file there ({e}); "
                "give a writable directory with room for the streamed layers"
            ) from None
        os.unlink(path)  # gone when the last reference closes, even if the process is killed
        self._fd: int | None = fd  # kept for drop_pages; the mapping alone would keep the file
        self._written = [False] * len(self.streamed)
        self._synced = False
        self._pool = None
        self._hooks: list = []
        self.fetches = self.fetched_bytes = 0
        # read-ahead runs AHEAD streamed layers in front of the compute, counted in layer runs
        # since start (``_runs``); ``_issued``: the last run whose read-ahead was queued
        self._runs = self._issued = -1
        self._guard(lambda: os.ftruncate(fd, self.nbytes))

    def _guard(self, write) -> None:
        try:
            write()
        except OSError as e:
            self.close()
            raise CapacityError(
                f"weight_tier_dir={self._where!r}: writing {self.nbytes / 2**30:.2f} GiB of "
                f"streamed weights failed ({e}); give a directory with room "
                "(--weight-tier-dir) or offload less"
            ) from None

    def take(self, layer: int) -> None:
        """Write decoder layer ``layer``'s loaded weights to the file and free them (a layer
        that does not stream, or is written already, is left alone)."""
        j = self.position.get(layer)
        if j is None or self._written[j]:
            return

        def write():
            for p, off, _ in self.layouts[j]:
                _pwrite_all(self._fd, bytes_of(p), off)
                p.data = torch.empty(0, dtype=p.dtype)  # the loaded copy is freed

        self._guard(write)
        self._written[j] = True

    def finish(self) -> None:
        """Every streamed layer written, the file mapped, the parameters views of the mapping,
        the read-ahead hooks set."""
        for i in self.streamed:
            self.take(i)
        # private: the process never writes, so the pages stay the page cache's
        self._guard(
            lambda: setattr(self, "_map", mmap.mmap(self._fd, self.nbytes, mmap.MAP_PRIVATE))
        )
        data = torch.frombuffer(self._map, dtype=torch.uint8)
        self._base = data.data_ptr()
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="weights-ahead")
        for j, (i, layout) in enumerate(zip(self.streamed, self.layouts)):
            for p, off, shape in layout:
                n = shape.numel() * p.element_size()
                p.data = data[off : off + n].view(p.dtype).view(shape)
            move_buffers(self._layers[i], self.device)
            self._hooks.append(self._layers[i].register_forward_pre_hook(self._read_ahead(j)))

    def _read_ahead(self, j: int):
        m = len(self.streamed)

        def hook(module, args):
            run = self._runs + 1
            if run % m != j:  # a step stopped halfway: count from this layer again
                run += (j - run) % m
                self._issued = run
            self._runs = run
            # the next AHEAD streamed layers (this step's, then the next step's), each queued
            # once, in order, on one thread: the disk reads sequentially, never idle
            for ahead in range(max(run, self._issued) + 1, run + AHEAD + 1):
                start, length = self.ranges[ahead % m]
                self._pool.submit(_populate, self._base + start, length)
                self.fetches += 1
                self.fetched_bytes += length
                self._issued = ahead

        return hook

    def stats(self) -> dict:
        """Layers streamed, bytes per step, read-aheads issued so far."""
        return {
            "tier": self.tier,
            "streamed_layers": list(self.streamed),
            "bytes_per_step": sum(n for _, n in self.ranges),
            "slot_bytes": 0,
            "fetches": self.fetches,
            "fetched_bytes": self.fetched_bytes,
            "out_of_order_fetches": 0,
            "host_wait_s": 0.0,
        }

    def drop_pages(self, j: int | None = None) -> None:
        """Drop streamed layer ``j``'s pages (all of them for None) from memory, the process's
        mapping and the page cache, as memory pressure would: the next reads come from the
        disk (``scripts/bench_weight_tier.py --cold`` drops each layer after it ran)."""
        if not self._synced:  # written pages must reach the disk before the cache lets go
            os.fdatasync(self._fd)
            self._synced = True
        start, length = (0, self.nbytes) if j is None else self.ranges[j]
        if length:
            self._map.madvise(mmap.MADV_DONTNEED, start, length)
            os.posix_fadvise(self._fd, start, length, os.POSIX_FADV_DONTNEED)

    def close(self) -> None:
        """Remove the hooks; the mapping goes with the last parameter that views it."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _pwrite_all(fd: int, data: torch.Tensor, offset: int) -> None:
    view = memoryview(data.numpy()).cast("B")
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


__all__ = ["MappedWeights"]
