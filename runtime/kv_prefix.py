"""A sequence's KV prefix on disk: what lets a task whose worker died skip the prefill it did.

When a task's prompt has been prefilled, each rank writes the keys and values of the prompt's
positions (its own KV heads) to one safetensors file: ``k.<layer>`` and ``v.<layer>``, each
``[tokens, kv_heads, head_dim]`` in the cache's dtype (host blocks dequantised), and metadata
that says what they belong to (``layout``) and which prompt (``key``). A later attempt of the
task, on new workers, reads the rows back into the blocks its prefill chunks would have written
(``PrefixReader.write_rows``) instead of computing them.

The file is written as it is gathered, one tensor at a time (a 128K-token prompt of an 8B model
is 16 GiB: never all in memory), to a temporary name renamed at the end, so a file that exists
is whole. Reading uses ``safe_open`` (never pickle), one slice per layer and kind.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open

from runtime.kv_cache import KVCache
from scheduler.errors import TilerunError

FORMAT = "tilerun-kv-prefix-1"
_DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}


class PrefixReadError(TilerunError, RuntimeError):
    """A worker could not read a prefix file into its cache; the message names the file."""


def layout(kv: KVCache, rank: int, tp: int) -> dict[str, str]:
    """What a file must match to be read into ``kv`` (every value a string, as safetensors'
    metadata is)."""
    shape = kv.layers[0][0].shape  # [blocks, block_size, kv_heads, head_dim]
    return {
        "format": FORMAT,
        "dtype": _DTYPES[kv.dtype],
        "layers": str(kv.num_layers),
        "kv_heads": str(shape[2]),
        "head_dim": str(shape[3]),
        "rank": str(rank),
        "tp": str(tp),
    }


def rank_path(stem: str | Path, rank: int) -> Path:
    """The file of ``rank`` for the checkpoint named ``stem`` (a path without suffix)."""
    return Path(f"{stem}.rank{rank}.safetensors")


def _block_rows(kv: KVCache, layer: int, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V rows of blocks ``ids`` (global ids, either tier) of one layer, on the host in the
    cache's dtype, each ``[len(ids) * block_size, kv_heads, head_dim]``: device blocks gathered
    in one copy, host blocks read run by run as attention reads them (``KVCache.host_kv``)."""
    shape = (len(ids), *kv.layers[layer][0].shape[1:])
    out = (torch.empty(shape, dtype=kv.dtype), torch.empty(shape, dtype=kv.dtype))
    dev = [i for i, b in enumerate(ids) if b < kv.num_blocks]
    if dev:
        src = torch.tensor([ids[i] for i in dev], dtype=torch.long, device=kv.device)
        at = torch.tensor(dev)
        for kind in (0, 1):
            out[kind][at] = kv.layers[layer][kind].index_select(0, src).cpu()
    if len(dev) < len(ids):
        runs = kv.host_runs(ids)
        parts = kv.host_kv(layer, ids, runs)
        for kind in (0, 1):
            for (_, pos, n), x in zip(runs, parts[kind]):
                out[kind][pos : pos + n] = x.reshape(n, *shape[1:])
    return out[0].view(-1, *shape[2:]), out[1].view(-1, *shape[2:])


KEEP_FREE_BYTES = 2 << 30  # a save never leaves the disk with less (the task store lives there)


