"""KV cache storage in two tiers: device blocks and host blocks, addressed by one global id.

Global block ids ``0 .. D-1`` are device blocks, ``D .. D+H-1`` host blocks (host index
``id - D``); the scheduler decides which is where and guarantees that a host block a step reads
is full and lies before the step's first position; this module owns the memory, the copies
between tiers and the device *staging area*.

Device memory is one tensor for keys and one for values, ``[L*D + 2*S, block_size, Hkv, D]``:
layer ``l``'s pool is rows ``l*D .. (l+1)*D-1`` (``layers[l]``, what the model writes into), and
the last ``2*S`` rows are the staging area, two buffers of ``S`` blocks that host blocks are
copied into before a layer's attention reads them (layer ``l`` uses buffer ``l % 2``, so layer
``l+1``'s copies can run while layer ``l`` computes). A layer's *window* is the view from its
first row to the end: its own blocks keep their ids and staged blocks are further rows of the
same tensor, so one kernel call reads both through one block table.

Memory comes from ``torch.empty``: nothing is zero-filled at start. No kernel reads a slot past a
sequence's length, with one exception: padded rows of captured CUDA-graph decode steps read block
0 at offset 0, so block 0 of every layer is zeroed (finite).
"""

from __future__ import annotations

import torch

from runtime import kv_quant
from runtime.host_pool import HostPool
from scheduler.errors import CapacityError


def bytes_per_block(
    num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
) -> int:
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * num_layers * block_size * num_kv_heads * head_dim * elem


def _runs(
    pairs: list[tuple[int, int]], src_chunk: int | None = None, dst_chunk: int | None = None
) -> list[tuple[int, int, int]]:
    """``(src, dst, n)`` runs of consecutive ``src`` and consecutive ``dst`` in order; a run never
    crosses a multiple of ``src_chunk`` in ``src`` nor of ``dst_chunk`` in ``dst`` (the end of a
    host chunk on the host side)."""
    out: list[list[int]] = []
    for s, d in pairs:
        if out:
            s0, d0, n = out[-1]
            if s == s0 + n and d == d0 + n:
                crosses = (src_chunk is not None and s % src_chunk == 0) or (
                    dst_chunk is not None and d % dst_chunk == 0
                )
                if not crosses:
                    out[-1][2] += 1
                    continue
        out.append([s, d, 1])
    return [(s, d, n) for s, d, n in out]


