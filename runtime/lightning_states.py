"""Per-sequence lightning-attention states: one ``[H, D, E]`` float32 state per sequence and
lightning layer, in slots of one tensor per layer (the lightning counterpart of the KV cache).

A sequence takes a slot at its first step and keeps it until it finishes; a step whose chunk
starts at position 0 (a new sequence, or one recomputed from scratch after preemption) starts
from a zero state. The worker tells the store which sequences a step holds (:meth:`bind`) and
which finished (:meth:`release`); the model's lightning layers gather their step's states,
advance them and write them back (:meth:`gather`, :meth:`scatter`).
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
        shape = (num_slots, num_heads, key_dim, value_dim)
        self.layers = [
            torch.zeros(shape, dtype=torch.float32, device=device) for _ in range(num_layers)
        ]
        self._free = list(range(num_slots - 1, -1, -1))
        self._slot: dict[int, int] = {}
        self.step_slots: torch.Tensor | None = None

    def bind(self, seq_ids: list[int], start_positions: list[int]) -> None:
        """The step's sequences in order and where each chunk starts: slots for new sequences,
        zero states for chunks at position 0."""
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
        self.step_slots = torch.tensor(slots, dtype=torch.long, device=device)

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
