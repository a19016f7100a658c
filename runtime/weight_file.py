"""The CPU device's weight tier: the streamed layers' bytes in one file, mapped and read in place.

On the CPU device "device memory" is host memory, so the slower tier is disk, as flash is
Cambricon-LLM's. Copying a layer from the file into a slot every step would move each byte
twice (disk or page cache to the slot, the slot to the cores); instead the layers' parameters
are views of a private read-only mapping of the file, and the kernel pages them in. Before each
streamed layer runs, the next streamed layer's range is advised ``MADV_WILLNEED``, so the
kernel reads it ahead while this layer computes. The pages belong to the page cache, not to
the process: under memory pressure the kernel drops them and reads them again from the file,
which is what lets a model larger than memory run. The file is unlinked as soon as it is
created, so it never outlives the process, even one that is killed.
"""

from __future__ import annotations

import mmap
import os
import tempfile

import torch
from torch import nn

from runtime.weight_tier import move_buffers
from scheduler.errors import CapacityError

ALIGN = 256  # each parameter starts aligned for any dtype and for vector loads


def _align(n: int, to: int) -> int:
    return -(-n // to) * to


class MappedWeights:
    """Writes the ``streamed`` layers of ``layers`` (loaded in host memory) to a file in
    ``directory`` and points their parameters at a mapping of it."""

    tier = "disk"
    nslots = 0

    def __init__(
        self,
        layers: nn.ModuleList,
        streamed: tuple[int, ...],
        device: torch.device,
        directory: str | None = None,
    ) -> None:
        if device.type != "cpu":
            raise ValueError("the disk tier serves the CPU device; accelerators stream from host")
        self.streamed = tuple(streamed)
        self.ranges: list[tuple[int, int]] = []  # (start, length) of each streamed layer
        layouts, pos = [], 0
        for i in self.streamed:
            start, layout, seen = pos, [], set()
            for p in layers[i].parameters():
                if id(p) in seen:
                    continue
                seen.add(id(p))
                pos = _align(pos, ALIGN)
                layout.append((p, pos, p.shape))
                pos += p.numel() * p.element_size()
            self.ranges.append((start, pos - start))
            layouts.append(layout)
            pos = _align(pos, mmap.PAGESIZE)  # each layer's range starts on a page, for madvise
        self.nbytes = max(pos, 1)
        where = directory or tempfile.gettempdir()
        try:
            fd, path = tempfile.mkstemp(prefix="tilerun-weights-", suffix=".bin", dir=directory)
        except OSError as e:
            raise CapacityError(
                f"weight_tier_dir={directory!r}: cannot create the weight file there ({e}); "
                "give a writable directory with room for the streamed layers"
            ) from None
        os.unlink(path)  # gone when the last reference closes, even if the process is killed
        try:
            os.ftruncate(fd, self.nbytes)
            for layout in layouts:
                for p, off, _ in layout:
                    _pwrite_all(fd, p.detach().contiguous().reshape(-1).view(torch.uint8), off)
                    p.data = torch.empty(0, dtype=p.dtype)  # the loaded copy is freed
            # private: the process never writes, so the pages stay the page cache's
            self._map = mmap.mmap(fd, self.nbytes, flags=mmap.MAP_PRIVATE)
        except OSError as e:
            raise CapacityError(
                f"weight_tier_dir={where!r}: writing {self.nbytes / 2**30:.2f} GiB of streamed "
                f"weights failed ({e}); give a directory with room (--weight-tier-dir) or "
                "offload less"
            ) from None
        finally:
            os.close(fd)  # the mapping keeps the file
        data = torch.frombuffer(self._map, dtype=torch.uint8)
        for i, layout in zip(self.streamed, layouts):
            for p, off, shape in layout:
                n = shape.numel() * p.element_size()
                p.data = data[off : off + n].view(p.dtype).view(shape)
            move_buffers(layers[i], device)
        self.fetches = self.fetched_bytes = 0
        self._hooks = [
            layers[i].register_forward_pre_hook(self._read_ahead(j))
            for j, i in enumerate(self.streamed)
        ]

    def _read_ahead(self, j: int):
        nxt = (j + 1) % len(self.streamed)  # this step's next streamed layer, or the next step's

        def hook(module, args):
            start, length = self.ranges[nxt]
            if length:
                self._map.madvise(mmap.MADV_WILLNEED, start, length)
            self.fetches += 1
            self.fetched_bytes += length

        return hook

    def stats(self) -> dict:
        """Layers streamed, bytes per step, read-ahead advice given so far."""
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

    def close(self) -> None:
        """Remove the hooks; the mapping goes with the last parameter that views it."""
        for h in self._hooks:
            h.remove()
        self._hooks = []


def _pwrite_all(fd: int, data: torch.Tensor, offset: int) -> None:
    view = memoryview(data.numpy()).cast("B")
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


__all__ = ["MappedWeights"]
