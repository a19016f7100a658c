"""Benchmark the Triton attention kernels against torch SDPA on the same GPU, in the same run.

    python scripts/bench_attention.py --out benchmarks/results/attention-<device>.json

Prefill: causal, batch 1, 32 heads, head dim 128, bf16; TFLOP/s counted as 2*2*S^2*H*D/2 (the
causal half of QK^T and PV) and the peak memory each call allocates beyond its inputs. Ours reads
K/V through a block table (block size 16); SDPA reads the same memory as contiguous K/V. Rows:
the pointer-gather (Ampere) kernel with a shuffled table; the Hopper TMA kernel with the table a
fresh sequence gets from the block manager (consecutive blocks) and with a shuffled one (its
sequences then go to the gather kernel). ``--sweep`` also times Hopper configs (tile shape,
stages, warp specialisation) at 16K and uses the fastest.
Decode: one query per sequence, batch 1 and 16, paged blocks over four tables: shuffled (every
block anywhere), in order (a fresh pool), tiles anywhere (each 128-key tile consecutive blocks,
the tiles shuffled: the worst the allocators leave), and after churn (what the block manager
hands out in a pool a service-like trace has used; its runs are in the row); effective
bandwidth counts the K and V bytes once. Each time is the median of CUDA-event timings after
warm-up, with L2 flushed between
repetitions. ``--sweep`` first times a few kernel configs and uses the fastest for the table.

Portable backend (``--portable-only`` runs just this part, a few minutes): the torch-ops tiled
backend (the Volta/NPU path) against SDPA's memory-efficient kernel (the xformers-style kernel
Volta users have) at 4K-32K causal prefill, same shapes; its tiles are swept at 16K first, and
the float32 path with the old default tiles is timed at 4K and 8K as the "before". Beside it
the ``efficient_cuda`` backend (torch's memory-efficient kernel fed from the paged cache, what
``auto`` measures on GPUs the Triton kernels do not serve) with shuffled pages (gathered) and
consecutive ones (read in place); at 16K also with 8 KV heads, where SDPA's efficient kernel
needs K/V repeated to 32 heads; and decode (8 and 32 KV heads, batch 1 and 16, eager: neither
is captured in a graph) against SDPA efficient over contiguous K/V.

    python scripts/bench_attention.py --portable-only [--portable-tiles 2048,4096]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import math
import platform
import random
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton  # noqa: E402

from runtime.attention import triton_decode, triton_prefill, triton_prefill_hopper  # noqa: E402
from runtime.attention.base import AttentionMetadata  # noqa: E402
from runtime.attention.cuda_efficient import CudaEfficientBackend  # noqa: E402
from runtime.attention.torch_tiled import TorchTiledBackend  # noqa: E402
from runtime.attention.triton_decode import DecodeConfig  # noqa: E402
from runtime.attention.triton_prefill import PrefillConfig  # noqa: E402
from runtime.attention.triton_prefill_hopper import HopperPrefillConfig  # noqa: E402
from runtime.attention.wmma_cuda import WmmaCudaBackend  # noqa: E402
from scheduler.block_manager import TILE_KEYS, BlockAllocator  # noqa: E402

H, D, PAGE = 32, 128, 16
DT = torch.bfloat16
# Fallbacks, measured on the lent H100; each run measures its own GPU's (measure_ceilings)
MATMUL_CEILING_TFLOPS = 787.0  # bf16 8192^3 matmul
COPY_CEILING_TBPS = 3.0  # device-to-device copy, bytes read + written

# Earlier sweeps on the H100 also tried 128/64/4w/3s, 128/128/8w/2s, 128/64/8w/4s, 128/64/4w/4s
# (spills), 64/128/4w/3s (spills): all slower at 16K than 128/128/8w/3s.
PREFILL_SWEEP_LONG = [  # at 16K
    PrefillConfig(128, 128, 8, 3),
    PrefillConfig(128, 128, 8, 3, head_major=False),  # the order before the head-major walk
    PrefillConfig(128, 64, 8, 3),
    PrefillConfig(128, 32, 4, 4),
    PrefillConfig(128, 64, 4, 4),  # the Hopper kernel's tiles: the default on sm_90
]
SHORT_BELOW = 4096  # sequences shorter than this use the best config of the 1K sweep
PREFILL_SWEEP_SHORT = [  # at 1K
    PrefillConfig(128, 64, 8, 3),
    PrefillConfig(128, 128, 8, 3),
    PrefillConfig(64, 64, 4, 3),
    PrefillConfig(64, 32, 4, 4),
]
# at 16K, consecutive pages: (block_m, block_n, warps, stages, warp-specialised, QK pipelined)
HOPPER_SWEEP = [
    HopperPrefillConfig(128, 128, 8, 3),
    HopperPrefillConfig(128, 128, 8, 3, head_major=False),  # round 1's order
    HopperPrefillConfig(128, 128, 8, 2),
    HopperPrefillConfig(128, 64, 4, 3),
    HopperPrefillConfig(128, 128, 8, 3, True),
    HopperPrefillConfig(128, 64, 4, 3, True),
    HopperPrefillConfig(128, 128, 8, 2, pipeline_qk=True),
    HopperPrefillConfig(128, 64, 8, 3, pipeline_qk=True),
    # warp-specialised off-diagonal loop: a producer warp issues the TMA loads while the
    # consumer warp groups (num_warps) compute; Triton moves registers from one to the other
    HopperPrefillConfig(128, 128, 8, 2, True),
    HopperPrefillConfig(128, 128, 4, 3, True),
    HopperPrefillConfig(128, 128, 4, 2, True),
    HopperPrefillConfig(64, 128, 4, 3, True),
    HopperPrefillConfig(128, 64, 8, 3, True),
    HopperPrefillConfig(128, 64, 4, 4),  # the default since 2026-12-04 (H200)
]
HOPPER_SWEEP_SEQS = (16384, 65536)
# Earlier sweeps: block_n 32 and 128, 4 stages, 4 or 16 programs per SM were no better.
DECODE_SWEEP = [  # (block_n, warps, stages, programs per SM, min chunk, resident per SM)
    DecodeConfig(64, 4, 3, 8, 256),
    DecodeConfig(64, 4, 3, 8, 256, 2),
    DecodeConfig(64, 4, 3, 8, 1024),
    DecodeConfig(64, 4, 3, 6, 256),
    DecodeConfig(64, 4, 3, 12, 256),
    DecodeConfig(64, 4, 3, 12, 256, 2),
    DecodeConfig(128, 4, 2, 8, 256, 1),
    DecodeConfig(64, 8, 3, 8, 256, 2),
    DecodeConfig(32, 4, 6, 8, 256, 2),
    DecodeConfig(64, 4, 2, 8, 256, 3),
    # GQA: a program's 4 query heads share each key tile, so tiles of more keys carry more
    # bytes per instruction
    DecodeConfig(128, 4, 3, 8, 256, 2),
    DecodeConfig(128, 8, 3, 8, 512, 2),
    # ~2 waves of split programs (the GQA default since the split-count sweep of 2026-12-04)
    DecodeConfig(64, 4, 3, 4, 256, 2),
]

_flush = None


def time_ms(fn, budget_ms: float = 400.0, min_reps: int = 5, max_reps: int = 50) -> float:
    """Median of per-call CUDA-event times, after warm-up, with L2 flushed before each call."""
    global _flush
    if _flush is None:
        _flush = torch.empty(256 * 1024 * 1024, dtype=torch.uint8, device="cuda")
    fn()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(3):
        fn()
    e.record()
    torch.cuda.synchronize()
    est = max(s.elapsed_time(e) / 3, 1e-3)
    reps = int(min(max_reps, max(min_reps, budget_ms / est)))
    events = []
    for _ in range(reps):
        _flush.zero_()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        events.append((a, b))
    torch.cuda.synchronize()
    return statistics.median(a.elapsed_time(b) for a, b in events)


def graphed(fn):
    """``fn`` captured in a CUDA graph: times the kernels without the host's launch overhead."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def peak_gib(fn) -> float:
    """Memory allocated by one call beyond what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**30


def measure_ceilings(log) -> dict:
    """This GPU's bounds, timed like the kernels: a 2 GiB device-to-device copy (TB/s of bytes
    read + written) and a bf16 8192^3 matmul (TFLOP/s). The notes set each figure beside them;
    the H100's figures stand in where the measurement fails."""
    global MATMUL_CEILING_TFLOPS, COPY_CEILING_TBPS
    try:
        copy, mm = _copy_tbps(), _matmul_tflops()
        torch.cuda.empty_cache()
        MATMUL_CEILING_TFLOPS, COPY_CEILING_TBPS = round(mm, 1), round(copy, 2)
        source = "measured in this run"
    except Exception as e:  # keep the fallbacks; say so
        log(f"measuring the ceilings failed ({e!r}); the H100's figures stand in")
        source = "the H100's figures (measuring failed)"
    log(f"ceilings: copy {COPY_CEILING_TBPS} TB/s, bf16 matmul {MATMUL_CEILING_TFLOPS} TFLOP/s")
    return {"bf16_matmul_tflops": MATMUL_CEILING_TFLOPS, "copy_tbps": COPY_CEILING_TBPS,
            "source": source}  # fmt: skip


