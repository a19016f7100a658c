"""Decoder layers whose weights live in host memory and are streamed to the device every step.

A streamed layer's parameters are views into one of two device slots, for good: the layer that
computes reads its slot while the next streamed layer is copied into the other slot from
page-locked host memory on a side CUDA stream, issued the moment the slot's previous layer has
finished (a post-forward hook) and awaited just before the layer runs (a pre-forward hook).
Nothing is re-pointed per step. (On the CPU device, which tests use, a thread copies.) The CPU
device's own tier, a mapped file, is ``runtime/weight_file.py``; :func:`stream_layers` picks.

Correctness never rests on the hook chain: each slot records which layer it holds or is
receiving, and a layer that finds another layer's bytes in its slot (a step that raised halfway,
say) fetches its own before it runs.
"""

from __future__ import annotations

import concurrent.futures
import time
from dataclasses import dataclass

import torch
from torch import nn

from scheduler.weight_plan import SLOTS

ALIGN = 256  # each parameter starts aligned for any dtype and for vector loads


@dataclass(frozen=True)
class _Param:
    param: nn.Parameter
    offset: int
    nbytes: int
    shape: torch.Size


def align_up(n: int, to: int = ALIGN) -> int:
    return -(-n // to) * to


def bytes_of(t: torch.Tensor) -> torch.Tensor:
    """``t``'s bytes as a flat uint8 tensor (a view where ``t`` is contiguous)."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


class WeightStreamer:
    """Keeps the ``streamed`` layers of ``layers`` (built in host memory) in page-locked host
    memory and serves them to ``device`` through a two-slot ring: :meth:`take` moves a loaded
    layer into the tier, :meth:`finish` sets up the slots and the hooks."""

    def __init__(
        self, layers: nn.ModuleList, streamed: tuple[int, ...], device: torch.device
    ) -> None:
        self.tier, self.device, self.streamed = "host", device, tuple(streamed)
        self._layers = layers
        self.position = {layer: j for j, layer in enumerate(self.streamed)}
        self.layouts: list[list[_Param]] = []
        for i in self.streamed:
            layout, off = [], 0
            for p in layers[i].parameters():  # each shared parameter once
                n = p.numel() * p.element_size()
                layout.append(_Param(p, off, n, p.shape))
                off = align_up(off + n)
            self.layouts.append(layout)
        self.sizes = [max((e.offset + e.nbytes for e in lay), default=0) for lay in self.layouts]
        self.nslots = min(SLOTS, len(self.streamed))
        self.slots: list[torch.Tensor] = []
        self.owner: list[int | None] = [None] * self.nslots  # streamed position held or filling
        self.pending: list[object] = [None] * self.nslots  # a CUDA event or a thread's future
        self.fetches = self.fetched_bytes = self.sync_fetches = 0
        self.wait_s = 0.0
        self._pool = None
        self._stream = None
        self._host: list[torch.Tensor | None] = [None] * len(self.streamed)
        self._hooks: list = []

    # -- building the tier ----------------------------------------------------------------------
    def take(self, layer: int) -> None:
        """Move decoder layer ``layer``'s loaded weights into page-locked host memory and free
        them (a layer that does not stream, or is in already, is left alone)."""
        j = self.position.get(layer)
        if j is None or self._host[j] is not None:
            return
        buf = torch.empty(self.sizes[j], dtype=torch.uint8, pin_memory=self.device.type == "cuda")
        for e in self.layouts[j]:
            buf[e.offset : e.offset + e.nbytes].copy_(bytes_of(e.param.data))
            e.param.data = torch.empty(0, dtype=e.param.dtype)  # the loaded copy is freed
        self._host[j] = buf

    def finish(self) -> None:
        """Every streamed layer in the tier, its parameters views of a device slot, the hooks
        set, and the first step's first layers on their way."""
        for i in self.streamed:
            self.take(i)
        width = max(self.sizes, default=0)
        self.slots = [
            torch.empty(width, dtype=torch.uint8, device=self.device) for _ in range(self.nslots)
        ]
        if self.device.type == "cuda":
            self._stream = torch.cuda.Stream(self.device)
        else:
            self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="tier")
        for j, i in enumerate(self.streamed):
            self._point_at_slot(self._layers[i], j)
            self._hooks.append(self._layers[i].register_forward_pre_hook(self._pre_hook(j)))
            self._hooks.append(self._layers[i].register_forward_hook(self._post_hook(j)))
        for j in range(self.nslots):
            self._fetch(j, after=None)

    def _point_at_slot(self, layer: nn.Module, j: int) -> None:
        slot = self.slots[j % self.nslots]
        for e in self.layouts[j]:
            view = slot[e.offset : e.offset + e.nbytes].view(e.param.dtype)
            e.param.data = view.view(e.shape)
        move_buffers(layer, self.device)

    # -- the ring -------------------------------------------------------------------------------
    def _successor(self, j: int) -> int:
        """The next streamed position (this step or the next) that uses position ``j``'s slot."""
        m = len(self.streamed)
        for k in range(1, m + 1):
            if (j + k) % m % self.nslots == j % self.nslots:
                return (j + k) % m
        return j

    def _fetch(self, j: int, after: torch.cuda.Event | None) -> None:
        s = j % self.nslots
        slot = self.slots[s][: self.sizes[j]]
        self.owner[s] = j
        self.fetches += 1
        self.fetched_bytes += self.sizes[j]
        if self._stream is not None:
            with torch.cuda.stream(self._stream):
                if after is not None:
                    self._stream.wait_event(after)
                slot.copy_(self._host[j], non_blocking=True)
                done = torch.cuda.Event()
                done.record(self._stream)
            self.pending[s] = done
        else:
            self.pending[s] = self._pool.submit(slot.copy_, self._host[j])

    def _ensure(self, j: int) -> None:
        s = j % self.nslots
        if self.owner[s] != j:  # the chain was broken: fetch in order with this stream's work
            self.sync_fetches += 1
            self._wait(s)
            self._fetch(j, after=self._mark())
        self._wait(s)

    def _wait(self, s: int) -> None:
        p, self.pending[s] = self.pending[s], None
        if p is None:
            return
        t0 = time.perf_counter()
        if isinstance(p, torch.cuda.Event):
            torch.cuda.current_stream(self.device).wait_event(p)
        else:
            p.result()
        self.wait_s += time.perf_counter() - t0

    def _mark(self) -> torch.cuda.Event | None:
        if self._stream is None:
            return None  # CPU compute is synchronous: the layer is done when its hook runs
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(self.device))
        return ev

    def _pre_hook(self, j: int):
        def hook(module, args):
            self._ensure(j)

        return hook

    def _post_hook(self, j: int):
        nxt = self._successor(j)  # fixed for the run: found once, not per layer and step

        def hook(module, args, output):
            s = j % self.nslots
            # nxt == j: the slot is this layer's alone (two or fewer streamed), keep its bytes
            if nxt != j and self.owner[s] == j and self.pending[s] is None:
                self._fetch(nxt, after=self._mark())

        return hook

    # -- reporting and shutdown -----------------------------------------------------------------
    def stats(self) -> dict:
        """Layers streamed, bytes per step, fetches so far, and time the host spent waiting."""
        return {
            "tier": self.tier,
            "streamed_layers": list(self.streamed),
            "bytes_per_step": sum(self.sizes),
            "slot_bytes": sum(s.numel() for s in self.slots),
            "fetches": self.fetches,
            "fetched_bytes": self.fetched_bytes,
            "out_of_order_fetches": self.sync_fetches,
            "host_wait_s": round(self.wait_s, 6),
        }

    def close(self) -> None:
        for s in range(self.nslots):
            self._wait(s)
        for h in self._hooks:
            h.remove()
        if self._pool is not None:
            self._pool.shutdown(wait=True)


def move_buffers(module: nn.Module, device: torch.device) -> None:
    """Buffers (decay rates, ...) of a streamed layer stay resident on ``device``."""
    for mod in module.modules():
        for name, buf in mod._buffers.items():
            if buf is not None:
                mod._buffers[name] = buf.to(device)


def stream_layers(
    layers: nn.ModuleList,
    streamed: tuple[int, ...],
    tier: str,
    device: torch.device,
    directory: str | None = None,
):
    """Keep the ``streamed`` layers in ``tier`` (``host``: this ring; ``disk``: a mapped file
    in ``directory``, the CPU device's tier)."""
    if tier == "disk":
        from runtime.weight_file import MappedWeights

        return MappedWeights(layers, streamed, device, directory)
    return WeightStreamer(layers, streamed, device)


__all__ = ["ALIGN", "WeightStreamer", "align_up", "bytes_of", "move_buffers", "stream_layers"]
