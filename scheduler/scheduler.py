"""Chunked-prefill scheduling: the outer level of the two-level tiling.

Each step gets a token budget (``prefill_chunk``). Sequences already decoding take one token each;
the rest of the budget goes to prompt chunks in arrival order, so activation memory is bounded by
the chunk, never by the prompt. A sequence is admitted only when the cache can hold its prompt and
all its new tokens, so a running sequence never waits for blocks.
"""

from __future__ import annotations

import time
from collections import deque

from scheduler.batch import ScheduledBatch, SeqChunk
from scheduler.block_manager import BlockAllocator
from scheduler.config import SchedulerConfig
from scheduler.errors import CapacityError, ConfigError
from scheduler.request import SamplingParams, SeqStatus, Sequence


class Scheduler:
    def __init__(self, config: SchedulerConfig, num_blocks: int) -> None:
        """``config`` with ``max_model_len`` set (``SchedulerConfig.for_model``); ``num_blocks``
        is the KV pool the workers hold."""
        if config.max_model_len is None:
            raise ConfigError("max_model_len is unset: resolve it with SchedulerConfig.for_model")
        if config.prefill_chunk is None:
            raise ConfigError("prefill_chunk is unset: resolve it with SchedulerConfig.for_device")
        if type(num_blocks) is not int or num_blocks < 1:
            raise ConfigError(f"num_blocks must be a positive integer, got {num_blocks!r}")
        self.config = config
        self.blocks = BlockAllocator(num_blocks, config.block_size)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._step = 0
        self._finished_since_last: list[int] = []
        self._saves: list[tuple[int, int, str, str]] = []  # this step's, made by ``_chunk``

    # -- admission ---------------------------------------------------------------------------
    def check_fits(self, prompt_len: int, params: SamplingParams) -> None:
        """Raise a CapacityError naming the limit a request would exceed, and by how much."""
        if prompt_len < 1:
            raise CapacityError("the prompt is empty: give at least one token")
        total = prompt_len + params.max_new_tokens
        limit = self.config.max_model_len
        if total > limit:
            raise CapacityError(
                f"prompt of {prompt_len} tokens + max_new_tokens {params.max_new_tokens} = {total} "
                f"exceeds the model's context limit max_model_len={limit} by {total - limit} tokens"
            )
        cap = self.capacity_tokens
        if total > cap:
            raise CapacityError(
                f"prompt of {prompt_len} tokens + max_new_tokens {params.max_new_tokens} = {total} "
                f"exceeds the KV cache capacity of {cap} tokens by {total - cap} tokens; "
                + self._more_capacity_hint()
            )

    @property
    def capacity_tokens(self) -> int:
        """The most tokens (prompt + new) one request may hold."""
        return self.blocks.capacity_tokens

    def _more_capacity_hint(self) -> str:
        return "give the cache more memory (--kv-cache-tokens) or shorten the prompt"

    def add(self, seq: Sequence) -> None:
        self.check_fits(len(seq.prompt_ids), seq.params)
        self.waiting.append(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # -- one step ----------------------------------------------------------------------------
    def schedule(self) -> ScheduledBatch | None:
        budget = self.config.prefill_chunk
        chunks: list[SeqChunk] = []
        # Admit waiting sequences while there are seats and blocks for their whole lifetime.
        while self.waiting and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            lifetime = len(seq.prompt_ids) + seq.params.max_new_tokens
            if not self.blocks.can_allocate(lifetime):
                break
            self.waiting.popleft()
            self.blocks.grow(seq.block_table, lifetime)
            seq.status = SeqStatus.PREFILLING
            self.running.append(seq)
        # Decoding sequences first (one token each): they are latency-bound. A sequence whose
        # previous token is still being sampled by a step in flight decodes a placeholder.
        for seq in self.running:
            if budget == 0:
                break
            if seq.can_decode:
                chunks.append(self._chunk(seq, [seq.next_input()], seq.num_scheduled, sample=True))
                budget -= 1
        # Then prompt chunks, oldest first.
        for seq in self.running:
            if budget == 0:
                break
            if not seq.prompt_scheduled:
                start = seq.num_scheduled
                n = self._cut(seq, start, min(budget, len(seq.prompt_ids) - start))
                ids = seq.prompt_ids[start : start + n]
                chunks.append(self._chunk(seq, ids, start, sample=start + n == len(seq.prompt_ids)))
                budget -= n
        if not chunks:
            if self.waiting and not self.running:
                seq = self.waiting[0]
                raise CapacityError(
                    f"sequence {seq.seq_id} can never be admitted: it needs "
                    f"{self.blocks.blocks_for(len(seq.prompt_ids) + seq.params.max_new_tokens)} "
                    f"blocks, the cache has {self.blocks.num_blocks}"
                )
            return None
        self._step += 1
        finished, self._finished_since_last = tuple(self._finished_since_last), []
        return ScheduledBatch(self._step, tuple(chunks), finished, kv_saves=self._take_saves())

    @staticmethod
    def _cut(seq: Sequence, start: int, n: int) -> int:
        """A prompt chunk of ``n`` tokens from ``start``, cut where a restored prefix ends (a
        chunk's rows are all read from the file or all computed)."""
        if start < seq.restore_tokens:
            return min(n, seq.restore_tokens - start)
        return n

    def _take_saves(self) -> tuple[tuple[int, int, str, str], ...]:
        saves, self._saves = tuple(self._saves), []
        return saves

    def _chunk(self, seq: Sequence, ids: list[int], start: int, sample: bool) -> SeqChunk:
        """The step's slice of ``seq``; the sequence counts it as scheduled from now on."""
        seq.num_scheduled = start + len(ids)
        seq.num_pending += sample
        restored = start < seq.restore_tokens
        if seq.save_prefix is not None and start < seq.save_prefix[2] <= start + len(ids):
            stem, key, tokens = seq.save_prefix  # this step computes the last saved position
            self._saves.append((seq.seq_id, tokens, stem, key))
        return SeqChunk(
            seq_id=seq.seq_id,
            token_ids=tuple(ids),
            start_pos=start,
            block_table=tuple(seq.block_table),
            sample=sample,
            params=seq.params,
            kv_prefix=seq.restore_prefix if restored else None,
            skip_draws=seq.skip_draws if sample and start + len(ids) == len(seq.prompt_ids) else 0,
        )

    def update(self, batch: ScheduledBatch, sampled: dict[int, int]) -> list[Sequence]:
        """Apply a step's results, in the order the steps were scheduled; returns the sequences
        that finished in it. A chunk of a sequence that finished (a stop token learned from the
        step before, which this step was scheduled without) or was aborted after the step was
        scheduled is discarded: its blocks were freed then, and the workers ran it before any
        later step could reuse them."""
        now = time.perf_counter()
        by_id = {s.seq_id: s for s in self.running}
        done: list[Sequence] = []
        for c in batch.chunks:
            seq = by_id.get(c.seq_id)
            if seq is None:
                continue
            seq.num_computed = c.seq_len
            if not c.sample:
                continue
            seq.num_pending -= 1
            if seq.prefill_done_time is None:
                seq.prefill_done_time = now
            seq.status = SeqStatus.DECODING
            seq.append_token(sampled[c.seq_id], now)
            if seq.status is SeqStatus.FINISHED:
                done.append(seq)
        for seq in done:
            self.running.remove(seq)
            self.blocks.free(seq.block_table)
            self._finished_since_last.append(seq.seq_id)
        return done

    def abort(self, seq_id: int) -> bool:
        """Drop one sequence (a cancelled task): free its blocks; the workers hear of it with the
        next batch's ``finished``. Returns whether it was here."""
        for seq in self.running:
            if seq.seq_id == seq_id:
                self.running.remove(seq)
                self.blocks.free(seq.block_table)
                self._finished_since_last.append(seq_id)
                return True
        for seq in self.waiting:
            if seq.seq_id == seq_id:
                self.waiting.remove(seq)
                return True
        return False

    def abort_all(self) -> None:
        for seq in self.running:
            self.blocks.free(seq.block_table)
            self._finished_since_last.append(seq.seq_id)  # workers drop their state
        self.running.clear()
        self.waiting.clear()