def _copy_tbps() -> float:
    src = torch.empty(1 << 30, dtype=DT, device="cuda")
    dst = torch.empty_like(src)
    ms = time_ms(functools.partial(dst.copy_, src), budget_ms=200)
    return 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e12


def _matmul_tflops(n: int = 8192) -> float:
    m = torch.randn(n, n, dtype=DT, device="cuda")
    ms = time_ms(functools.partial(torch.matmul, m, m), budget_ms=200)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def shuffled_table(num_seqs: int, blocks_per_seq: int, gen: torch.Generator) -> torch.Tensor:
    perm = torch.randperm(num_seqs * blocks_per_seq, generator=gen, device="cpu")
    return perm.to(torch.int32).view(num_seqs, blocks_per_seq).cuda()


ANYWHERE_KEYS = [128]  # --anywhere-keys: run lengths of the shuffled-runs decode tables


def tiles_anywhere_table(table: torch.Tensor, extent: int, gen: torch.Generator) -> torch.Tensor:
    """The worst layout the allocators leave (``scheduler.free_runs``): every tile of ``extent``
    pages consecutive blocks, the tiles themselves anywhere in the pool."""
    b, n = table.shape
    tiles = torch.randperm(b * n // extent, generator=gen).view(b, n // extent, 1) * extent
    return (tiles + torch.arange(extent)).view(b, n).to(table.dtype).to(table.device)


CHURN_SLACK = 1.25  # the churned pool holds this many times the benchmarked sequences' blocks


def churned_tables(num_seqs: int, nblk: int, seed: int) -> tuple[torch.Tensor, int, dict]:
    """The tables ``scheduler.block_manager`` gives ``num_seqs`` sequences of ``nblk`` blocks in a
    pool a service-like trace is using: 300 other sequences of 0.5K tokens to the benchmark's
    length (log-normal, median 8K, at most 16 live) arrive and finish in mixed order, and the
    benchmarked ones arrive among the last 150 and stay. The pool is 1.25x what the benchmarked
    ones need, so they land among the others' holes. Returns the tables, the pool size in blocks
    and how the tables lie (runs of consecutive ids, broken tiles, first blocks on a tile)."""
    rnd = random.Random(seed)
    pool = int(CHURN_SLACK * num_seqs * nblk)
    alloc = BlockAllocator(pool, PAGE)
    live: list[tuple[float, list[int]]] = []  # (finish time, table), earliest first
    now = 0.0

    def admit(tokens: int, until: float) -> list[int]:
        # the earliest-finishing other sequence goes first (the benchmarked ones never finish)
        while not alloc.can_allocate(tokens) or sum(u < math.inf for u, _ in live) >= 16:
            alloc.free(live.pop(0)[1])
        table: list[int] = []
        alloc.grow(table, tokens)
        live.append((until, table))
        live.sort(key=lambda x: x[0])
        return table

    n = 300
    arrive = set(rnd.sample(range(n // 2, n), num_seqs))
    tables = []
    for i in range(n):
        if i in arrive:
            tables.append(admit(nblk * PAGE, math.inf))
        room = (pool - len(tables) * nblk) * PAGE  # what the benchmarked ones leave
        tokens = int(min(nblk * PAGE, room, max(512, rnd.lognormvariate(9.0, 1.2))))
        admit(tokens, now + tokens * rnd.uniform(0.5, 1.5))
        now += rnd.expovariate(1 / 3000)
        while live and live[0][0] < now:
            alloc.free(live.pop(0)[1])
    extent = TILE_KEYS // PAGE  # blocks per tile the allocator keeps consecutive
    runs = [1 + sum(b != a + 1 for a, b in zip(t, t[1:])) for t in tables]
    broken = sum(
        t[i + extent - 1] - t[i] != extent - 1 for t in tables for i in range(0, nblk, extent)
    )
    stats = {"pool_blocks": pool, "runs_per_seq": runs, "broken_tiles": broken,
             "starts_on_a_tile": sum(t[0] % extent == 0 for t in tables)}  # fmt: skip
    return torch.tensor(tables, dtype=torch.int32, device="cuda"), pool, stats


def sdpa_fn(backend, q, k, v, causal, gqa=False):
    from torch.nn.attention import sdpa_kernel

    def run():
        with sdpa_kernel([backend]):
            kw = {"enable_gqa": True} if gqa else {}
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, **kw)

    return run


# ---------------------------------------------------------------------------------------- prefill


def prefill_inputs(S: int, gen: torch.Generator, table: str = "shuffled"):
    """Packed q and the caches; ``table`` "shuffled" (blocks anywhere) or "runs" (consecutive)."""
    q = torch.randn(S, H, D, device="cuda", dtype=DT, generator=gen)
    k = torch.randn(S, H, D, device="cuda", dtype=DT, generator=gen)
    v = torch.randn(S, H, D, device="cuda", dtype=DT, generator=gen)
    nblk = S // PAGE
    if table == "shuffled":
        bt = shuffled_table(1, nblk, torch.Generator().manual_seed(S))
    else:
        bt = torch.arange(nblk, dtype=torch.int32, device="cuda")[None]
    meta = dict(
        query_start_loc=torch.tensor([0, S], dtype=torch.int32, device="cuda"),
        seq_lens=torch.tensor([S], dtype=torch.int32, device="cuda"),
        block_tables=bt,
    )
    return q, k, v, meta


def retable(meta: dict, table: str, S: int) -> dict:
    nblk = S // PAGE
    if table == "shuffled":
        bt = shuffled_table(1, nblk, torch.Generator().manual_seed(S))
    else:
        bt = torch.arange(nblk, dtype=torch.int32, device="cuda")[None]
    return dict(meta, block_tables=bt)


def ours_hopper(q, k, v, meta, cfg: HopperPrefillConfig, contiguous: bool = False):
    """The Hopper TMA path; ``contiguous``: rows from the first block (no table read per tile)."""
    S = q.shape[0]
    kc, vc = k.view(S // PAGE, PAGE, H, D), v.view(S // PAGE, PAGE, H, D)
    return lambda: triton_prefill_hopper.prefill_attention_hopper(
        q, kc, vc, meta["query_start_loc"], meta["seq_lens"], meta["block_tables"], S,
        D**-0.5, config=cfg, _assume_contiguous=contiguous,
    )  # fmt: skip


def ours_prefill(q, k, v, meta, cfg):
    S = q.shape[0]
    kc, vc = k.view(S // PAGE, PAGE, H, D), v.view(S // PAGE, PAGE, H, D)
    return lambda: triton_prefill.prefill_attention(
        q, kc, vc, meta["query_start_loc"], meta["seq_lens"], meta["block_tables"], S,
        D**-0.5, config=cfg,
    )  # fmt: skip


def prefill_tflops(S: int, ms: float) -> float:
    return 2 * 2 * S * S * H * D / 2 / (ms * 1e-3) / 1e12


def sweep_prefill(S: int, configs, gen, log) -> tuple[PrefillConfig, list[dict]]:
    q, k, v, meta = prefill_inputs(S, gen)
    rows = []
    for cfg in configs:
        try:
            ms = time_ms(ours_prefill(q, k, v, meta, cfg))
            rows.append({"S": S, "config": cfg.__dict__, "ms": ms, "tflops": prefill_tflops(S, ms)})
        except Exception as e:  # a config may not fit in shared memory
            rows.append({"S": S, "config": cfg.__dict__, "error": repr(e)[:300]})
        val = rows[-1].get("tflops", rows[-1].get("error"))
        log(f"  sweep prefill S={S} {_cfg_name(cfg)}: {val:.0f}" if isinstance(val, float)
            else f"  sweep prefill S={S} {_cfg_name(cfg)}: {val}")  # fmt: skip
    best = max((r for r in rows if "tflops" in r), key=lambda r: r["tflops"])
    return PrefillConfig(**best["config"]), rows


def _cfg_name(cfg) -> str:
    """``128/128/8w/3s`` plus ``ws`` (warp-specialised), ``pqk`` (pipelined QK), ``hi``
    (heads innermost, the old program order)."""
    flags = [f for f, on in (("ws", getattr(cfg, "warp_specialize", False)),
                             ("pqk", getattr(cfg, "pipeline_qk", False)),
                             ("hi", not cfg.head_major)) if on]  # fmt: skip
    return "/".join([f"{cfg.block_m}/{cfg.block_n}/{cfg.num_warps}w/{cfg.num_stages}s", *flags])


def sweep_hopper(seqs, gen, log) -> tuple[HopperPrefillConfig | None, list[dict]]:
    """Hopper configs with consecutive pages at each of ``seqs``; the best by geometric mean.
    The first config is also timed reading rows from the first block (no table read per tile)."""
    rows, score = [], {}
    for S in seqs:
        q, k, v, meta = prefill_inputs(S, gen, table="runs")
        for cfg in HOPPER_SWEEP:
            for contiguous in (False, True) if cfg == HOPPER_SWEEP[0] else (False,):
                row = {"S": S, "config": cfg.__dict__, "rows_from_first_block": contiguous}
                try:
                    ms = time_ms(ours_hopper(q, k, v, meta, cfg, contiguous), budget_ms=150)
                    row.update(ms=ms, tflops=prefill_tflops(S, ms))
                    if not contiguous:
                        score[cfg] = score.get(cfg, 0.0) + math.log(row["tflops"])
                except Exception as e:  # a config may not compile or fit in shared memory
                    row["error"] = repr(e)[:300]
                    score[cfg] = float("-inf")
                rows.append(row)
                val = f"{row['tflops']:.0f}" if "tflops" in row else row["error"][:120]
                tag = " rows-from-first-block" if contiguous else ""
                log(f"  sweep hopper S={S} {_cfg_name(cfg)}{tag}: {val}")
        del q, k, v, meta
        torch.cuda.empty_cache()
    ok = {c: v for c, v in score.items() if v > float("-inf")}
    return (max(ok, key=ok.get) if ok else None), rows


def check_prefill(cfg: PrefillConfig, gen) -> float:
    """Ours (identity table) vs SDPA flash at 4K: max abs difference, a sanity check of the run."""
    from torch.nn.attention import SDPBackend

    S = 4096
    q, k, v, meta = prefill_inputs(S, gen)
    meta["block_tables"] = torch.arange(S // PAGE, dtype=torch.int32, device="cuda")[None]
    out, _ = ours_prefill(q, k, v, meta, cfg)()
    qt, kt, vt = (x.view(1, S, H, D).transpose(1, 2) for x in (q, k, v))
    ref = sdpa_fn(SDPBackend.FLASH_ATTENTION, qt, kt, vt, True)()
    return (out.float() - ref.transpose(1, 2)[0].float()).abs().max().item()


OURS = "triton (ours, paged)"  # the gather kernel, shuffled table (the row earlier runs had)
OLD_ORDER = "triton gather, heads innermost"  # the same, in the program order before head-major
HOPPER_RUNS = "triton hopper (consecutive pages)"
HOPPER_SHUFFLED = "triton hopper (shuffled pages)"
HOPPER_OLD_ORDER = "triton hopper, heads innermost"  # consecutive pages, the order of round 1


def bench_prefill(pick, seqs, gen, log, hcfg=None, efficient=True) -> list[dict]:
    from torch.nn.attention import SDPBackend

    rows = []
    for S in seqs:
        q, k, v, meta = prefill_inputs(S, gen)
        qt, kt, vt = (x.view(1, S, H, D).transpose(1, 2) for x in (q, k, v))
        old = PrefillConfig(**{**pick(S).__dict__, "head_major": False})
        impls = {
            OLD_ORDER: ours_prefill(q, k, v, meta, old),
            OURS: ours_prefill(q, k, v, meta, pick(S)),
        }
        configs = {OLD_ORDER: old, OURS: pick(S)}
        if hcfg is not None:
            impls[HOPPER_RUNS] = ours_hopper(q, k, v, retable(meta, "runs", S), hcfg)
            impls[HOPPER_SHUFFLED] = ours_hopper(q, k, v, meta, hcfg)
            configs[HOPPER_RUNS] = configs[HOPPER_SHUFFLED] = hcfg
            if hcfg.head_major:  # the same kernel in the other program order, side by side
                h_old = HopperPrefillConfig(**{**hcfg.__dict__, "head_major": False})
                impls[HOPPER_OLD_ORDER] = ours_hopper(q, k, v, retable(meta, "runs", S), h_old)
                configs[HOPPER_OLD_ORDER] = h_old
        impls["sdpa flash"] = sdpa_fn(SDPBackend.FLASH_ATTENTION, qt, kt, vt, True)
        if efficient:
            impls["sdpa efficient"] = sdpa_fn(SDPBackend.EFFICIENT_ATTENTION, qt, kt, vt, True)
        impls["sdpa cudnn"] = sdpa_fn(SDPBackend.CUDNN_ATTENTION, qt, kt, vt, True)
        if S <= 4096 and efficient:  # standard attention materialises S x S scores
            impls["sdpa math"] = sdpa_fn(SDPBackend.MATH, qt, kt, vt, True)
        for name, fn in impls.items():
            row = {"kind": "prefill", "impl": name, "B": 1, "S": S, "H": H, "D": D}
            if name in configs:
                row["config"] = configs[name].__dict__
            try:
                row["peak_gib"] = peak_gib(fn)
                row["ms"] = time_ms(fn)
                row["tflops"] = prefill_tflops(S, row["ms"])
            except Exception as e:
                row["error"] = repr(e)[:300]
            rows.append(row)
            log(f"  prefill S={S} {name}: {row.get('tflops', row.get('error'))}")
            torch.cuda.empty_cache()
        del q, k, v, qt, kt, vt, impls, fn
        torch.cuda.empty_cache()
    return rows


# ----------------------------------------------------------------------------------------- decode


def decode_inputs(B: int, S: int, hkv: int, gen: torch.Generator):
    nblk = S // PAGE
    kc = torch.randn(B * nblk, PAGE, hkv, D, device="cuda", dtype=DT, generator=gen)
    vc = torch.randn(B * nblk, PAGE, hkv, D, device="cuda", dtype=DT, generator=gen)
    q = torch.randn(B, H, D, device="cuda", dtype=DT, generator=gen)
    seq_lens = torch.full((B,), S, dtype=torch.int32, device="cuda")
    table = shuffled_table(B, nblk, torch.Generator().manual_seed(S + B))
    return q, kc, vc, seq_lens, table


def ours_decode(q, kc, vc, seq_lens, table, S, cfg):
    return lambda: triton_decode.decode_attention(
        q, kc, vc, seq_lens, table, S, D**-0.5, config=cfg
    )


def kv_tbps(B: int, S: int, hkv: int, ms: float) -> float:
    return 2 * B * S * hkv * D * 2 / (ms * 1e-3) / 1e12


def sweep_decode(cases, gen, log) -> tuple[dict[bool, DecodeConfig], list[dict]]:
    """The best config for MHA cases and for GQA cases (key ``hkv < H``), by geometric mean."""
    rows, score = [], {False: {}, True: {}}
    for B, S, hkv in cases:
        inputs = decode_inputs(B, S, hkv, gen)
        for cfg in DECODE_SWEEP:
            key = tuple(cfg.__dict__.values())
            try:
                ms = time_ms(graphed(ours_decode(*inputs, S, cfg)), max_reps=200)
                bw = kv_tbps(B, S, hkv, ms)
                rows.append(
                    {"B": B, "S": S, "Hkv": hkv, "config": cfg.__dict__, "ms_graph": ms, "tbps": bw}
                )
                sc = score[hkv < H]
                sc[key] = sc.get(key, 0.0) + math.log(bw)
            except Exception as e:
                rows.append({"B": B, "S": S, "config": cfg.__dict__, "error": repr(e)[:300]})
                score[hkv < H][key] = float("-inf")
            val = rows[-1].get("tbps", rows[-1].get("error"))
            val = f"{val:.2f}" if isinstance(val, float) else str(val)[:100]
            name = "/".join(str(x) for x in cfg.__dict__.values())
            log(f"  sweep decode B={B} S={S} Hkv={hkv} {name}: {val}")
        del inputs
        torch.cuda.empty_cache()
    best = {gqa: DecodeConfig(*max(sc, key=sc.get)) for gqa, sc in score.items() if sc}
    return best, rows


SPLIT_CASES = [(1, 8192), (1, 32768), (1, 131072), (4, 32768), (16, 8192), (16, 32768)]
SPLIT_COUNTS = {1: (8, 16, 24, 32, 48, 64, 96, 128), 4: (2, 3, 4, 6, 8, 9, 12, 16, 24, 32),
                16: (1, 2, 3, 4, 6, 8, 12)}  # fmt: skip


def sdpa_decode_fn(q, kc, vc, B: int, S: int, hkv: int):
    """SDPA flash over the same memory as contiguous ``[B, S, Hkv, D]`` K/V (the peer's rows)."""
    from torch.nn.attention import SDPBackend

    kt = kc.view(B, S, hkv, D).transpose(1, 2)
    vt = vc.view(B, S, hkv, D).transpose(1, 2)
    return sdpa_fn(SDPBackend.FLASH_ATTENTION, q.view(B, H, 1, D), kt, vt, False, hkv != H)


def sweep_decode_splits(gen, log, hkv: int = 8) -> list[dict]:
    """The default decode config at forced split counts (``num_splits``), graph-replayed, beside
    SDPA flash and the count the default plan picks: how many split programs a case wants."""
    rows = []
    for B, S in SPLIT_CASES:
        q, kc, vc, seq_lens, table = decode_inputs(B, S, hkv, gen)
        sdpa = sdpa_decode_fn(q, kc, vc, B, S, hkv)
        cfg = triton_decode.default_decode_config(D, DT, q.device)
        row = {"B": B, "S": S, "Hkv": hkv, "config": cfg.__dict__,
               "default_splits": triton_decode.split_plan(B, hkv, S, q.device, cfg)[1],
               "sdpa_flash_ms_graph": time_ms(graphed(sdpa), budget_ms=200, max_reps=300),
               "by_splits": []}  # fmt: skip
        for n in SPLIT_COUNTS.get(B, (1, 2, 4, 8)):
            real = triton_decode.split_plan(B, hkv, S, q.device, cfg, n)[1]
            fn = functools.partial(
                triton_decode.decode_attention,
                q, kc, vc, seq_lens, table, S, D**-0.5, config=cfg, num_splits=n,
            )  # fmt: skip
            ms = time_ms(graphed(fn), budget_ms=100, max_reps=200)
            row["by_splits"].append({"asked": n, "splits": real, "ms_graph": ms})
        best = min(row["by_splits"], key=lambda r: r["ms_graph"])
        log(f"  splits B={B} S={S} Hkv={hkv}: sdpa flash {row['sdpa_flash_ms_graph'] * 1e3:.1f} "
            f"us; default {row['default_splits']} splits; best {best['splits']} splits "
            f"{best['ms_graph'] * 1e3:.1f} us; " + " ".join(
                f"{r['splits']}:{r['ms_graph'] * 1e3:.1f}" for r in row["by_splits"]))  # fmt: skip
        rows.append(row)
        del q, kc, vc, sdpa
        torch.cuda.empty_cache()
    return rows


def bench_decode(pick, cases, gen, log) -> list[dict]:
    """``pick(hkv)``: the decode config for that many KV heads."""
    rows = []
    for B, S, hkv in cases:
        q, kc, vc, seq_lens, table = decode_inputs(B, S, hkv, gen)
        cfg = pick(hkv)
        # the pages a fresh sequence gets from the block manager's in-order free list: the same
        # memory, in the same order, as SDPA flash reads
        in_order = torch.arange(table.numel(), dtype=table.dtype, device=table.device)
        in_order = in_order.view_as(table)
        impls = {
            "triton (ours, paged)": ours_decode(q, kc, vc, seq_lens, table, S, cfg),
            "triton (ours, in-order pages)": ours_decode(q, kc, vc, seq_lens, in_order, S, cfg),
        }
        for keys in ANYWHERE_KEYS:  # runs of consecutive blocks, the runs shuffled
            tiles = tiles_anywhere_table(
                table, max(1, keys // PAGE), torch.Generator().manual_seed(S + B + keys)
            )
            name = "tiles anywhere" if keys == 128 else f"{keys}-key runs anywhere"
            impls[f"triton (ours, {name})"] = ours_decode(q, kc, vc, seq_lens, tiles, S, cfg)
        if cfg.tma:  # the gather kernel with its own plan, as on GPUs before Hopper
            gather = triton_decode.DECODE_D128
            impls["triton gather (paged)"] = ours_decode(q, kc, vc, seq_lens, table, S, gather)
            impls["triton gather (in-order pages)"] = ours_decode(
                q, kc, vc, seq_lens, in_order, S, gather
            )
        else:  # the other launch order (KV heads of one split side by side)
            other = dataclasses.replace(cfg, heads_inner=not cfg.heads_inner)
            impls[f"triton heads_inner={other.heads_inner}"] = ours_decode(
                q, kc, vc, seq_lens, table, S, other
            )
        # the layout the block manager gives in a pool a service is using, 1.25x the size (its
        # own caches: the same bytes read, from a larger pool)
        churned, pool, layout = churned_tables(B, S // PAGE, seed=S + B)
        kp = torch.randn(pool, PAGE, hkv, D, device="cuda", dtype=DT, generator=gen)
        vp = torch.randn(pool, PAGE, hkv, D, device="cuda", dtype=DT, generator=gen)
        impls["triton (ours, after churn)"] = ours_decode(q, kp, vp, seq_lens, churned, S, cfg)
        # its control: in order, from the start of that pool (what the pool's memory itself costs)
        impls["triton (ours, in order, churn pool)"] = ours_decode(
            q, kp, vp, seq_lens, in_order, S, cfg
        )
        impls["triton (ours, in order +3, churn pool)"] = ours_decode(
            q, kp, vp, seq_lens, in_order + 3, S, cfg
        )
        impls["sdpa flash"] = sdpa_decode_fn(q, kc, vc, B, S, hkv)
        n = B * (S // PAGE)  # the peer over the same pool's first blocks
        impls["sdpa flash (churn pool)"] = sdpa_decode_fn(q, kp[:n], vp[:n], B, S, hkv)
        for name, fn in impls.items():
            row = {"kind": "decode", "impl": name, "B": B, "S": S, "H": H, "Hkv": hkv, "D": D}
            if name.endswith("after churn)"):
                row["layout"] = layout
            try:
                row["ms"] = time_ms(fn, max_reps=200)
                row["tbps"] = kv_tbps(B, S, hkv, row["ms"])
                # decode steps run as CUDA graphs in a serving loop: kernel time without launches
                row["ms_graph"] = time_ms(graphed(fn), max_reps=200)
                row["tbps_graph"] = kv_tbps(B, S, hkv, row["ms_graph"])
            except Exception as e:
                row["error"] = repr(e)[:300]
            rows.append(row)
            val = (row.get("tbps"), row.get("tbps_graph")) if "tbps" in row else row.get("error")
            log(f"  decode B={B} S={S} Hkv={hkv} {name}: {val}")
        del q, kc, vc, kp, vp, impls, fn, in_order, tiles  # closures hold the caches too
        torch.cuda.empty_cache()
    return rows


# ------------------------------------------------------------------------------- portable backend

# (q_tile, kv_tile): the score tile is 32 heads x q_tile x kv_tile float32 (2 GiB at 4096^2).
# Unfused, each score costs ~26 bytes of memory traffic (QK write, max, scale-subtract, exp,
# row sum, PV read) against 512 FLOPs of tensor-core work, so large tiles only amortise launches
# and the per-tile K/V gather; beyond ~1K x 2K they add above-diagonal waste on diagonal tiles.
PORTABLE_SWEEP = [(128, 512), (512, 1024), (1024, 1024), (1024, 2048), (2048, 2048),
                  (2048, 4096), (4096, 4096)]  # fmt: skip
PORTABLE_SWEEP_S = 16384


def portable_fn(q, k, v, meta, tiles, mixed=None):
    S = q.shape[0]
    kc, vc = k.view(S // PAGE, PAGE, H, D), v.view(S // PAGE, PAGE, H, D)
    backend = TorchTiledBackend(*tiles, mixed=mixed)
    return lambda: backend.prefill(q, kc, vc, meta, D**-0.5)


def portable_meta(S: int, table: torch.Tensor) -> AttentionMetadata:
    return AttentionMetadata.build([S], [S], [table[0].tolist()], PAGE, "cuda")


def efficient_fn(q, k, v, meta, hkv: int = H, backend_cls=CudaEfficientBackend):
    S = q.shape[0]
    kc, vc = k.view(S // PAGE, PAGE, hkv, D), v.view(S // PAGE, PAGE, hkv, D)
    backend = backend_cls()
    return lambda: backend.forward(q, kc, vc, meta, D**-0.5)


def bench_portable(
    seqs, log, tiles: tuple[int, int] | None = None
) -> tuple[list[dict], list[dict], tuple[int, int]]:
    from torch.nn.attention import SDPBackend

    gen = torch.Generator(device="cuda").manual_seed(1)
    sweep = []
    q, k, v, m = prefill_inputs(PORTABLE_SWEEP_S, gen)
    meta = portable_meta(PORTABLE_SWEEP_S, m["block_tables"])
    for cand in [] if tiles else PORTABLE_SWEEP:
        try:
            ms = time_ms(portable_fn(q, k, v, meta, cand), budget_ms=300, min_reps=3)
            sweep.append(
                {
                    "S": PORTABLE_SWEEP_S,
                    "tiles": cand,
                    "ms": ms,
                    "tflops": prefill_tflops(PORTABLE_SWEEP_S, ms),
                }
            )
        except Exception as e:  # a tile may not fit
            sweep.append({"S": PORTABLE_SWEEP_S, "tiles": cand, "error": repr(e)[:300]})
        log(
            f"  sweep portable S={PORTABLE_SWEEP_S} tiles={cand}: {sweep[-1].get('tflops', sweep[-1].get('error'))}"
        )
        torch.cuda.empty_cache()
    best = tiles or tuple(
        max((r for r in sweep if "tflops" in r), key=lambda r: r["tflops"])["tiles"]
    )
    del q, k, v
    torch.cuda.empty_cache()

    rows = []
    for S in seqs:
        q, k, v, m = prefill_inputs(S, gen)
        meta = portable_meta(S, m["block_tables"])
        qt, kt, vt = (x.view(1, S, H, D).transpose(1, 2) for x in (q, k, v))
        impls = {f"torch portable {best[0]}x{best[1]} (paged)": portable_fn(q, k, v, meta, best)}
        if S <= 8192:  # the path before: float32 tiles of 128 x 512 (no tensor cores for bf16)
            impls["torch portable before (fp32, 128x512)"] = portable_fn(
                q, k, v, meta, (128, 512), mixed=False
            )
        impls["efficient_cuda (paged, shuffled: gathered)"] = efficient_fn(q, k, v, meta)
        runs = AttentionMetadata.build([S], [S], [list(range(S // PAGE))], PAGE, "cuda")
        impls["efficient_cuda (paged, consecutive: in place)"] = efficient_fn(q, k, v, runs)
        # our CUDA C++ kernel (WMMA: sm_70 on), the portable path where Triton does not go
        impls["wmma_cuda (paged, shuffled: gathered)"] = efficient_fn(
            q, k, v, meta, backend_cls=WmmaCudaBackend
        )
        impls["wmma_cuda (paged, consecutive: in place)"] = efficient_fn(
            q, k, v, runs, backend_cls=WmmaCudaBackend
        )
        impls["sdpa efficient"] = sdpa_fn(SDPBackend.EFFICIENT_ATTENTION, qt, kt, vt, True)
        # the reference reads keys in the order the block table gives them, as ours does
        order = m["block_tables"][0].long()
        kg, vg = (x.view(S // PAGE, PAGE, H, D)[order].view(1, S, H, D).transpose(1, 2)
                  for x in (k, v))  # fmt: skip
        ref = sdpa_fn(SDPBackend.EFFICIENT_ATTENTION, qt, kg, vg, True)()
        ref = ref.transpose(1, 2)[0].float()
        # consecutive pages read the keys in their stored order
        ref_runs = sdpa_fn(SDPBackend.EFFICIENT_ATTENTION, qt, kt, vt, True)()
        ref_runs = ref_runs.transpose(1, 2)[0].float()
        del kg, vg
        for name, fn in impls.items():
            row = {"kind": "prefill", "impl": name, "B": 1, "S": S, "H": H, "D": D}
            try:
                if not name.startswith("sdpa"):
                    out = fn()[0]
                    r = ref_runs if "consecutive" in name else ref
                    row["max_abs_diff_vs_sdpa_efficient"] = (out.float() - r).abs().max().item()
                    del out
                row["peak_gib"] = peak_gib(fn)
                row["ms"] = time_ms(fn, budget_ms=300, min_reps=3)
                row["tflops"] = prefill_tflops(S, row["ms"])
            except Exception as e:
                row["error"] = repr(e)[:300]
            rows.append(row)
            log(f"  portable S={S} {name}: {row.get('tflops', row.get('error'))}")
            torch.cuda.empty_cache()
        eff = next((r for r in rows if r["S"] == S and r["impl"] == "sdpa efficient"), {})
        for r in rows:
            if r["S"] == S and "ms" in r and "ms" in eff:
                r["speed_vs_sdpa_efficient"] = eff["ms"] / r["ms"]
        del q, k, v, qt, kt, vt, impls, ref, ref_runs
        torch.cuda.empty_cache()
    rows += bench_efficient_gqa(16384, 8, gen, log)
    rows += bench_efficient_decode(gen, log)
    return rows, sweep, best


def _timed_row(row: dict, fn, flops: float | None = None, kv_bytes: float | None = None) -> dict:
    try:
        row["ms"] = time_ms(fn, budget_ms=300, min_reps=3, max_reps=200)
        if flops:
            row["tflops"] = flops / (row["ms"] * 1e-3) / 1e12
        if kv_bytes:
            row["tbps"] = kv_bytes / (row["ms"] * 1e-3) / 1e12
    except Exception as e:
        row["error"] = repr(e)[:300]
    return row


def bench_efficient_gqa(S: int, hkv: int, gen, log) -> list[dict]:
    """Prefill with ``hkv`` K/V heads: ours reads each K/V head once for its query heads (stride-0
    batch); SDPA's efficient kernel takes K/V repeated to the query heads (the copy timed too)."""
    from torch.nn.attention import SDPBackend

    q = torch.randn(S, H, D, device="cuda", dtype=DT, generator=gen)
    k = torch.randn(S, hkv, D, device="cuda", dtype=DT, generator=gen)
    v = torch.randn(S, hkv, D, device="cuda", dtype=DT, generator=gen)
    runs = AttentionMetadata.build([S], [S], [list(range(S // PAGE))], PAGE, "cuda")
    qt, kt, vt = (
        q.view(1, S, H, D).transpose(1, 2),
        k[None].transpose(1, 2),
        v[None].transpose(1, 2),
    )
    rep = H // hkv

    def sdpa_repeated():
        kr, vr = kt.repeat_interleave(rep, 1), vt.repeat_interleave(rep, 1)
        return sdpa_fn(SDPBackend.EFFICIENT_ATTENTION, qt, kr, vr, True)()

    kr, vr = kt.repeat_interleave(rep, 1), vt.repeat_interleave(rep, 1)
    impls = {
        "efficient_cuda (paged, consecutive: in place)": efficient_fn(q, k, v, runs, hkv),
        "wmma_cuda (paged, consecutive: in place)": efficient_fn(
            q, k, v, runs, hkv, backend_cls=WmmaCudaBackend
        ),
        "sdpa efficient (K/V repeated beforehand)": sdpa_fn(
            SDPBackend.EFFICIENT_ATTENTION, qt, kr, vr, True
        ),
        "sdpa efficient (K/V repeated to 32 heads, copy included)": sdpa_repeated,
    }
    ref = sdpa_repeated().transpose(1, 2)[0].float()
    rows = []
    for name, fn in impls.items():
        row = {"kind": "prefill", "impl": name, "B": 1, "S": S, "H": H, "Hkv": hkv, "D": D}
        if not name.startswith("sdpa"):
            row["max_abs_diff_vs_sdpa_efficient"] = (fn()[0].float() - ref).abs().max().item()
        rows.append(_timed_row(row, fn, flops=2 * 2 * S * S * H * D / 2))
        log(f"  portable GQA S={S} Hkv={hkv} {name}: {row.get('tflops', row.get('error'))}")
    peer = rows[2]  # against the kernel alone, the copy left out
    for r in rows[:2]:
        if "ms" in r and "ms" in peer:
            r["speed_vs_sdpa_efficient"] = peer["ms"] / r["ms"]
    return rows


def bench_efficient_decode(gen, log) -> list[dict]:
    """Decode, one query per sequence over consecutive pages (as the allocator hands out), eager,
    against SDPA efficient over the same memory as contiguous K/V (GQA repeated for it)."""
    from torch.nn.attention import SDPBackend

    rows = []
    for hkv in (8, 32):
        for B, S in ((1, 8192), (1, 32768), (1, 131072), (16, 8192), (16, 32768)):
            q, kc, vc, _, _ = decode_inputs(B, S, hkv, gen)
            nblk = S // PAGE
            tables = [list(range(b * nblk, (b + 1) * nblk)) for b in range(B)]
            meta = AttentionMetadata.build([1] * B, [S] * B, tables, PAGE, "cuda")
            kt = kc.view(B, S, hkv, D).transpose(1, 2)
            vt = vc.view(B, S, hkv, D).transpose(1, 2)
            if hkv != H:
                kt, vt = kt.repeat_interleave(H // hkv, 1), vt.repeat_interleave(H // hkv, 1)
            impls = {
                "efficient_cuda (paged, consecutive)": functools.partial(
                    CudaEfficientBackend().forward, q, kc, vc, meta, D**-0.5
                ),
                "sdpa efficient (contiguous, K/V repeated beforehand)": sdpa_fn(
                    SDPBackend.EFFICIENT_ATTENTION, q.view(B, H, 1, D), kt, vt, False
                ),
            }
            pair = []
            for name, fn in impls.items():
                row = {"kind": "decode", "impl": name, "B": B, "S": S, "H": H, "Hkv": hkv, "D": D}
                pair.append(_timed_row(row, fn, kv_bytes=2 * B * S * hkv * D * 2))
                log(
                    f"  portable decode B={B} S={S} Hkv={hkv} {name}: {row.get('tbps', row.get('error'))}"
                )
            if "ms" in pair[0] and "ms" in pair[1]:
                pair[0]["speed_vs_sdpa_efficient"] = pair[1]["ms"] / pair[0]["ms"]
            rows += pair
            del q, kc, vc, kt, vt, impls
            torch.cuda.empty_cache()
    return rows


def main_portable(args, result, out_path, log) -> None:
    seqs = [int(s) for s in args.portable_seqs.split(",")]
    tiles = tuple(int(t) for t in args.portable_tiles.split(",")) if args.portable_tiles else None
    rows, sweep, best = bench_portable(seqs, log, tiles)
    result["rows"], result["sweeps"]["portable"], result["portable_tiles"] = rows, sweep, best
    out_path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\n{result['device']}  torch {torch.__version__}  -> {out_path}")
    fmt = "{:58}{:>3}{:>7}{:>4}{:>9}{:>10}{:>12}{:>10}"
    print(fmt.format("impl", "B", "S", "Hkv", "ms", "rate", "vs sdpa eff", "max diff"))
    for r in rows:
        head = (r["impl"][:58], r["B"], r["S"], r.get("Hkv", r["H"]))
        if "ms" not in r:
            print(fmt.format(*head, "", "", "", "") + f"  {r.get('error', '')[:60]}")
            continue
        diff = r.get("max_abs_diff_vs_sdpa_efficient")
        rate = f"{r['tflops']:.0f} TF/s" if "tflops" in r else f"{r['tbps']:.2f} TB/s"
        speed = r.get("speed_vs_sdpa_efficient")
        print(fmt.format(*head, f"{r['ms']:.3f}", rate,
                         f"{speed:.2f}x" if speed else "",
                         f"{diff:.3g}" if diff is not None else ""))  # fmt: skip


# ------------------------------------------------------------------------------------------- main


def notes(rows: list[dict], pcfg, dcfg) -> list[str]:
    def get(kind, impl, **kw):
        for r in rows:
            if (
                r["kind"] == kind
                and r["impl"] == impl
                and all(r.get(k) == v for k, v in kw.items())
            ):
                return r.get("tflops", r.get("tbps"))
        return None

    out = []
    for S in (4096, 16384, 32768, 65536):
        fl, cu = (get("prefill", i, S=S) for i in ("sdpa flash", "sdpa cudnn"))
        for impl in (OLD_ORDER, OURS, HOPPER_OLD_ORDER, HOPPER_RUNS, HOPPER_SHUFFLED):
            ours = get("prefill", impl, S=S)
            if ours and fl:
                out.append(
                    f"prefill S={S} {impl}: {ours:.0f} TFLOP/s = "
                    f"{ours / MATMUL_CEILING_TFLOPS:.0%} of the {MATMUL_CEILING_TFLOPS:.0f} "
                    f"TFLOP/s matmul ceiling; {ours / fl:.2f}x SDPA flash"
                    + (f", {ours / cu:.2f}x cuDNN" if cu else "")
                )
    cases = sorted({(r["B"], r["S"], r["Hkv"]) for r in rows if r["kind"] == "decode"})
    for B, S, hkv in cases:
        rs = [
            next((r for r in rows if r["kind"] == "decode" and r["impl"] == impl and r["B"] == B
                  and r["S"] == S and r["Hkv"] == hkv and "tbps" in r), None)
            for impl in ("triton (ours, paged)", "triton (ours, in-order pages)", "sdpa flash")
        ]  # fmt: skip
        if all(rs):
            ours, ordered, fl = rs
            out.append(
                f"decode B={B} S={S} Hkv={hkv}: ours {ours['tbps']:.2f} TB/s eager, "
                f"{ours['tbps_graph']:.2f} TB/s graph-replayed "
                f"({ours['tbps_graph'] / COPY_CEILING_TBPS:.0%} of the ~{COPY_CEILING_TBPS} TB/s "
                f"copy ceiling); {ours['tbps'] / fl['tbps']:.2f}x SDPA flash eager, "
                f"{ours['tbps_graph'] / fl['tbps_graph']:.2f}x graph-replayed (shuffled pages); "
                f"in-order pages (the memory SDPA flash reads) "
                f"{ordered['tbps_graph']:.2f} TB/s, "
                f"{ordered['tbps_graph'] / fl['tbps_graph']:.2f}x graph-replayed"
            )
    out.append(
        "prefill is bound by the tensor cores and by how well Triton overlaps them with softmax: "
        "the gather kernel is a plain FA-2 loop (pointer loads through the block table pipelined "
        "by cp.async); the Hopper kernel brings each key tile in by one TMA copy (and, when its "
        "config says so, runs the off-diagonal loop warp-specialised), which needs the tile's "
        "pages to be consecutive blocks; shuffled pages fall back to the gather kernel."
    )
    out.append(
        "decode is bound by HBM bandwidth: each K/V byte is read once (the query heads of a GQA "
        "group share one program); at short contexts the launch latency, the second (combine) "
        "kernel and the tail wave of split programs weigh more. On sm_90 a split program whose "
        "pages are consecutive blocks reads its key tiles as TMA boxes, any other gathers them."
    )
    out.append(f"configs used: prefill {pcfg}, decode {dcfg}")
    return out


def kernel_info() -> list[dict]:
    """Registers, spills and tensor-core instructions of each compiled variant (best effort)."""
    info = []
    for name, fn in (
        ("prefill", triton_prefill._prefill_kernel),
        ("prefill_hopper", triton_prefill_hopper._prefill_tma_kernel),
        ("decode_split", triton_decode._decode_split_kernel),
    ):
        try:
            for cache in fn.device_caches.values():
                for kernel in cache[0].values():
                    ptx = kernel.asm.get("ptx", "")
                    consts = getattr(kernel, "constants", None) or getattr(
                        kernel.src, "constants", {}
                    )
                    info.append(
                        {
                            "kernel": name,
                            "constants": {str(k): str(v) for k, v in dict(consts).items()},
                            "num_warps": kernel.metadata.num_warps,
                            "num_stages": kernel.metadata.num_stages,
                            "shared_bytes": kernel.metadata.shared,
                            "n_regs": kernel.n_regs,
                            "n_spills": kernel.n_spills,
                            "wgmma": "wgmma" in ptx,
                            "mma.sync": "mma.sync" in ptx,
                            "cp.async": "cp.async" in ptx,
                        }
                    )
        except Exception as e:
            info.append({"kernel": name, "error": repr(e)[:200]})
    return info


def main() -> None:
    global PAGE  # --page-size sets the KV block size every case builds its cache with
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="results JSON (default benchmarks/results/...)")
    ap.add_argument("--no-sweep", action="store_true", help="use the default configs")
    ap.add_argument("--prefill-seqs", default="1024,4096,16384,32768,65536")
    ap.add_argument("--decode-seqs", default="8192,131072,262144")
    ap.add_argument("--decode-batches", default="1,16")
    ap.add_argument(
        "--anywhere-keys", default="128", help="run lengths (keys) of the shuffled-runs tables"
    )
    ap.add_argument(
        "--decode-kv-heads", default=f"{H},8", help="KV head counts of the decode cases"
    )
    ap.add_argument(
        "--page-size", type=int, default=PAGE, help="KV block size in tokens (tilerun's default 16)"
    )
    ap.add_argument("--no-hopper", action="store_true", help="skip the Hopper TMA kernel")
    ap.add_argument(
        "--no-gather-sweep", action="store_true", help="default config for the gather kernel"
    )
    ap.add_argument("--no-efficient", action="store_true", help="skip SDPA efficient and math")
    ap.add_argument("--no-decode", action="store_true", help="prefill only")
    ap.add_argument("--no-prefill", action="store_true", help="decode only")
    ap.add_argument(
        "--portable-only",
        action="store_true",
        help="only the portable torch backend against SDPA efficient (a few minutes)",
    )
    ap.add_argument("--portable-seqs", default="4096,8192,16384,32768")
    ap.add_argument(
        "--portable-tiles", default=None, help="q_tile,kv_tile for the portable backend (no sweep)"
    )
    ap.add_argument(
        "--splits-only",
        action="store_true",
        help="only the decode config at forced split counts against SDPA flash (~1 minute)",
    )
    ap.add_argument(
        "--splits-kv-heads", default="8", help="KV head counts for --splits-only (8: GQA, 32: MHA)"
    )
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    PAGE = args.page_size
    dev_name = torch.cuda.get_device_name()
    slug = "-".join(dev_name.lower().replace("/", " ").split())
    default = f"attention-portable-{slug}" if args.portable_only else f"attention-{slug}"
    default = f"attention-splits-{slug}" if args.splits_only else default
    out_path = Path(args.out or f"benchmarks/results/{default}.json")
    gen = torch.Generator(device="cuda").manual_seed(0)
    log = lambda s: print(s, flush=True)

    result = {
        "command": " ".join([Path(sys.executable).name] + sys.argv),
        "device": dev_name,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "shapes": f"H={H} query heads, D={D}, bf16, KV block size {PAGE}",
        "ceilings": measure_ceilings(log),
        "rows": [],
        "sweeps": {},
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after every stage, so a run cut short still leaves its numbers
        out_path.write_text(json.dumps(result, indent=1) + "\n")

    if args.portable_only:
        main_portable(args, result, out_path, log)
        return
    if args.splits_only:
        result["sweeps"]["decode_splits"] = [
            row
            for hkv in args.splits_kv_heads.split(",")
            for row in sweep_decode_splits(gen, log, int(hkv))
        ]
        save()
        return

    cuda = torch.device("cuda")
    pcfg = pcfg_short = triton_prefill.default_prefill_config(D, DT, cuda)
    dcfgs = dict.fromkeys((False, True), triton_decode.default_decode_config(D, DT, cuda))
    hopper = not args.no_hopper and torch.cuda.get_device_capability() >= (9, 0)
    hcfg = triton_prefill_hopper.default_hopper_config(D, cuda) if hopper else None
    if not args.no_sweep:
        try:
            if hopper and not args.no_prefill:
                best, result["sweeps"]["hopper"] = sweep_hopper(HOPPER_SWEEP_SEQS, gen, log)
                hcfg = best or hcfg
                save()
            if not args.no_prefill and not args.no_gather_sweep:
                pcfg, result["sweeps"]["prefill"] = sweep_prefill(
                    16384, PREFILL_SWEEP_LONG, gen, log
                )
                pcfg_short, short_rows = sweep_prefill(1024, PREFILL_SWEEP_SHORT, gen, log)
                result["sweeps"]["prefill"] += short_rows
                save()
            if not args.no_decode:
                cases = [(1, 4096, H), (1, 8192, H), (1, 131072, H), (16, 8192, H)]
                cases += [(1, 131072, 8), (1, 8192, 8), (1, 32768, 8), (16, 8192, 8)]
                cases += [(16, 131072, 8)]
                best, result["sweeps"]["decode"] = sweep_decode(cases, gen, log)
                dcfgs.update(best)
        except Exception as e:  # keep going with the defaults
            log(f"sweep failed: {e!r}")
        torch.cuda.empty_cache()
    pick = lambda S: pcfg if S >= SHORT_BELOW else pcfg_short
    result["prefill_config"] = {"long": pcfg.__dict__, "short": pcfg_short.__dict__}
    result["hopper_config"] = hcfg.__dict__ if hcfg else None
    dcfg = {"mha": dcfgs[False].__dict__, "gqa": dcfgs[True].__dict__}
    result["decode_config"] = dcfg
    log(f"prefill config {pcfg} (short: {pcfg_short}); hopper {hcfg}; decode config {dcfg}")
    rows = result["rows"]
    if not args.no_prefill:
        check = check_prefill(pcfg, gen)
        result["check_max_abs_diff_vs_sdpa_flash_4k"] = check
        log(f"check: max |ours - sdpa flash| at 4K = {check:.3g}")
        torch.cuda.empty_cache()
        save()
        seqs = [int(s) for s in args.prefill_seqs.split(",")]
        rows += bench_prefill(pick, seqs, gen, log, hcfg, efficient=not args.no_efficient)
        save()
    if not args.no_decode:
        batches, seqs = args.decode_batches.split(","), args.decode_seqs.split(",")
        ANYWHERE_KEYS[:] = [int(k) for k in args.anywhere_keys.split(",")]
        kv_heads = [int(h) for h in args.decode_kv_heads.split(",")]  # 8: GQA, 4 heads a KV head
        cases = [(int(b), int(s), h) for h in kv_heads for b in batches for s in seqs]
        rows += bench_decode(lambda hkv: dcfgs[hkv < H], cases, gen, log)
    result["notes"] = notes(rows, result["prefill_config"], dcfg)
    result["kernel_info"] = kernel_info()
    save()

    print(f"\n{dev_name}  torch {torch.__version__}  triton {triton.__version__}  -> {out_path}")
    head = ("kind", "impl", "B", "S", "Hkv", "ms", "TFLOP/s|TB/s", "graph ms", "TB/s", "peak GiB")
    fmt = "{:8}{:30}{:>3}{:>7}{:>4}{:>9}{:>13}{:>9}{:>6}{:>9}"
    print(fmt.format(*head))
    for r in rows:
        val = r.get("tflops", r.get("tbps"))
        val = f"{val:.3g}" if val is not None else r.get("error", "")[:30]
        ms = f"{r['ms']:.3f}" if "ms" in r else "-"
        gms = f"{r['ms_graph']:.3f}" if "ms_graph" in r else ""
        gbw = f"{r['tbps_graph']:.2f}" if "tbps_graph" in r else ""
        pk = f"{r['peak_gib']:.3f}" if "peak_gib" in r else ""
        impl = r["impl"].replace(" (ours, paged)", " paged").replace("consecutive", "consec")
        print(fmt.format(r["kind"], impl, r["B"], r["S"], r.get("Hkv", H), ms, val, gms, gbw, pk))
    for n in result["notes"]:
        print("note:", n)


if __name__ == "__main__":
    main()
