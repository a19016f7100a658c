"""What one engine step asks every worker to do: plain data, cheap to send once per step."""

from __future__ import annotations

from dataclasses import dataclass

from scheduler.request import SamplingParams


@dataclass(frozen=True)
class SeqChunk:
    """A slice of one sequence's tokens to run this step.

    ``token_ids`` sit at positions ``start_pos .. start_pos + len - 1``; after the step the cache
    holds ``start_pos + len`` tokens of this sequence. ``sample`` is true when the step's last
    token yields the sequence's next token (the prompt's last chunk, or any decode step).
    """

    seq_id: int
    token_ids: tuple[int, ...]
    start_pos: int
    # the whole table; on the wire to a worker a ``table_deltas.TableDelta`` stands in for it
    block_table: tuple[int, ...]
    sample: bool
    params: SamplingParams  # on the wire to a worker: with a sequence's first chunk only
    # a restored sequence's chunk: its rows come from this KV prefix file (the stem; each rank
    # reads its own, ``runtime.kv_prefix``) instead of being computed; such a chunk never samples
    kv_prefix: str | None = None
    # a resumed sequence's first sampling chunk: the draws its seeded sampler made before (the
    # tokens it had generated, now part of its prompt), for the worker to skip
    skip_draws: int = 0

    @property
    def seq_len(self) -> int:
        return self.start_pos + len(self.token_ids)


@dataclass(frozen=True)
class ScheduledBatch:
    step: int
    chunks: tuple[SeqChunk, ...]
    finished_seq_ids: tuple[int, ...] = ()  # workers drop per-sequence state for these
    # block copies (src_id, dst_id) in global ids (device 0..D-1, host D..D+H-1) every worker
    # performs in order, for every layer, before the step's computation (spill, fetch, resume)
    swaps: tuple[tuple[int, int], ...] = ()
    # after the step, each worker writes these sequences' prompt KV to disk: (seq_id, tokens,
    # file stem, key), for a later attempt to restore (``runtime.kv_prefix``)
    kv_saves: tuple[tuple[int, int, str, str], ...] = ()

    @property
    def num_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.chunks)
