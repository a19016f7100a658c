"""Per-sequence lightning-attention states: one ``[H, D, E]`` float32 state per sequence and
lightning layer, in slots of one tensor per layer (the lightning counterpart of the KV cache).

A sequence takes a slot at its first step and keeps it until it finishes; a step whose chunk
starts at position 0 (a new sequence, or one recomputed from scratch after preemption) starts
from a zero state. The worker tells the store which sequences a step holds (:meth:`bind`) and
which finished (:meth:`release`); the model's lightning layers gather their step's states,
advance them and write them back (:meth:`gather`, :meth:`scatter`).

A CUDA graph of a decode step reads the step's slots from one static buffer
(:meth:`reserve_graph_rows`; ``bind(..., rows=bucket)`` fills it); the bucket's padding rows
read and write a scratch slot that no sequence holds.
"""

from __future__ import annotations

import torch


class LightningStates:
    def __init__(
        self,
        num_layers: int,
        num_slots: int,
        num_heads: int,
        key_dim: int,
        value_dim: int,
        device: torch.device,
    ) -> None:
        # one slot more than asked: the scratch slot of a graph's padding rows
        shape = (num_slots + 1, num_heads, key_dim, value_dim)
        self.layers = [
            torch.zeros(shape, dtype=torch.float32, device=device) for _ in range(num_layers)
        ]
        self.scratch = num_slots
        self._free = list(range(num_slots - 1, -1, -1))
        self._slot: dict[int, int] = {}
        self.step_slots: torch.Tensor | None = None
        self._graph_slots: torch.Tensor | None = None

    def reserve_graph_rows(self, rows: int) -> None:
        """The static slot buffer CUDA graphs of up to ``rows`` sequences read."""
        if self._graph_slots is None or self._graph_slots.numel() < rows:
            device = self.layers[0].device if self.layers else None
            self._graph_slots = torch.full((rows,), self.scratch, dtype=torch.long, device=device)

    def bind(self, seq_ids: list[int], start_positions: list[int], rows: int | None = None) -> None:
        """The step's sequences in order and where each chunk starts: slots for new sequences,
        zero states for chunks at position 0. ``rows`` (a graph's bucket): the slots go into
        the static buffer, padded with the scratch slot to ``rows``."""
        slots, fresh = [], []
        for sid, start in zip(seq_ids, start_positions):
            slot = self._slot.get(sid)
            if slot is None:
                if not self._free:
                    raise RuntimeError(
                        f"lightning states: no free slot for sequence {sid} "
                        f"({len(self._slot)} sequences hold one); raise max_num_seqs"
                    )
                slot = self._slot[sid] = self._free.pop()
            slots.append(slot)
            if start == 0:
                fresh.append(slot)
        device = self.layers[0].device if self.layers else None
        if fresh:
            idx = torch.tensor(fresh, dtype=torch.long, device=device)
            for t in self.layers:
                t.index_fill_(0, idx, 0.0)
        if rows is None:
            self.step_slots = torch.tensor(slots, dtype=torch.long, device=device)
            return
        if self._graph_slots is None or rows > self._graph_slots.numel():
            raise RuntimeError(f"lightning states: {rows} graph rows, reserved fewer")
        padded = torch.tensor(slots + [self.scratch] * (rows - len(slots)), dtype=torch.long)
        self.step_slots = self._graph_slots[:rows]
        self.step_slots.copy_(padded, non_blocking=True)

    def release(self, seq_ids) -> None:
        for sid in seq_ids:
            slot = self._slot.pop(sid, None)
            if slot is not None:
                self._free.append(slot)

    def gather(self, layer: int) -> torch.Tensor:
        """This step's states of lightning layer ``layer`` (a copy, ``[N, H, D, E]``)."""
        return self.layers[layer].index_select(0, self.step_slots)

    def scatter(self, layer: int, states: torch.Tensor) -> None:
        self.layers[layer].index_copy_(0, self.step_slots, states)