def save(
    kv: KVCache,
    table: list[int],
    tokens: int,
    stem: str | Path,
    meta: dict[str, str],
    keep_free: int = KEEP_FREE_BYTES,
) -> Path:
    """Write positions ``0 .. tokens-1`` of the sequence whose block table is ``table`` to
    ``rank_path(stem, rank)`` (``meta`` holds ``layout`` and the caller's ``key``); returns
    the file. Raises ``OSError`` where the file would leave less than ``keep_free`` bytes free
    on its disk (nothing written)."""
    path = rank_path(stem, int(meta["rank"]))
    nblocks = -(-tokens // kv.block_size)
    if len(table) < nblocks:
        raise ValueError(f"a table of {len(table)} blocks does not hold {tokens} tokens")
    if kv.device.type == "cuda":  # this step's spills (any stream) land in host memory first
        torch.cuda.synchronize(kv.device)
    heads, dim = kv.layers[0][0].shape[2:]
    item = torch.empty((), dtype=kv.dtype).element_size()
    nbytes = tokens * heads * dim * item
    names = [f"{kind}.{layer}" for layer in range(kv.num_layers) for kind in ("k", "v")]
    header: dict = {
        name: {
            "dtype": _DTYPES[kv.dtype],
            "shape": [tokens, heads, dim],
            "data_offsets": [i * nbytes, (i + 1) * nbytes],
        }
        for i, name in enumerate(names)
    }
    header["__metadata__"] = {**{k: str(v) for k, v in meta.items()}, "tokens": str(tokens)}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    path.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(path.parent).free
    if free - 8 - len(raw) - len(names) * nbytes < keep_free:
        raise OSError(
            f"{path.parent} has {free / 2**30:.1f} GiB free; a KV prefix of "
            f"{len(names) * nbytes / 2**30:.1f} GiB would leave less than "
            f"{keep_free / 2**30:.1f} GiB"
        )
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(len(raw).to_bytes(8, "little"))
            f.write(raw)
            for layer in range(kv.num_layers):
                for rows in _block_rows(kv, layer, list(table[:nblocks])):
                    f.write(rows[:tokens].contiguous().view(torch.uint8).numpy().data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def read_meta(path: str | Path) -> dict[str, str] | None:
    """The metadata of a prefix file, or None if it is missing or unreadable."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception:  # noqa: BLE001 - a missing, truncated or foreign file is no checkpoint
        return None


class PrefixReader:
    """One prefix file, open for reading rows into a cache (a restored sequence's chunks)."""

    def __init__(self, path: str | Path, expect: dict[str, str]) -> None:
        """Opens ``path`` and checks that its metadata holds every item of ``expect``."""
        self.path = Path(path)
        self._f = safe_open(str(self.path), framework="pt")
        meta = dict(self._f.metadata() or {})
        wrong = {k: (meta.get(k), v) for k, v in expect.items() if meta.get(k) != v}
        if wrong:
            raise ValueError(f"KV prefix {self.path} does not match (found, expected): {wrong}")
        self.tokens = int(meta["tokens"])
        # the header's shapes, checked before a row is written: a file whose metadata is right
        # but whose tensors are not (damaged, or written by other code) never reaches a cache
        want = [self.tokens, int(meta["kv_heads"]), int(meta["head_dim"])]
        names = set(self._f.keys())
        for layer in range(int(meta["layers"])):
            for name in (f"k.{layer}", f"v.{layer}"):
                got = self._f.get_slice(name).get_shape() if name in names else None
                if got != want:
                    raise ValueError(f"KV prefix {self.path}: {name} is {got}, not {want}")

    def write_rows(self, kv: KVCache, table: tuple[int, ...], start: int, end: int) -> None:
        """Positions ``start .. end-1`` from the file into the sequence's device blocks (those
        of ``table`` that hold them); every such block must be a device block."""
        if end > self.tokens:
            raise ValueError(f"{self.path} holds {self.tokens} tokens, not {end}")
        bs = kv.block_size
        blocks = table[start // bs : -(-end // bs)]
        if any(b >= kv.num_blocks for b in blocks):
            raise ValueError("restored rows must go to device blocks")
        pos = torch.arange(start, end)
        ids = torch.tensor(table, dtype=torch.long)[pos // bs] * bs + pos % bs
        ids = ids.to(kv.device)
        for layer in range(kv.num_layers):
            for kind, name in enumerate(("k", "v")):
                rows = self._f.get_slice(f"{name}.{layer}")[start:end]
                pool = kv.layers[layer][kind]
                flat = pool.view(-1, *pool.shape[2:])
                flat.index_copy_(0, ids, rows.to(kv.device, kv.dtype))
