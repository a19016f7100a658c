"""Chunked-prefill scheduling over two KV tiers: which blocks live on the device, which on host.

The plain :class:`~scheduler.scheduler.Scheduler` reserves a sequence's whole lifetime of device
blocks at admission. With a host tier the reservation counts both tiers, and every step places
blocks so that the invariants of the contract hold (/work/coord/SPILL.md):

* the blocks a step writes (positions ``start_pos .. seq_len-1``) are device blocks;
* a host block in a step's table is full and lies entirely before ``start_pos``.

Placement, each step:

1. Plan chunks as the plain scheduler does (decodes first, then prompt chunks in arrival order),
   but each chunk also takes device blocks from a budget of ``D``; a prompt chunk is cut to what
   the budget allows. A sequence that gets no device room this step is *starved* and goes first
   in the next step, so it is never left waiting for good.
2. Make room: spill device blocks to the host, in this order: blocks of running sequences not in
   this step (preemption: the task pauses with all its blocks on the host, and resumes later with
   identical tokens), then the oldest middle blocks of scheduled sequences, then their newest
   ``recent_blocks`` before the write range, then their first ``sink_blocks``.
3. Fetch the step's write blocks that are on the host (a resumed sequence's partial last block),
   allocate new device blocks for the writes.
4. Prefetch: while the device has more free blocks than the next step will need, bring host
   blocks of scheduled sequences back (sinks first, then newest first).

Admission reserves lifetimes against ``D + H - 1`` blocks: one block always stays free somewhere,
so a spill always has a host block to go to while a fetch waits for a device block.
"""

from __future__ import annotations

from dataclasses import dataclass

from scheduler.batch import ScheduledBatch
from scheduler.config import SchedulerConfig
from scheduler.errors import CapacityError, ConfigError
from scheduler.request import SeqStatus, Sequence
from scheduler.scheduler import Scheduler
from scheduler.tiers import TierAllocator


@dataclass
class SpillStats:
    """Totals since start-up; the engine reports them in ``--json`` metrics."""

    blocks_spilled: int = 0  # device -> host copies
    blocks_fetched: int = 0  # host -> device copies
    preemptions: int = 0  # times a running sequence was paused with its blocks moved to host
    steps_with_swaps: int = 0


@dataclass
class _Plan:
    seq: Sequence
    ids: list[int]
    start: int
    sample: bool

    @property
    def end(self) -> int:
        return self.start + len(self.ids)


