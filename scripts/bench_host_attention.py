"""The CPU part of cooperative attention over host-resident KV: GB/s of each method, and whether
it really overlaps the device's streamed share (issue #10).

Part 1, rates: one query (decode) over ``--tokens`` host tokens of the model's shape (default
the 7B shape: 32 KV heads, head dim 128, bf16), laid out as the host pool holds it (runs of one
host chunk's rows of one layer, each its own allocation, read in place), with ``--threads``
torch threads, through ``runtime.attention.partial.host_attention`` by every method:
``tiled`` (the path before: float32 tiles in plain ops), ``fused`` and ``fused-f32``. The peer
in the same run: torch SDPA over the same tokens as one contiguous tensor (what the GPU machine's
README measured). Bytes count K and V once, as stored.

Part 2, overlap (CUDA only, ``--overlap-tokens``): a real two-tier ``KVCache`` of the model's
layers with that many host tokens (pinned), one decode step through ``SpillStep`` layer by
layer with the CPU taking a fraction ``f`` of the host blocks and the rest streamed. If the CPU
share and the streamed share run at the same time, a layer takes about
``max((1 - f) * stream, f * cpu)``; if they were serialised, the sum. Printed side by side.

    python scripts/bench_host_attention.py --tokens 16384 65536 --threads 16   # GPU machine
    python scripts/bench_host_attention.py --tokens 2048 --kv-heads 4 --head-dim 32 --threads 2

Writes ``benchmarks/results/host-attention-<device>.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
from _command import command_line  # scripts/: the result's command line

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runtime.attention.partial import CPU_METHODS, fused_available  # noqa: E402
from runtime.host_pool import CHUNK_BYTES  # noqa: E402
from runtime.spill_rates import cpu_attention_rate, host_kv_runs  # noqa: E402


def run_tokens_of(layers: int, block: int, kv_heads: int, head_dim: int, elem: int) -> int:
    """Tokens of one layer in one host chunk: the longest run the CPU part reads in place."""
    block_bytes = 2 * layers * block * kv_heads * head_dim * elem
    return max(1, CHUNK_BYTES // block_bytes) * block


def best_of(fn, reps: int = 3) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def sdpa_time(q, k, v, scale: float, threads: int) -> float:
    sdpa = torch.nn.functional.scaled_dot_product_attention
    gqa = q.shape[1] != k.shape[1]
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return best_of(lambda: sdpa(q, k, v, enable_gqa=gqa, scale=scale))
    finally:
        torch.set_num_threads(prev)


def rates(args, dtype: torch.dtype, run_tokens: int) -> list[dict]:
    rows = []
    scale = args.head_dim**-0.5
    hq = args.kv_heads * args.group
    for n in args.tokens:
        ks, vs = host_kv_runs(n, run_tokens, args.kv_heads, args.head_dim, dtype)
        r = cpu_attention_rate(
            hq, args.kv_heads, args.head_dim, dtype, threads=args.threads, runs=(ks, vs)
        )
        nbytes = sum(k.nbytes + v.nbytes for k, v in zip(ks, vs))
        # the peer: SDPA over the same tokens as one contiguous [1, H, N, D] tensor
        k = torch.cat(ks).transpose(0, 1).unsqueeze(0).contiguous()
        v = torch.cat(vs).transpose(0, 1).unsqueeze(0).contiguous()
        q = torch.randn(1, hq, 1, args.head_dim).to(dtype)
        t = sdpa_time(q, k, v, scale, args.threads)
        row = {
            "host_tokens": n,
            "run_tokens": run_tokens,
            "threads": args.threads,
            "bytes": nbytes,
            "gb_per_s": {m: b / 1e9 for m, b in r.tried.items()},
            "chosen": r.method,
            "sdpa_contiguous_gb_per_s": nbytes / t / 1e9,
        }
        row["speedup_vs_tiled"] = r.bytes_per_s / r.tried["tiled"] if "tiled" in r.tried else None
        rows.append(row)
        print(json.dumps(row), flush=True)
        del ks, vs, k, v  # a GiB at the largest sizes
    return rows


def overlap(args, dtype: torch.dtype, method: str) -> list[dict]:
    """One decode step over a real two-tier cache, CPU share ``f`` against the streamed rest."""
    from runtime.attention.base import AttentionMetadata
    from runtime.attention.registry import get_backend
    from runtime.kv_cache import KVCache
    from runtime.spill_step import SpillStep
    from scheduler.batch import SeqChunk
    from scheduler.request import SamplingParams

    dev = torch.device(args.overlap_device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    bs, hkv, d, L = args.block_size, args.kv_heads, args.head_dim, args.layers
    hq = hkv * args.group
    host = args.overlap_tokens // bs
    device_blocks = 64
    kv = KVCache(
        L, device_blocks, bs, hkv, d, dtype, dev, host_blocks=host, staging_blocks=host,
        pin_in_background=False,
    )  # fmt: skip
    # one random block broadcast everywhere: finite values at copy speed (uniform_ over 8 GiB
    # of host memory would take longer than the measurement)
    pattern = torch.empty(bs, hkv, d).uniform_(-2, 2).to(dtype)
    t0 = time.perf_counter()
    for c in range(kv.host.num_chunks):
        chunk = kv.host.chunk(c)  # allocates (pinned)
        chunk.copy_(pattern.expand_as(chunk))
    fill_s = time.perf_counter() - t0
    for k, v in kv.layers:
        k.copy_(pattern.to(dev).expand_as(k))
        v.copy_(pattern.to(dev).expand_as(v))
    table = tuple(range(device_blocks, device_blocks + host)) + (1,)  # host prefix, then device
    seq_len = host * bs + 1
    params = SamplingParams(max_new_tokens=1)
    chunk = SeqChunk(0, (0,), seq_len - 1, table, False, params)
    backend = get_backend(args.backend, dev)
    g = torch.Generator(device=dev).manual_seed(0)
    qs = [torch.randn(1, hq, d, generator=g, device=dev).to(dtype) for _ in range(L)]
    new = torch.randn(1, hkv, d, generator=g, device=dev).to(dtype)

    def step(f: float) -> float:
        s = SpillStep(kv, [chunk], cpu_fraction=f, cpu_threads=args.threads, cpu_method=method)
        meta = AttentionMetadata.build([1], s.seq_lens, s.tables, bs, dev)
        sync()
        t = time.perf_counter()
        s.bind(meta)
        for layer in range(L):
            kc, vc = kv.layers[layer]
            s.attention(qs[layer], new, new, kc, vc, backend, d**-0.5)
        s.finish()
        sync()
        return (time.perf_counter() - t) / L

    rows = []
    step(0.5)  # compile, warm the pools
    stream = min(step(0.0) for _ in range(2))
    cpu = min(step(1.0) for _ in range(2))
    for f in args.fractions:
        got = min(step(f) for _ in range(2))
        row = {
            "host_tokens": host * bs,
            "layers": L,
            "cpu_fraction": f,
            "layer_ms": 1e3 * got,
            "stream_all_layer_ms": 1e3 * stream,
            "cpu_all_layer_ms": 1e3 * cpu,
            "if_overlapped_ms": 1e3 * max((1 - f) * stream, f * cpu),
            "if_serialised_ms": 1e3 * ((1 - f) * stream + f * cpu),
            "host_fill_s": fill_s,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    kv.close()
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[16384, 65536])
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--kv-heads", type=int, default=32)
    ap.add_argument("--group", type=int, default=1, help="query heads per KV head")
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--layers", type=int, default=32, help="sets the run length (host chunk)")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--overlap-tokens", type=int, default=0, help="part 2 on CUDA; 0 skips it")
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.25, 0.4, 0.55])
    ap.add_argument("--backend", default="triton", help="device attention backend for part 2")
    ap.add_argument("--overlap-device", default="cuda", help="part 2's device (cpu: a dry run)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    elem = torch.empty((), dtype=dtype).element_size()
    run_tokens = run_tokens_of(args.layers, args.block_size, args.kv_heads, args.head_dim, elem)
    print(f"fused kernel available: {fused_available()}; run length {run_tokens} tokens")
    rate_rows = rates(args, dtype, run_tokens)
    method = rate_rows[-1]["chosen"] if rate_rows else "fused"
    overlap_rows = []
    if args.overlap_tokens and (args.overlap_device == "cpu" or torch.cuda.is_available()):
        overlap_rows = overlap(args, dtype, method)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    result = {
        "benchmark": "host_attention",
        "command": command_line(),
        "device": device,
        "cpu_count": os.cpu_count(),
        "load_average_1m": os.getloadavg()[0],  # other work on the machine skews every figure
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "methods": list(CPU_METHODS),
        "rates": rate_rows,
        "overlap": overlap_rows,
    }
    kind = device.replace(" ", "-").lower()
    out = Path(args.out or f"benchmarks/results/host-attention-{kind}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"\n{'host tokens':>12}{'threads':>9}  " + "".join(f"{m:>11}" for m in CPU_METHODS)
          + f"{'sdpa peer':>11}  chosen  (GB/s)")  # fmt: skip
    for r in rate_rows:
        cells = "".join(f"{r['gb_per_s'].get(m, float('nan')):>11.2f}" for m in CPU_METHODS)
        print(f"{r['host_tokens']:>12}{r['threads']:>9}  {cells}"
              f"{r['sdpa_contiguous_gb_per_s']:>11.2f}  {r['chosen']}")  # fmt: skip
    for r in overlap_rows:
        print(f"overlap f={r['cpu_fraction']:.2f}: layer {r['layer_ms']:.2f} ms, overlapped "
              f"{r['if_overlapped_ms']:.2f}, serialised {r['if_serialised_ms']:.2f} "
              f"(stream all {r['stream_all_layer_ms']:.2f}, cpu all {r['cpu_all_layer_ms']:.2f})")  # fmt: skip
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
