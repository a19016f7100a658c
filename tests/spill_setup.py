"""Shared set-up of the two-tier KV tests (``test_kv_spill`` on CPU, ``test_gpu_spill`` on CUDA,
and the GPU request scripts that run without pytest): a cache holding random KV at a seeded
random placement, and one step over all its layers through ``SpillStep``, each layer's output
beside the float64 reference and the same backend over an all-device cache.

Placements follow the scheduler's invariant: every full block before a sequence's first query
position may be on the host; the rest are on the device at shuffled ids. Host blocks arrive by
the step's own swaps (from scratch device blocks) unless ``land_swaps`` ran them earlier.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from runtime.attention.base import AttentionMetadata
from runtime.attention.reference import reference_attention
from runtime.kv_cache import KVCache
from runtime.spill_step import SpillFigures, SpillStep
from scheduler.batch import SeqChunk
from scheduler.request import SamplingParams

PARAMS = SamplingParams(max_new_tokens=1)


@dataclass
class SpillCase:
    kv: KVCache
    content: torch.Tensor  # [layers, 2, logical blocks, bs, Hkv, D], on the CPU
    tables: list[list[int]]  # global ids, mixed tiers
    ref_tables: list[list[int]]  # logical block ids into ``content``
    swaps: tuple[tuple[int, int], ...]  # what brings the host blocks in
    query_lens: list[int]
    seq_lens: list[int]
    hq: int
    d: int

    def land_swaps(self) -> None:
        """Perform the swaps now (an earlier step's), so the step itself has none."""
        for layer in range(self.kv.num_layers):
            self.kv.copy_blocks(layer, list(self.swaps))
        self.swaps = ()

    def host_blocks_per_seq(self) -> list[int]:
        bs, d = self.kv.block_size, self.kv.num_blocks
        return [
            sum(1 for b in t[: -(-s // bs)] if b >= d) for t, s in zip(self.tables, self.seq_lens)
        ]


def build(
    query_lens,
    seq_lens,
    *,
    bs,
    hq,
    hkv,
    d,
    layers=2,
    seed=0,
    p_host=0.6,
    staging=None,
    host_dtype=None,
    spare=3,
    device="cpu",
    dtype=torch.float32,
    placement=None,
    in_order=False,
) -> SpillCase:
    """A two-tier cache holding random KV at a random placement, and the same KV all-device.
    ``placement``: ``"dev"``/``"host"`` per logical block (all sequences), instead of random;
    ``in_order``: device and host ids in table order (as the scheduler hands out a long
    prompt's blocks), instead of shuffled."""
    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    counts = [-(-s // bs) for s in seq_lens]
    total = sum(counts)
    content = torch.randn(layers, 2, total, bs, hkv, d, generator=g).to(dtype)
    if placement is None:
        placement = []  # per logical block: "dev" | "host"
        for qlen, slen, n in zip(query_lens, seq_lens, counts):
            start = slen - qlen
            for i in range(n):
                host = (i + 1) * bs <= start and rng.random() < p_host
                placement.append("host" if host else "dev")
    n_dev = placement.count("dev")
    n_host = placement.count("host")
    D = n_dev + spare + n_host  # room for scratch blocks the host contents pass through
    H = n_host + spare
    kv = KVCache(
        layers, D, bs, hkv, d, dtype, torch.device(device), host_blocks=H,
        host_dtype=host_dtype, staging_blocks=staging, pin_in_background=False,
    )  # fmt: skip
    for t in (kv.k_all, kv.v_all):
        t.fill_(float("nan"))  # unused memory must never be read
    if in_order:
        dev_ids, host_ids = iter(range(n_dev)), iter(range(D, D + n_host))
    else:
        dev_ids = iter(rng.sample(range(D - n_host), n_dev))
        host_ids = iter([D + h for h in rng.sample(range(H), n_host)])
    scratch = iter(range(D - n_host, D))
    global_ids, swaps = [], []
    for i, where in enumerate(placement):
        # a device block holds its contents; a host block's pass through a scratch device block
        b = next(dev_ids) if where == "dev" else next(host_ids)
        at = b if where == "dev" else next(scratch)
        for li in range(layers):
            kv.layers[li][0][at] = content[li, 0, i]
            kv.layers[li][1][at] = content[li, 1, i]
        if where == "host":
            swaps.append((at, b))
        global_ids.append(b)
    tables, ref_tables, k = [], [], 0
    for n in counts:
        tables.append(global_ids[k : k + n])
        ref_tables.append(list(range(k, k + n)))
        k += n
    return SpillCase(
        kv, content, tables, ref_tables, tuple(swaps), list(query_lens), list(seq_lens), hq, d
    )


def run_step(
    case: SpillCase, backend, fraction: float, *, seed: int = 1, cpu_method: str = "fused"
) -> tuple[SpillFigures, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]:
    """All layers of one step through SpillStep (with ``case.swaps``, CPU share ``fraction``);
    returns the step's figures and, per layer, ``(out, float64 reference, the same backend over
    an all-device cache)``."""
    g = torch.Generator().manual_seed(seed)
    kv, hq, d = case.kv, case.hq, case.d
    query_lens, seq_lens = case.query_lens, case.seq_lens
    bs = kv.block_size
    dev = kv.device
    chunks = [
        SeqChunk(b, (0,) * q, s - q, tuple(t), False, PARAMS)
        for b, (q, s, t) in enumerate(zip(query_lens, seq_lens, case.tables))
    ]
    step = SpillStep(kv, chunks, case.swaps, cpu_fraction=fraction, cpu_method=cpu_method)
    meta = AttentionMetadata.build(query_lens, step.seq_lens, step.tables, bs, dev)
    step.bind(meta)
    ref_meta = AttentionMetadata.build(query_lens, seq_lens, case.ref_tables, bs)
    plain_meta = AttentionMetadata.build(query_lens, seq_lens, case.ref_tables, bs, dev)
    results = []
    for layer in range(kv.num_layers):
        q = torch.randn(sum(query_lens), hq, d, generator=g).to(kv.dtype)
        # this step's own keys/values: the contents at its positions (the write rewrites them)
        ks, vs = [], []
        for b, (qlen, slen) in enumerate(zip(query_lens, seq_lens)):
            for p in range(slen - qlen, slen):
                blk = case.ref_tables[b][p // bs]
                ks.append(case.content[layer, 0, blk, p % bs])
                vs.append(case.content[layer, 1, blk, p % bs])
        k_new, v_new = torch.stack(ks).to(dev), torch.stack(vs).to(dev)
        kc, vc = kv.layers[layer]
        out = step.attention(q.to(dev), k_new, v_new, kc, vc, backend, d**-0.5)
        ref_k, ref_v = case.content[layer, 0], case.content[layer, 1]
        ref_out, _ = reference_attention(q, ref_k, ref_v, ref_meta, d**-0.5)
        plain, _ = backend.forward(q.to(dev), ref_k.to(dev), ref_v.to(dev), plain_meta, d**-0.5)
        results.append((out, ref_out, plain))
    return step.finish(), results


def max_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest absolute difference, in float64 on the CPU."""
    return (out.double().cpu() - ref.double().cpu()).abs().max().item()


def within_twice_plain(results, atol: float = 2e-3) -> list[tuple[float, float]]:
    """Per layer ``(err, bound)``: the error of the step's output against the float64 reference,
    and twice the plain kernel's own (low-precision) error plus ``atol``."""
    return [(max_err(out, ref), 2 * max_err(plain, ref) + atol) for out, ref, plain in results]