class SpillScheduler(Scheduler):
    """The chunked-prefill scheduler over a device tier of ``device_blocks`` and a host tier of
    ``host_blocks`` (>= 1) blocks. ``sink_blocks``: each sequence's first blocks, kept on the
    device (attention sinks); ``recent_blocks``: its newest blocks before a step's writes, kept
    on the device while older ones can go."""

    def __init__(
        self,
        config: SchedulerConfig,
        device_blocks: int,
        host_blocks: int,
        sink_blocks: int = 1,
        recent_blocks: int = 2,
    ) -> None:
        if type(host_blocks) is not int or host_blocks < 1:
            raise ConfigError(
                f"host_blocks must be >= 1 for the spill scheduler, got {host_blocks!r}"
            )
        if min(sink_blocks, recent_blocks) < 0:
            raise ConfigError("sink_blocks and recent_blocks must be >= 0")
        super().__init__(config, device_blocks)
        self.sink_blocks, self.recent_blocks = sink_blocks, recent_blocks
        self.tiers = TierAllocator(device_blocks, host_blocks, config.block_size)
        self.blocks = self.tiers  # ``update``/``abort_all`` of the base class free through it
        self._reserved = 0  # blocks reserved for the lifetimes of admitted sequences
        self._lifetime: dict[int, int] = {}
        self._starved: dict[int, int] = {}  # seq_id -> step it first got no device room
        self._paused: set[int] = set()  # seq ids whose blocks were spilled while not scheduled
        self._on_host: dict[int, int] = {}  # seq_id -> how many of its blocks are host blocks
        self.stats = SpillStats()

    # -- admission ---------------------------------------------------------------------------
    @property
    def capacity_tokens(self) -> int:
        return (self.tiers.num_blocks - 1) * self.config.block_size

    def _more_capacity_hint(self) -> str:
        bs = self.config.block_size
        return (
            f"{self.capacity_tokens} tokens fit (device {self.tiers.device_blocks * bs} + host "
            f"{self.tiers.host_blocks * bs}, one block kept free for swaps); give the device "
            "tier more (--kv-cache-tokens) or the host tier more (--kv-host-tokens), "
            "or shorten the prompt"
        )

    def _admit(self) -> None:
        while self.waiting and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            need = self.tiers.blocks_for(len(seq.prompt_ids) + seq.params.max_new_tokens)
            if self._reserved + need > self.tiers.num_blocks - 1:
                break
            self.waiting.popleft()
            self._reserved += need
            self._lifetime[seq.seq_id] = need
            seq.status = SeqStatus.PREFILLING
            self.running.append(seq)

    # -- one step ----------------------------------------------------------------------------
    def schedule(self) -> ScheduledBatch | None:
        self._admit()
        plans = self._plan_chunks()
        if not plans:
            if self.waiting and not self.running:
                seq = self.waiting[0]
                need = self.tiers.blocks_for(len(seq.prompt_ids) + seq.params.max_new_tokens)
                raise CapacityError(
                    f"sequence {seq.seq_id} can never be admitted: it needs {need} blocks, "
                    f"the two tiers hold {self.tiers.num_blocks - 1}"
                )
            return None
        self._step += 1
        swaps = self._place(plans)
        if swaps:
            self.stats.steps_with_swaps += 1
        chunks = tuple(self._chunk(p.seq, p.ids, p.start, p.sample) for p in plans)
        finished, self._finished_since_last = tuple(self._finished_since_last), []
        return ScheduledBatch(
            self._step, chunks, finished, tuple(swaps), kv_saves=self._take_saves()
        )

    def _order(self) -> list[Sequence]:
        """Starved sequences first (longest starved first), then arrival order."""
        big = 1 << 62
        return sorted(self.running, key=lambda s: self._starved.get(s.seq_id, big))

    def _plan_chunks(self) -> list[_Plan]:
        bs = self.config.block_size
        budget = self.config.prefill_chunk
        dev_budget = self.tiers.device_blocks
        plans: list[_Plan] = []
        order = self._order()
        for seq in order:  # decodes first: they are latency-bound
            if budget == 0:
                break
            if not seq.can_decode:  # in prefill, or its last token is in flight
                continue
            if dev_budget < 1:
                self._starved.setdefault(seq.seq_id, self._step)
                continue
            plans.append(_Plan(seq, [seq.next_input()], seq.num_scheduled, sample=True))
            dev_budget -= 1
            budget -= 1
        for seq in order:  # then prompt chunks, cut to the token and device budgets
            if budget == 0:
                break
            if seq.prompt_scheduled:
                continue
            start = seq.num_scheduled
            room = (start // bs + dev_budget) * bs - start
            n = self._cut(seq, start, min(budget, len(seq.prompt_ids) - start, room))
            if n < 1:
                self._starved.setdefault(seq.seq_id, self._step)
                continue
            ids = seq.prompt_ids[start : start + n]
            plans.append(_Plan(seq, ids, start, sample=start + n == len(seq.prompt_ids)))
            dev_budget -= -(-(start + n) // bs) - start // bs
            budget -= n
        for p in plans:
            self._starved.pop(p.seq.seq_id, None)
        return plans

    def _place(self, plans: list[_Plan]) -> list[tuple[int, int]]:
        """Move and allocate blocks so that ``plans`` can run; returns the step's swaps."""
        bs = self.config.block_size
        t = self.tiers
        swaps: list[tuple[int, int]] = []
        scheduled = {p.seq.seq_id for p in plans}
        must: dict[int, range] = {}  # seq_id -> block indices the step writes
        for p in plans:
            must[p.seq.seq_id] = range(p.start // bs, -(-p.end // bs))
        for seq in self.running:  # resumed sequences are running again
            if seq.seq_id in scheduled:
                self._paused.discard(seq.seq_id)

        victims: list = []  # device blocks the step does not write, made on the first spill

        def spill_one() -> None:
            if not victims:
                victims.append(iter(self._victims(plans, must)))
            seq, idx = next(victims[0])
            if seq.seq_id not in scheduled and seq.seq_id not in self._paused:
                self._paused.add(seq.seq_id)
                self.stats.preemptions += 1
            dst = t.take_host(seq.block_table[idx - 1] if idx else None)
            src = seq.block_table[idx]
            swaps.append((src, dst))
            seq.block_table[idx] = dst
            t.release(src)
            self._on_host[seq.seq_id] = self._on_host.get(seq.seq_id, 0) + 1
            self.stats.blocks_spilled += 1

        def fetch(seq: Sequence, idx: int) -> None:
            src = seq.block_table[idx]
            dst = t.take_device(seq.block_table[idx - 1] if idx else None)
            swaps.append((src, dst))
            seq.block_table[idx] = dst
            t.release(src)
            self._on_host[seq.seq_id] -= 1
            self.stats.blocks_fetched += 1

        # One spill at a time, only when the device is full: a fetch frees a host block before
        # the next spill needs one (admission keeps one block free over both tiers).
        # write blocks that sit on the host (a resumed sequence's last, partial block)
        for p in plans:
            table = p.seq.block_table
            for idx in must[p.seq.seq_id]:
                if idx < len(table) and not t.on_device(table[idx]):
                    if t.num_free_device == 0:
                        spill_one()
                    fetch(p.seq, idx)
        # new blocks for the writes
        for p in plans:
            table = p.seq.block_table
            while len(table) < must[p.seq.seq_id].stop:
                if t.num_free_device == 0:
                    spill_one()
                table.append(t.take_device(table[-1] if table else None))
        self._prefetch(plans, fetch)
        return swaps

    def _victims(self, plans: list[_Plan], must: dict[int, range]) -> list[tuple[Sequence, int]]:
        """Device blocks the step may spill, best victim first (order: module docstring).

        One pass over the tables per step; the device budget of ``_plan_chunks`` guarantees
        the list is long enough for the step's spills.
        """
        t = self.tiers
        sink, recent = self.sink_blocks, self.recent_blocks
        out: list[tuple[Sequence, int]] = []
        # 1. running sequences not in this step, lowest priority (latest in order) first
        for seq in reversed(self._order()):
            if seq.seq_id not in must:
                out.extend((seq, i) for i, b in enumerate(seq.block_table) if t.on_device(b))
        # 2-4. blocks before the write range of scheduled sequences: middle, recent, sinks
        ranked: list[tuple[int, int, int]] = []  # (rank, idx, plan index)
        for pi, p in enumerate(plans):
            first = must[p.seq.seq_id].start
            table = p.seq.block_table
            for idx in range(min(first, len(table))):
                if t.on_device(table[idx]):
                    rank = 3 if idx < sink else 2 if idx >= first - recent else 1
                    ranked.append((rank, idx, pi))
        ranked.sort()
        out.extend((plans[pi].seq, idx) for _, idx, pi in ranked)
        return out

    def _next_step_blocks(self, plans: list[_Plan]) -> int:
        """Device blocks the next step will allocate, about: kept free instead of prefetching."""
        bs = self.config.block_size
        need = 0
        for p in plans:
            seq = p.seq
            left = len(seq.prompt_ids) - p.end
            if left > 0:
                need += -(-min(left, self.config.prefill_chunk) // bs) + 1
            elif p.end % bs == 0:
                need += 1
        return need

    def _prefetch(self, plans: list[_Plan], fetch) -> None:
        """Bring host blocks of this step's sequences back while the device has spare room."""
        t = self.tiers
        spare = t.num_free_device - self._next_step_blocks(plans)
        if spare <= 0:
            return
        sink = self.sink_blocks
        for p in plans:
            if not self._on_host.get(p.seq.seq_id):
                continue
            table = p.seq.block_table
            host = [i for i, b in enumerate(table) if not t.on_device(b)]
            host.sort(key=lambda i: (i >= sink, -i))  # sinks, then newest first
            for idx in host:
                if spare <= 0:
                    return
                fetch(p.seq, idx)
                spare -= 1

    # -- results -----------------------------------------------------------------------------
    def update(self, batch: ScheduledBatch, sampled: dict[int, int]) -> list[Sequence]:
        done = super().update(batch, sampled)
        for seq in done:
            self._release(seq)
        return done

    def _release(self, seq: Sequence) -> None:
        self._reserved -= self._lifetime.pop(seq.seq_id, 0)
        self._starved.pop(seq.seq_id, None)
        self._paused.discard(seq.seq_id)
        self._on_host.pop(seq.seq_id, None)

    def abort(self, seq_id: int) -> bool:
        for seq in self.running:
            if seq.seq_id == seq_id:
                self._release(seq)
        return super().abort(seq_id)

    def abort_all(self) -> None:
        for seq in self.running:
            self._release(seq)
        super().abort_all()

    @property
    def paused_seq_ids(self) -> frozenset[int]:
        return frozenset(self._paused)
