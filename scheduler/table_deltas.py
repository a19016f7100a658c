"""Block tables sent as deltas: each step carries only what changed in a sequence's table.

A sequence's table grows by one block id every ``block_size`` tokens, yet the whole table used to
travel to every worker on every step (2,048 ids per sequence at 32K tokens). The executor's
``TableSender`` remembers the last table it sent for each sequence and replaces a chunk's table
by a ``TableDelta``: keep the first ``keep`` ids of the last table, then append ``append``. The
workers' ``TableStore`` holds the same tables and rebuilds the whole one before the step runs.

A sequence's ``SamplingParams`` never change: they travel with its first chunk only (``None``
on the wire afterwards). Any table change is expressed as a delta, not only growth: a table rewritten by a tier move, a swap, a
preemption or a resume keeps its unchanged prefix (often none) and sends the rest. Both sides
drop a sequence when it appears in a batch's ``finished_seq_ids`` (finished or aborted). The two
sides stay equal as long as every batch the sender encodes reaches the store, in order; a batch
with plain tables (the worker's own warm-up) passes the store untouched.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from scheduler.batch import ScheduledBatch
from scheduler.request import SamplingParams


@dataclass(frozen=True)
class TableDelta:
    """Stands in for ``SeqChunk.block_table`` on the wire: ``last[:keep] + append``."""

    keep: int
    append: tuple[int, ...]

    def __reduce__(self):  # pickled as its two values, without the field names
        return (TableDelta, (self.keep, self.append))


def _common_prefix(old: tuple[int, ...], new: tuple[int, ...]) -> int:
    n = len(old)
    if n <= len(new) and new[:n] == old:  # the usual case: unchanged or grown
        return n
    k = 0
    for a, b in zip(old, new):
        if a != b:
            break
        k += 1
    return k


class TableSender:
    """Driver side: turns each batch's tables into deltas against what was sent before."""

    def __init__(self) -> None:
        self._sent: dict[int, tuple[int, ...]] = {}

    def __len__(self) -> int:
        return len(self._sent)

    def encode(self, batch: ScheduledBatch) -> ScheduledBatch:
        """The batch to send (``batch`` itself is left as it is)."""
        for sid in batch.finished_seq_ids:
            self._sent.pop(sid, None)
        chunks = []
        for c in batch.chunks:
            table = tuple(c.block_table)
            old = self._sent.get(c.seq_id)
            keep = _common_prefix(old, table) if old is not None else 0
            self._sent[c.seq_id] = table
            delta = TableDelta(keep, table[keep:])
            params = c.params if old is None else None  # the store has them from the first
            chunks.append(dataclasses.replace(c, block_table=delta, params=params))
        return dataclasses.replace(batch, chunks=tuple(chunks))


class TableStore:
    """Worker side: the last table of every live sequence; rebuilds whole tables."""

    def __init__(self) -> None:
        self._tables: dict[int, tuple[int, ...]] = {}
        self._params: dict[int, SamplingParams] = {}

    def __len__(self) -> int:
        return len(self._tables)

    def expand(self, batch: ScheduledBatch) -> ScheduledBatch:
        """``batch`` with every ``TableDelta`` replaced by the whole table it stands for."""
        for sid in batch.finished_seq_ids:
            self._tables.pop(sid, None)
            self._params.pop(sid, None)
        if not any(isinstance(c.block_table, TableDelta) for c in batch.chunks):
            return batch
        chunks = []
        for c in batch.chunks:
            d = c.block_table
            if isinstance(d, TableDelta):
                old = self._tables.get(c.seq_id, ())
                if d.keep > len(old):
                    raise RuntimeError(
                        f"block table delta of sequence {c.seq_id} keeps {d.keep} ids of a table "
                        f"of {len(old)}: a step was lost between the driver and this worker"
                    )
                table = old[: d.keep] + d.append if d.keep < len(old) or d.append else old
                self._tables[c.seq_id] = table
                params = c.params
                if params is None:
                    if c.seq_id not in self._params:
                        raise RuntimeError(
                            f"sequence {c.seq_id} came without its sampling parameters, which "
                            "travel with its first chunk: a step was lost between the driver "
                            "and this worker"
                        )
                    params = self._params[c.seq_id]
                else:
                    self._params[c.seq_id] = params
                c = dataclasses.replace(c, block_table=table, params=params)
            chunks.append(c)
        return dataclasses.replace(batch, chunks=tuple(chunks))
