"""The contract every attention backend keeps.

Layout (shared by all backends, see docs/architecture.md):

* queries of one step are *packed*: ``q`` is ``[T, Hq, D]`` where ``T`` is the sum of the query
  lengths of the sequences in the batch; ``query_start_loc`` (``[B+1]``) gives each sequence's slice.
* the KV cache of one layer is two tensors ``k_cache``/``v_cache`` of shape
  ``[num_blocks, block_size, Hkv, D]``; sequence ``b``'s key at position ``p`` lives in block
  ``block_tables[b, p // block_size]`` at offset ``p % block_size``. Blocks need not be contiguous
  nor ordered.
* ``seq_lens[b]`` is the number of keys sequence ``b`` has *after* this step's keys were written, so
  query ``i`` of sequence ``b`` sits at position ``seq_lens[b] - query_len[b] + i`` and, causally,
  sees keys at positions ``<=`` its own.
* every backend returns ``(out, lse)``: ``out`` is ``[T, Hq, D]`` in ``q``'s dtype and ``lse`` is
  the float32 natural-log sum of ``exp(scale * q.k)`` over the keys seen, ``[T, Hq]``. Partial
  results over disjoint key sets (device blocks, host blocks) merge exactly through ``lse``.

Captured decode (CUDA graphs, ``runtime/cuda_graphs.py``): a decode step captured once is replayed
with other lengths, so nothing the backend reads on the host may change between replays. Such a
step's metadata has ``seq_lens_cpu = None`` and a :class:`CapturedDecode`: launches are sized for
``capacity`` keys, and whatever a launch would derive from the real lengths is read on the
device from ``captured.params``, which every replay refreshes with the backend's
:meth:`AttentionBackend.captured_decode_values`. A backend opts in by declaring how many such
values it reads (``captured_decode_params > 0``); the others never see a captured step.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch


@dataclass(frozen=True)
class CapturedDecode:
    """What a decode step captured in a CUDA graph tells the backend instead of host lengths.

    Attributes:
        capacity: the longest sequence any replay may hold; launches are sized for it.
        params: int32 ``[backend.captured_decode_params]`` on the device: the launch values for
            the real lengths (``captured_decode_values``), rewritten before every replay.
    """

    capacity: int
    params: torch.Tensor


@dataclass
class AttentionMetadata:
    """Per-step batch description, built once per step and shared by every layer."""

    query_start_loc: torch.Tensor  # int32 [B+1], on the compute device
    seq_lens: torch.Tensor  # int32 [B], on the compute device
    block_tables: torch.Tensor  # int32 [B, max_blocks_per_seq], on the compute device
    slot_mapping: torch.Tensor  # int64 [T]: flat cache slot (block * block_size + offset) per token
    query_lens_cpu: tuple[int, ...]
    seq_lens_cpu: tuple[int, ...] | None  # None in a captured step: lengths live on the device
    captured: CapturedDecode | None = None  # set only for a decode step captured in a CUDA graph
    # a step over host-resident KV blocks (runtime.spill_step.SpillStep): the attention layer
    # hands its KV write and attention to it; None on all-device steps
    spill: Any = None

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens_cpu)

    @property
    def max_query_len(self) -> int:
        return max(self.query_lens_cpu) if self.query_lens_cpu else 0

    @property
    def max_seq_len(self) -> int:
        """The longest sequence: exact in an eager step, the capacity in a captured one."""
        if self.captured is not None:
            return self.captured.capacity
        return max(self.seq_lens_cpu) if self.seq_lens_cpu else 0

    @property
    def is_decode(self) -> bool:
        """True when every sequence contributes exactly one query token."""
        return all(n == 1 for n in self.query_lens_cpu)

    @staticmethod
    def build(
        query_lens: list[int] | tuple[int, ...],
        seq_lens: list[int] | tuple[int, ...],
        block_tables: list[list[int]],
        block_size: int,
        device: torch.device | str = "cpu",
    ) -> AttentionMetadata:
        """Build metadata from plain Python lists (the scheduler's output)."""
        if len(query_lens) != len(seq_lens) or len(seq_lens) != len(block_tables):
            raise ValueError("query_lens, seq_lens and block_tables must describe the same batch")
        starts = [0]
        slots: list[int] = []
        for qlen, slen, table in zip(query_lens, seq_lens, block_tables):
            if qlen < 1 or qlen > slen:
                raise ValueError(f"query length {qlen} must be in [1, seq_len={slen}]")
            if len(table) * block_size < slen:
                raise ValueError(
                    f"block table of {len(table)} blocks holds {len(table) * block_size} tokens, "
                    f"fewer than seq_len={slen}"
                )
            starts.append(starts[-1] + qlen)
            for pos in range(slen - qlen, slen):
                slots.append(table[pos // block_size] * block_size + pos % block_size)
        width = max((len(t) for t in block_tables), default=0)
        padded = [list(t) + [0] * (width - len(t)) for t in block_tables]
        dev = torch.device(device)
        return AttentionMetadata(
            query_start_loc=torch.tensor(starts, dtype=torch.int32, device=dev),
            seq_lens=torch.tensor(list(seq_lens), dtype=torch.int32, device=dev),
            block_tables=torch.tensor(padded, dtype=torch.int32, device=dev).reshape(
                len(block_tables), width
            ),
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            query_lens_cpu=tuple(int(x) for x in query_lens),
            seq_lens_cpu=tuple(int(x) for x in seq_lens),
        )


def gqa_group(hq: int, hkv: int) -> int:
    """Query heads per key/value head; a count that does not divide is refused."""
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({hkv})")
    return hq // hkv


class AttentionBackend(ABC):
    """A named attention implementation over the paged KV layout described above."""

    name: ClassVar[str]
    #: How many int32 launch values a captured decode step reads from ``CapturedDecode.params``;
    #: 0 means this backend cannot run a decode step captured in a CUDA graph.
    captured_decode_params: ClassVar[int] = 0

    @classmethod
    def supports(cls, device: torch.device) -> str | None:
        """Return ``None`` if this backend runs on ``device``, else the reason it does not."""
        return None

    def captured_decode_values(
        self,
        num_seqs: int,
        max_seq_len: int,
        capacity: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> tuple[int, ...]:
        """The ``captured_decode_params`` values one replay of a captured decode step needs:
        ``num_seqs`` rows (padding included), the longest ``max_seq_len`` keys, launches sized
        for ``capacity`` keys. Only called when ``captured_decode_params > 0``."""
        raise NotImplementedError(f"attention backend {self.name!r} has no captured decode")

    def write_kv(
        self,
        key: torch.Tensor,
        value: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> None:
        """Store this step's keys/values ``[T, Hkv, D]`` into their cache slots."""
        nb, bs, h, d = k_cache.shape
        if key.dtype != k_cache.dtype:
            key, value = key.to(k_cache.dtype), value.to(v_cache.dtype)
        k_cache.view(nb * bs, h, d).index_copy_(0, slot_mapping, key)
        v_cache.view(nb * bs, h, d).index_copy_(0, slot_mapping, value)

    @abstractmethod
    def prefill(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Causal attention for packed queries of any lengths; returns ``(out, lse)``."""

    def decode(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One query token per sequence; defaults to the prefill path."""
        return self.prefill(q, k_cache, v_cache, meta, scale)

    def forward(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if meta.captured is not None and not self.captured_decode_params:
            raise ValueError(f"attention backend {self.name!r} cannot run a captured decode step")
        if meta.is_decode:
            return self.decode(q, k_cache, v_cache, meta, scale)
        return self.prefill(q, k_cache, v_cache, meta, scale)