class KVCache:
    """Device pool of ``num_blocks`` blocks, host pool of ``host_blocks``, staging ``2 x S``."""

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        host_blocks: int = 0,
        host_dtype: str | None = None,
        staging_blocks: int | None = None,
        pin_in_background: bool = True,
    ) -> None:
        device = torch.device(device)
        self.num_layers = num_layers
        self.num_blocks = num_blocks  # device blocks (D)
        self.host_blocks = host_blocks  # H
        self.block_size = block_size
        self.dtype = dtype
        self.device = device
        self.staging_blocks = (
            min(host_blocks, staging_blocks) if staging_blocks is not None else host_blocks
        )
        rows = num_layers * num_blocks + 2 * self.staging_blocks
        shape = (rows, block_size, num_kv_heads, head_dim)
        try:
            self.k_all = torch.empty(shape, dtype=dtype, device=device)
            self.v_all = torch.empty(shape, dtype=dtype, device=device)
        except torch.OutOfMemoryError as e:
            need = bytes_per_block(num_layers, block_size, num_kv_heads, head_dim, dtype)
            raise CapacityError(
                f"cannot allocate a KV cache of {num_blocks} blocks "
                f"({num_blocks * need / 2**30:.2f} GiB) on {device}; ask for fewer tokens"
            ) from e
        d = num_blocks
        # padded CUDA-graph rows read block 0: keep it finite in every layer
        self.k_all[0 : num_layers * d : d].zero_()
        self.v_all[0 : num_layers * d : d].zero_()
        self.layers = [
            (self.k_all[i * d : (i + 1) * d], self.v_all[i * d : (i + 1) * d])
            for i in range(num_layers)
        ]
        self.host_storage, self.quant = kv_quant.resolve_host_dtype(host_dtype, dtype)
        self.host: HostPool | None = None
        if host_blocks:
            self.host = HostPool(
                host_blocks,
                num_layers,
                (block_size, num_kv_heads, head_dim),
                self.host_storage,
                pin=device.type == "cuda",
                scaled=self.quant is not None,
                background=pin_in_background and device.type == "cuda",
            )
        host_elem = torch.empty((), dtype=self.host_storage).element_size()
        per = block_size * num_kv_heads * head_dim
        # bytes one block of one layer (K and V) takes on the link, scales included
        self.host_layer_block_bytes = 2 * per * host_elem + (8 if self.quant else 0)
        self.device_layer_block_bytes = 2 * per * torch.empty((), dtype=dtype).element_size()

    # -- where things are ------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        """Device bytes of the pools and the staging area."""
        return self.k_all.nbytes + self.v_all.nbytes

    @property
    def host_nbytes(self) -> int:
        return self.host.nbytes if self.host else 0

    def is_host(self, block_id: int) -> bool:
        return block_id >= self.num_blocks

    def window(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``layer``'s blocks followed by every later row (later layers, staging)."""
        start = layer * self.num_blocks
        return self.k_all[start:], self.v_all[start:]

    def staging_offset(self, layer: int) -> int:
        """Row, within ``window(layer)``, of the first block of this layer's staging buffer."""
        return (self.num_layers - layer) * self.num_blocks + (layer % 2) * self.staging_blocks

    def _host_rows(self, layer: int, kind: int, host_index: int, n: int) -> torch.Tensor:
        chunk, row = self.host.locate(host_index)
        return self.host.chunk(chunk)[layer, kind, row : row + n]

    def _host_scales(self, layer: int, kind: int, host_index: int, n: int) -> torch.Tensor:
        chunk, row = self.host.locate(host_index)
        return self.host.scales(chunk)[layer, kind, row : row + n]

    # -- movement (the caller picks the stream) ----------------------------------------------
    def _to_host(self, layer: int, src: int, dst_host: int, n: int) -> None:
        for kind, pool in enumerate(self.layers[layer]):
            x = pool[src : src + n]
            dst = self._host_rows(layer, kind, dst_host, n)
            if self.quant:
                q, scale = kv_quant.quantize(x, self.quant)
                dst.copy_(q, non_blocking=True)
                self._host_scales(layer, kind, dst_host, n).copy_(scale, non_blocking=True)
            else:
                dst.copy_(x if x.dtype == dst.dtype else x.to(dst.dtype), non_blocking=True)

    def _from_host(self, layer: int, src_host: int, dst: torch.Tensor, kind: int) -> None:
        """Host blocks ``src_host ..`` (one layer, K or V) into the device rows ``dst``."""
        n = dst.shape[0]
        x = self._host_rows(layer, kind, src_host, n)
        if self.quant:
            q = x.to(self.device, non_blocking=True)
            scale = self._host_scales(layer, kind, src_host, n).to(self.device, non_blocking=True)
            dst.copy_(kv_quant.dequantize(q, scale, self.quant, self.dtype))
        elif x.dtype == dst.dtype:
            dst.copy_(x, non_blocking=True)
        else:
            dst.copy_(x.to(self.device, non_blocking=True))

    def plan_copies(self, pairs: list[tuple[int, int]]) -> list[tuple]:
        """Turn block copies ``(src_id, dst_id)`` (global ids, any tiers, in order) into the
        operations ``copy_blocks`` runs: consecutive cross-tier copies coalesce into runs (their
        sources and destinations cannot overlap); same-tier copies stay one by one, in order.
        Made once per step, used for every layer."""
        d = self.num_blocks
        chunk = self.host.chunk_blocks if self.host else None
        ops: list[tuple] = []
        i = 0
        while i < len(pairs):
            direction = (pairs[i][0] >= d, pairs[i][1] >= d)
            j = i
            while j < len(pairs) and (pairs[j][0] >= d, pairs[j][1] >= d) == direction:
                j += 1
            group = pairs[i:j]
            i = j
            src_host, dst_host = direction
            if src_host == dst_host:
                ops.append(("host-host" if src_host else "device-device", group))
                continue
            local = [(s - d if src_host else s, t - d if dst_host else t) for s, t in group]
            runs = _runs(local, chunk if src_host else None, chunk if dst_host else None)
            ops.append(("to-host" if dst_host else "from-host", runs))
        return ops

    def copy_blocks(self, layer: int, pairs: list[tuple[int, int]], plan=None) -> int:
        """Perform block copies ``(src_id, dst_id)`` (global ids, any tiers) for one layer, in
        order (``plan``: ``plan_copies(pairs)``, made once); returns the bytes that crossed
        between tiers."""
        moved = 0
        for kind, what in plan if plan is not None else self.plan_copies(pairs):
            if kind == "host-host":
                self._host_to_host(layer, what)
            elif kind == "device-device":
                for s, t in what:
                    for pool in self.layers[layer]:
                        pool[t].copy_(pool[s])
            else:
                for s, t, n in what:
                    if kind == "to-host":
                        self._to_host(layer, s, t, n)
                    else:
                        for i, pool in enumerate(self.layers[layer]):
                            self._from_host(layer, s, pool[t : t + n], i)
                    moved += n * self.host_layer_block_bytes
        return moved

    def _host_to_host(self, layer: int, group: list[tuple[int, int]]) -> None:
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()  # pending spills land first
        d = self.num_blocks
        for s, t in group:
            for kind in (0, 1):
                self._host_rows(layer, kind, t - d, 1).copy_(self._host_rows(layer, kind, s - d, 1))
                if self.quant:
                    self._host_scales(layer, kind, t - d, 1).copy_(
                        self._host_scales(layer, kind, s - d, 1)
                    )

    def host_runs(self, ids: list[int]) -> list[tuple[int, int, int]]:
        """``(host_index, position, n)``: runs of the host blocks among ``ids`` (global ids, in
        this order) that are consecutive in one host chunk, each at its position in ``ids``;
        one copy (or one in-place read) per run. Device ids among them (staged by
        ``stage_device``) are skipped."""
        d = self.num_blocks
        pairs = [(h - d, i) for i, h in enumerate(ids) if h >= d]
        return _runs(pairs, src_chunk=self.host.chunk_blocks)

    def stage(self, layer: int, host_ids: list[int], runs=None, slot0: int = 0) -> int:
        """Copy host blocks (global ids) into slots ``slot0..`` of this layer's staging buffer
        (``runs``: ``host_runs(host_ids)``, made once; device ids among them are skipped);
        returns the bytes moved."""
        if slot0 + len(host_ids) > self.staging_blocks:
            raise ValueError(
                f"{len(host_ids)} blocks from slot {slot0} exceed the staging area of "
                f"{self.staging_blocks}"
            )
        base = self.num_layers * self.num_blocks + (layer % 2) * self.staging_blocks + slot0
        runs = runs if runs is not None else self.host_runs(host_ids)
        for s, t, n in runs:
            self._from_host(layer, s, self.k_all[base + t : base + t + n], 0)
            self._from_host(layer, s, self.v_all[base + t : base + t + n], 1)
        return sum(n for _, _, n in runs) * self.host_layer_block_bytes

    def stage_device(self, layer: int, slots: torch.Tensor, ids: torch.Tensor) -> None:
        """Copy this layer's device blocks ``ids`` into slots ``slots`` of its staging buffer
        (both int64 on the device): device blocks that share a key tile with staged host
        blocks, so that the tile reads as consecutive rows (``runtime.spill_step``)."""
        base = self.num_layers * self.num_blocks + (layer % 2) * self.staging_blocks
        for kind, pool in enumerate(self.layers[layer]):
            dst = self.k_all if kind == 0 else self.v_all
            dst.index_copy_(0, slots + base, pool.index_select(0, ids))

    def host_kv(
        self, layer: int, host_ids: list[int], runs=None
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Keys and values of host blocks (global ids) of one layer, on the host, as segments
        ``[n_i * block_size, Hkv, D]`` (one per run of consecutive host rows: views of the pool,
        no copy; dequantised copies for 8-bit host dtypes)."""
        parts: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
        for s, _, n in runs if runs is not None else self.host_runs(host_ids):
            for kind in (0, 1):
                x = self._host_rows(layer, kind, s, n)
                if self.quant:
                    scale = self._host_scales(layer, kind, s, n)
                    x = kv_quant.dequantize(x, scale, self.quant, self.dtype)
                parts[kind].append(x.reshape(-1, *x.shape[2:]))
        return parts

    def wait_host_ready(
        self, timeout: float | None = None, *, everything: bool = False, blocks: int | None = None
    ) -> bool:
        """Wait up to ``timeout`` for the host tier's background pinning (of the chunks ahead of
        use, of the first ``blocks`` host blocks, or of ``everything``); whether it is done."""
        if self.host is None:
            return True
        if everything:
            self.host.pin_all()
        elif blocks is not None:
            self.host.pin_first(blocks)
        return self.host.wait_allocated(timeout)

    def close(self) -> None:
        if self.host is not None:
            self.host.close()
