"""One step over a two-tier KV cache: the step's swaps, then exact attention over mixed tables.

The scheduler hands each sequence a block table of global ids in position order, some of them
host blocks (``runtime.kv_cache``). Host blocks are full and lie before every query of the step,
which is what makes both ways of attending over them exact:

* **stream**: the host blocks a layer reads are copied into the layer's staging buffer (two
  buffers, alternating by layer, so layer ``l+1``'s copies run on the copy stream while layer
  ``l`` computes), and the host ids in the table are replaced by staging rows of the layer's
  window: one kernel call of any backend over the whole sequence, nothing to merge.
* **cooperate**: some host blocks are dropped from the table and attended on the CPU
  (``runtime.attention.partial``) while the device runs the rest; dropping whole, full blocks
  that every query sees leaves the causal structure of the remaining (shorter) sequence intact,
  because RoPE is already inside the cached keys. The two partials merge by log-sum-exp.

The step's swaps (``ScheduledBatch.swaps``) run for each layer, in order, before that layer's
KV write, on the same copy stream (on CUDA) ahead of the layer's staging copies.

What it reports: bytes that crossed between tiers (swaps, staging) and the time the compute
waited for them (CUDA: measured with events around each wait; elsewhere the copies' own time).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import torch

from runtime.attention.base import AttentionBackend, AttentionMetadata
from runtime.attention.merge import merge_attention_states
from runtime.attention.partial import visible_attention
from runtime.kv_cache import KVCache


class SpillInvariantError(ValueError):
    """A block table breaks the tier contract (a scheduler bug, never a user's)."""


@dataclass
class SpillFigures:
    bytes_moved: int = 0  # swaps + staging, bytes that crossed between tiers
    exposed_s: float = 0.0  # time the computation waited for movement
    mode: str = "none"  # none | stream | cooperate
    host_blocks: int = 0  # host block reads this step (per layer)
    cpu_blocks: int = 0  # of which attended on the CPU


def host_blocks_of(chunks, num_device_blocks: int, block_size: int) -> int:
    """How many host-resident table entries the chunks read (0: an all-device step)."""
    n = 0
    for c in chunks:
        used = -(-c.seq_len // block_size)
        n += sum(1 for b in c.block_table[:used] if b >= num_device_blocks)
    return n


class SpillStep:
    """The plan and the movement of one step; ``attention`` is called once per layer."""

    def __init__(
        self,
        kv: KVCache,
        chunks,
        swaps: tuple[tuple[int, int], ...] = (),
        *,
        cpu_fraction: float = 0.0,
    ) -> None:
        self.kv = kv
        self.swaps = [tuple(p) for p in swaps]
        d, bs = kv.num_blocks, kv.block_size
        limit = d + kv.host_blocks
        self.tables: list[list[int]] = []  # device-side tables (staged entries: slot numbers)
        self.staged_mask: list[list[bool]] = []
        self.seq_lens: list[int] = []
        self.cpu_ids: list[list[int]] = []  # per sequence: host ids attended on the CPU
        streamed: list[list[int]] = []
        for c in chunks:
            used = list(c.block_table[: -(-c.seq_len // bs)])
            hosts = []
            for i, b in enumerate(used):
                if not 0 <= b < limit:
                    raise SpillInvariantError(
                        f"sequence {c.seq_id}: block id {b} is outside the cache "
                        f"({d} device + {kv.host_blocks} host blocks)"
                    )
                if b >= d:
                    if (i + 1) * bs > c.start_pos:
                        raise SpillInvariantError(
                            f"sequence {c.seq_id}: host block {b} at table entry {i} is not "
                            f"full and before the step's first position {c.start_pos}"
                        )
                    hosts.append(b)
            k = round(cpu_fraction * len(hosts))
            self.cpu_ids.append(hosts[:k])
            streamed.append(hosts[k:])
            self.seq_lens.append(c.seq_len)
            self.tables.append(used)
        # one staging slot per distinct streamed block; what does not fit goes to the CPU
        slots: dict[int, int] = {}
        for ids in streamed:
            for b in ids:
                if b not in slots and len(slots) < kv.staging_blocks:
                    slots[b] = len(slots)
        self.staged = list(slots)
        for i, ids in enumerate(streamed):
            over = [b for b in ids if b not in slots]
            if over:
                self.cpu_ids[i] = self.cpu_ids[i] + over
        for i, used in enumerate(self.tables):
            cpu = set(self.cpu_ids[i])
            table, mask = [], []
            for b in used:
                if b in cpu:
                    continue  # attended on the CPU: dropped, the sequence gets shorter
                table.append(slots[b] if b >= d else b)
                mask.append(b >= d)
            self.tables[i] = table
            self.staged_mask.append(mask)
            self.seq_lens[i] -= len(self.cpu_ids[i]) * bs
        cpu_blocks = sum(len(x) for x in self.cpu_ids)
        host_blocks = sum(sum(m) for m in self.staged_mask) + cpu_blocks
        mode = ("cooperate" if cpu_blocks else "stream") if host_blocks else "none"
        self.figures = SpillFigures(mode=mode, host_blocks=host_blocks, cpu_blocks=cpu_blocks)
        self._cpu_any = self.figures.cpu_blocks > 0
        # copy plans, made once and replayed for every layer
        self._swap_plan = kv.plan_copies(self.swaps) if self.swaps else None
        self._stage_runs = kv.host_runs(self.staged) if self.staged else None
        self._cpu_runs = [kv.host_runs(ids) if ids else None for ids in self.cpu_ids]
        self._layer_of = {k.data_ptr(): i for i, (k, _) in enumerate(kv.layers)}
        self._cuda = kv.device.type == "cuda"
        self._keep: list[torch.Tensor] = []  # pinned buffers in flight until the step ends

    # -- set-up --------------------------------------------------------------------------------
    def bind(self, meta: AttentionMetadata) -> None:
        """Attach to the step's metadata (built from ``tables``/``seq_lens``) and start moving."""
        self.meta = meta
        w = meta.block_tables.shape[1]
        rows = [m + [False] * (w - len(m)) for m in self.staged_mask]
        self.mask = torch.tensor(rows, dtype=torch.bool).reshape(len(rows), w)
        self.mask = self.mask.to(meta.block_tables.device)
        meta.spill = self
        L = self.kv.num_layers
        if self._cuda:
            dev = self.kv.device
            self.compute = torch.cuda.current_stream(dev)
            self.copy = torch.cuda.Stream(dev)
            self.side = torch.cuda.Stream(dev) if self._cpu_any else None
            self.ready: list[torch.cuda.Event | None] = [None] * L
            self.stalls: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
            self.copy.wait_stream(self.compute)  # earlier steps' KV writes land before spills
            for layer in range(min(2, L)):
                self._enqueue(layer, None)

    def _move(self, layer: int) -> None:
        """This layer's swaps, then its staging copies (on the current stream)."""
        moved = self.kv.copy_blocks(layer, self.swaps, self._swap_plan) if self.swaps else 0
        if self.staged:
            moved += self.kv.stage(layer, self.staged, self._stage_runs)
        self.figures.bytes_moved += moved

    def _enqueue(self, layer: int, after: torch.cuda.Event | None) -> None:
        with torch.cuda.stream(self.copy):
            if self.swaps:
                moved = self.kv.copy_blocks(layer, self.swaps, self._swap_plan)
                self.figures.bytes_moved += moved
            if self.staged:
                if after is not None:  # the buffer is free once layer - 2 has read it
                    self.copy.wait_event(after)
                moved = self.kv.stage(layer, self.staged, self._stage_runs)
                self.figures.bytes_moved += moved
            ev = torch.cuda.Event()
            ev.record(self.copy)
        self.ready[layer] = ev

    def _wait(self, layer: int) -> None:
        if not self._cuda:
            t0 = time.perf_counter()
            self._move(layer)
            self.figures.exposed_s += time.perf_counter() - t0
            return
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record(self.compute)
        self.compute.wait_event(self.ready[layer])
        e1.record(self.compute)
        self.stalls.append((e0, e1))

    def _done(self, layer: int) -> None:
        if not self._cuda or layer + 2 >= self.kv.num_layers:
            return
        ev = torch.cuda.Event()
        ev.record(self.compute)
        self._enqueue(layer + 2, ev)

    # -- per layer -----------------------------------------------------------------------------
    def attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        backend: AttentionBackend,
        scale: float,
    ) -> torch.Tensor:
        """The layer's KV write and attention over its mixed table; returns ``out [T, Hq, D]``."""
        layer = self._layer_of[k_cache.data_ptr()]
        meta = self.meta
        self._wait(layer)
        backend.write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        q_host = self._queries_to_host(q) if self._cpu_any else None
        if self.staged:
            kw, vw = self.kv.window(layer)
            off = self.kv.staging_offset(layer)
            table = torch.where(self.mask, meta.block_tables + off, meta.block_tables)
            run_meta = replace(meta, block_tables=table, spill=None)
        else:
            kw, vw, run_meta = k_cache, v_cache, meta
        out, lse = backend.forward(q, kw, vw, run_meta, scale)
        self._done(layer)
        if self._cpu_any:
            out = self._cooperate(layer, q_host, out, lse, scale)
        return out

    def _queries_to_host(self, q: torch.Tensor):
        if not self._cuda:
            return q
        ev = torch.cuda.Event()
        ev.record(self.compute)
        buf = torch.empty(q.shape, dtype=q.dtype, pin_memory=True)
        with torch.cuda.stream(self.side):
            self.side.wait_event(ev)
            buf.copy_(q, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.side)
        return buf, done

    def _cooperate(self, layer, q_host, out, lse, scale) -> torch.Tensor:
        if self._cuda:
            q_host, copied = q_host
            dev_done = torch.cuda.Event(enable_timing=True)
            dev_done.record(self.compute)
            copied.synchronize()
            self.ready[layer].synchronize()  # this layer's spills have landed on the host
        T, hq, d = q_host.shape
        pin = self._cuda
        out_c = torch.zeros(T, hq, d, dtype=torch.float32, pin_memory=pin)
        lse_c = torch.full((T, hq), float("-inf"), dtype=torch.float32, pin_memory=pin)
        start = 0
        for b, qlen in enumerate(self.meta.query_lens_cpu):
            ids = self.cpu_ids[b]
            if ids:
                kh, vh = self.kv.host_kv(layer, ids, self._cpu_runs[b])
                o, s = visible_attention(q_host[start : start + qlen], kh, vh, scale)
                out_c[start : start + qlen] = o
                lse_c[start : start + qlen] = s
            start += qlen
        if self._cuda:
            resumed = torch.cuda.Event(enable_timing=True)
            resumed.record(self.compute)  # the device idled from dev_done until here (if done)
            self.stalls.append((dev_done, resumed))
            self._keep += [out_c, lse_c, q_host]
            out_c = out_c.to(out.device, non_blocking=True)
            lse_c = lse_c.to(out.device, non_blocking=True)
        merged, _ = merge_attention_states(out, lse, out_c, lse_c)
        return merged

    def finish(self) -> SpillFigures:
        """After the step's computation: wait for the copy stream, total the figures."""
        if self._cuda:
            self.compute.wait_stream(self.copy)
            self.compute.synchronize()
            self.figures.exposed_s += sum(a.elapsed_time(b) for a, b in self.stalls) / 1e3
            self._keep.clear()
        return self.figures
