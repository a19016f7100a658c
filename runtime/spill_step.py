"""One step over a two-tier KV cache: the step's swaps, then exact attention over mixed tables.

The scheduler hands each sequence a block table of global ids in position order, some of them
host blocks (``runtime.kv_cache``). Host blocks are full and lie before every query of the step,
which is what makes both ways of attending over them exact:

* **stream**: the host blocks a layer reads are copied into the layer's staging buffer (two
  buffers, alternating by layer, so layer ``l+1``'s copies run on the copy stream while layer
  ``l`` computes), and the host ids in the table are replaced by staging rows of the layer's
  window: one kernel call of any backend over the whole sequence, nothing to merge. The
  device blocks that share a ``TILE_KEYS`` key tile with staged ones (the sink block before the
  host range, the first blocks after it) are staged too, in table order, when they are full,
  before the step's queries and the buffer has room: every tile is then consecutive rows, the
  condition of the TMA kernels, which otherwise gather the whole sequence.
  When the distinct host blocks of a step exceed one staging buffer, the first ``S`` go that way
  and the rest stream in *rounds*, still on the device: each round copies a batch of host blocks
  into half of the layer's buffer (the other half fills meanwhile) and attends over them as a
  non-causal partial (they are full and before every query), merged by log-sum-exp. The CPU
  never takes blocks because the staging area is full: a prefill chunk on the CPU costs seconds
  per layer where the device takes milliseconds.
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
from runtime.attention.partial import host_attention, visible_attention
from runtime.device import torch_threads
from runtime.kv_cache import KVCache

# the longest key tile the TMA kernels read as one box (Hopper prefill and decode; the shorter
# ones divide it): a box must be consecutive rows of the cache, so staging fills tiles to this
TILE_KEYS = 128


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
        cpu_min_blocks: int = 0,
        cpu_threads: int | None = None,
        cpu_method: str = "fused",
    ) -> None:
        """``cpu_fraction`` of each sequence's host blocks (at least ``cpu_min_blocks`` of them,
        where it has that many) are attended on the CPU, with ``cpu_threads`` torch threads
        (``None``: the process's setting) by ``cpu_method`` (``runtime.attention.partial``:
        the one ``runtime.spill_rates`` found fastest); the rest stream to the device."""
        self.cpu_threads = cpu_threads
        self.cpu_method = cpu_method
        self.kv = kv
        self.swaps = [tuple(p) for p in swaps]
        d, bs = kv.num_blocks, kv.block_size
        limit = d + kv.host_blocks
        self.tables: list[list[int]] = []  # device-side tables (staged entries: slot numbers)
        self.staged_mask: list[list[bool]] = []
        self.seq_lens: list[int] = []
        self.cpu_ids: list[list[int]] = []  # per sequence: host ids attended on the CPU
        streamed: list[list[int]] = []
        starts: list[int] = []
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
            k = max(round(cpu_fraction * len(hosts)), min(cpu_min_blocks, len(hosts)))
            self.cpu_ids.append(hosts[:k])
            streamed.append(hosts[k:])
            self.seq_lens.append(c.seq_len)
            self.tables.append(used)
            starts.append(c.start_pos)
        # one staging slot per distinct streamed block; beyond one buffer, rounds of half a
        # buffer each (alternating halves, so a round's copy overlaps the previous round)
        ordered = list(dict.fromkeys(b for ids in streamed for b in ids))
        s_blocks = kv.staging_blocks
        fill = self._tile_fill(starts, streamed, d, bs)
        if not any(fill) or len(ordered) + sum(len(f) for f in fill) > s_blocks:
            fill = [set() for _ in streamed]  # nothing to fill, or no room: tiles stay as they are
        else:
            # the device blocks sharing a key tile with staged ones are staged too, in table
            # order: every tile of the table is then consecutive rows, which the TMA kernels read
            staged_ids = []
            for used, ids, f in zip(self.tables, streamed, fill):
                take = f | set(ids)
                staged_ids.append([b for b in used if b in take])
            ordered = list(dict.fromkeys(b for ids in staged_ids for b in ids))
        slots = {b: i for i, b in enumerate(ordered[:s_blocks])}
        rest = ordered[s_blocks:]
        half = max(1, s_blocks // 2)
        self.rounds = [rest[i : i + half] for i in range(0, len(rest), half)]
        # regions of the buffer rounds alternate between (one when the buffer holds one block)
        self._round_offsets = [0, half] if 2 * half <= s_blocks else [0]
        in_round = {b: (r, j) for r, blk in enumerate(self.rounds) for j, b in enumerate(blk)}
        # per round, per sequence: slots (within the round's region) of its blocks
        self.round_slots: list[list[list[int]]] = [[[] for _ in streamed] for _ in self.rounds]
        for i, ids in enumerate(streamed):
            for b in ids:
                if b in in_round:
                    r, j = in_round[b]
                    self.round_slots[r][i].append(j)
        for i, used in enumerate(self.tables):
            dropped = set(self.cpu_ids[i]) | {b for b in streamed[i] if b in in_round}
            table, mask = [], []
            for b in used:
                if b in dropped:
                    continue  # attended elsewhere (CPU, a round): the sequence gets shorter
                staged = b in slots and (b >= d or b in fill[i])  # host, or filling its tile
                table.append(slots[b] if staged else b)
                mask.append(staged)
            self.tables[i] = table
            self.staged_mask.append(mask)
            self.seq_lens[i] -= (len(used) - len(table)) * bs
        self.staged = list(slots)
        cpu_blocks = sum(len(x) for x in self.cpu_ids)
        host_blocks = sum(len(x) for x in streamed) + cpu_blocks
        mode = ("cooperate" if cpu_blocks else "stream") if host_blocks else "none"
        self.figures = SpillFigures(mode=mode, host_blocks=host_blocks, cpu_blocks=cpu_blocks)
        self._cpu_any = self.figures.cpu_blocks > 0
        # copy plans, made once and replayed for every layer
        self._swap_plan = kv.plan_copies(self.swaps) if self.swaps else None
        self._stage_runs = kv.host_runs(self.staged) if self.staged else None
        filled = [(i, b) for i, b in enumerate(self.staged) if b < d]
        self._fill = None  # (slots, device ids) of the device blocks staged to fill tiles
        if filled:
            idx = torch.tensor(filled, dtype=torch.long, device=kv.device).T
            self._fill = (idx[0], idx[1])
        self._round_runs = [kv.host_runs(blk) for blk in self.rounds]
        self._cpu_runs = [kv.host_runs(ids) if ids else None for ids in self.cpu_ids]
        self._layer_of = {k.data_ptr(): i for i, (k, _) in enumerate(kv.layers)}
        self._cuda = kv.device.type == "cuda"
        self._keep: list[torch.Tensor] = []  # pinned buffers in flight until the step ends

    def _tile_fill(self, starts, streamed, d: int, bs: int) -> list[set[int]]:
        """Per sequence: the device blocks that share a ``TILE_KEYS`` key tile with its streamed
        host blocks, where every such block is full and before the step's first position (so
        no write of this step lands in it); a tile with any other block is left as it is.
        Sequences the CPU helps get none (their tables have holes anyway)."""
        per_tile = TILE_KEYS // bs
        out: list[set[int]] = []
        for used, ids, cpu, start in zip(self.tables, streamed, self.cpu_ids, starts):
            fill: set[int] = set()
            host = set(ids)
            if per_tile > 1 and host and not cpu:
                for t0 in range(0, len(used), per_tile):
                    tile = range(t0, min(t0 + per_tile, len(used)))
                    others = [i for i in tile if used[i] not in host]
                    if len(others) == len(tile):
                        continue
                    if all(used[i] < d and (i + 1) * bs <= start for i in others):
                        fill.update(used[i] for i in others)
            out.append(fill)
        return out

    # -- set-up --------------------------------------------------------------------------------
    def bind(self, meta: AttentionMetadata) -> None:
        """Attach to the step's metadata (built from ``tables``/``seq_lens``) and start moving."""
        self.meta = meta
        w = meta.block_tables.shape[1]
        rows = [m + [False] * (w - len(m)) for m in self.staged_mask]
        self.mask = torch.tensor(rows, dtype=torch.bool).reshape(len(rows), w)
        self.mask = self.mask.to(meta.block_tables.device)
        meta.spill = self
        # per round: slots of each sequence's blocks within the round's region, and key counts
        self._round_meta = []
        for r, per_seq in enumerate(self.round_slots):
            off = self._round_offsets[r % len(self._round_offsets)]
            width = max(1, max(len(x) for x in per_seq))
            rows = [[off + j for j in x] + [off] * (width - len(x)) for x in per_seq]
            table = torch.tensor(rows, dtype=torch.int32).reshape(len(rows), width)
            lens = torch.tensor([len(x) * self.kv.block_size for x in per_seq], dtype=torch.int32)
            dev = meta.block_tables.device
            self._round_meta.append((off, table.to(dev), lens.to(dev)))
        L = self.kv.num_layers
        if self._cuda:
            dev = self.kv.device
            self.compute = torch.cuda.current_stream(dev)
            self.copy = torch.cuda.Stream(dev)
            self.side = torch.cuda.Stream(dev) if self._cpu_any else None
            self.ready: list[torch.cuda.Event | None] = [None] * L
            # per layer: its swaps have landed (what the CPU part waits for; None: no swaps)
            self.swapped: list[torch.cuda.Event | None] = [None] * L
            self.stalls: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
            self.copy.wait_stream(self.compute)  # earlier steps' KV writes land before spills
            for layer in range(min(2, L)):
                self._enqueue(layer, None)

    def _move(self, layer: int) -> None:
        """This layer's swaps, then its staging copies (on the current stream)."""
        moved = self.kv.copy_blocks(layer, self.swaps, self._swap_plan) if self.swaps else 0
        if self.staged:
            moved += self.kv.stage(layer, self.staged, self._stage_runs)
            if self._fill is not None:
                self.kv.stage_device(layer, *self._fill)
        self.figures.bytes_moved += moved

    def _enqueue(self, layer: int, after: torch.cuda.Event | None) -> None:
        with torch.cuda.stream(self.copy):
            if self.swaps:
                moved = self.kv.copy_blocks(layer, self.swaps, self._swap_plan)
                self.figures.bytes_moved += moved
                if self._cpu_any:
                    self.swapped[layer] = torch.cuda.Event()
                    self.swapped[layer].record(self.copy)
            if self.staged:
                if after is not None:  # the buffer is free once layer - 2 has read it
                    self.copy.wait_event(after)
                moved = self.kv.stage(layer, self.staged, self._stage_runs)
                self.figures.bytes_moved += moved
                if self._fill is not None:  # after this layer's swaps, on the same stream
                    self.kv.stage_device(layer, *self._fill)
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
        if self.rounds:
            out, lse = self._attend_rounds(layer, q, out, lse, backend, scale)
        self._done(layer)
        if self._cpu_any:
            out = self._cooperate(layer, q_host, out, lse, scale)
        return out

    def _attend_rounds(self, layer, q, out, lse, backend, scale):
        """Host blocks beyond the staging buffer: rounds of copies into the layer's buffer, each
        attended as a non-causal partial on the device and merged into ``(out, lse)``."""
        kv = self.kv
        base = kv.num_layers * kv.num_blocks + (layer % 2) * kv.staging_blocks
        ahead = len(self._round_offsets)  # rounds in flight: one per region of the buffer
        n = len(self.rounds)
        out32 = out.to(torch.float32)
        ready: dict[int, torch.cuda.Event] = {}
        if self._cuda:
            free = torch.cuda.Event()
            free.record(self.compute)  # the main kernel has read the whole buffer
            for r in range(min(ahead, n)):
                ready[r] = self._enqueue_round(layer, r, base, free)
        for r in range(n):
            if self._cuda:
                e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                e0.record(self.compute)
                self.compute.wait_event(ready.pop(r))
                e1.record(self.compute)
                self.stalls.append((e0, e1))
            else:
                t0 = time.perf_counter()
                off = self._round_meta[r][0]
                self.figures.bytes_moved += kv.stage(
                    layer, self.rounds[r], self._round_runs[r], slot0=off
                )
                self.figures.exposed_s += time.perf_counter() - t0
            o, s = self._round_partial(r, base, q, backend, scale)
            if self._cuda and r + ahead < n:
                done = torch.cuda.Event()
                done.record(self.compute)  # this round's region is free again
                ready[r + ahead] = self._enqueue_round(layer, r + ahead, base, done)
            out32, lse = merge_attention_states(out32, lse, o, s)
        return out32.to(out.dtype), lse

    def _enqueue_round(self, layer: int, r: int, base: int, after) -> torch.cuda.Event:
        with torch.cuda.stream(self.copy):
            self.copy.wait_event(after)
            off = self._round_meta[r][0]
            moved = self.kv.stage(layer, self.rounds[r], self._round_runs[r], slot0=off)
            self.figures.bytes_moved += moved
            ev = torch.cuda.Event()
            ev.record(self.copy)
        return ev

    def _round_partial(self, r: int, base: int, q, backend, scale):
        """Every query over the round's blocks of its sequence, no mask: float32 ``out``."""
        off, table, lens = self._round_meta[r]
        kv, meta = self.kv, self.meta
        if backend.name == "triton":
            from runtime.attention import triton_prefill

            o, s = triton_prefill.prefill_attention(
                q,
                kv.k_all,
                kv.v_all,
                meta.query_start_loc,
                lens,
                table + base,
                meta.max_query_len,
                scale,
                config=getattr(backend, "prefill_config", None),
                causal=False,
            )
            return o, s
        T, hq, d = q.shape
        o = torch.zeros(T, hq, d, dtype=torch.float32, device=q.device)
        s = torch.full((T, hq), float("-inf"), dtype=torch.float32, device=q.device)
        start = 0
        for b, qlen in enumerate(meta.query_lens_cpu):
            slots = self.round_slots[r][b]
            if slots:
                idx = torch.tensor([base + off + j for j in slots], device=q.device)
                k = kv.k_all.index_select(0, idx).reshape(-1, *kv.k_all.shape[2:])
                v = kv.v_all.index_select(0, idx).reshape(-1, *kv.v_all.shape[2:])
                ob, sb = visible_attention(q[start : start + qlen], k, v, scale)
                o[start : start + qlen] = ob
                s[start : start + qlen] = sb
            start += qlen
        return o, s

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
            if self.swapped[layer] is not None:  # this layer's spills have landed on the host
                self.swapped[layer].synchronize()  # (not its staging copies: the CPU skips those)
        T, hq, d = q_host.shape
        pin = self._cuda
        out_c = torch.zeros(T, hq, d, dtype=torch.float32, pin_memory=pin)
        lse_c = torch.full((T, hq), float("-inf"), dtype=torch.float32, pin_memory=pin)
        start = 0
        with torch_threads(self.cpu_threads):
            for b, qlen in enumerate(self.meta.query_lens_cpu):
                ids = self.cpu_ids[b]
                if ids:
                    kh, vh = self.kv.host_kv(layer, ids, self._cpu_runs[b])
                    q_b = q_host[start : start + qlen]
                    o, s = host_attention(q_b, kh, vh, scale, self.cpu_method)
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
