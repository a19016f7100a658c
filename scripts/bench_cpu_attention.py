"""Our CPU attention kernel (``fa2_cpu``) against torch's CPU flash kernel, float32, the same
threads, the same inputs as the backends hand them (K/V as strided views of a ``[N, Hkv, D]``
cache).

Cases: causal squares (a prefill chunk's own keys) and a chunk of queries over earlier keys
(all visible), at the demo model's heads (8 query, 2 KV, dim 32) and at Llama-3.2-1B's (32, 8,
64) and Llama-2-7B's (32, 32, 128) head shapes. Beside each figure: GFLOP/s of the useful work
(4 * D FLOPs per visible query-key pair) and, as the bound, this CPU's float32 matmul rate
measured in the same run (a 2048^3 torch matmul on the same threads).

    python scripts/bench_cpu_attention.py            # writes benchmarks/results/cpu-attention-cpu.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import sys
from pathlib import Path

import torch
from _command import best_ms, command_line, write_result  # scripts/: shared helpers

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from runtime import device as devmod  # noqa: E402
from runtime.attention.cpu_flash import CpuFlashBackend  # noqa: E402
from runtime.attention.fa2_cpu import library  # noqa: E402

SHAPES = {"demo-small": (8, 2, 32), "llama-1b": (32, 8, 64), "llama-7b": (32, 32, 128)}


def matmul_gflops(reps: int) -> float:
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    return 2 * 2048**3 / best_ms(lambda: a @ b, reps) / 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="demo-small,llama-1b,llama-7b")
    # (queries, keys, causal): squares, and a chunk of 2048 after earlier chunks
    ap.add_argument("--cases", default="1024:1024:c,4096:4096:c,8192:8192:c,2048:6144:f")
    ap.add_argument("--big-shape-cases", default="2048:2048:c,1024:4096:f",
                    help="cases for the 1B and 7B head shapes (heavier)")  # fmt: skip
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default="benchmarks/results/cpu-attention-cpu.json")
    args = ap.parse_args()
    ours, peer = library(), CpuFlashBackend()
    bound = matmul_gflops(args.reps)
    print(f"float32 matmul on {torch.get_num_threads()} threads: {bound:.0f} GFLOP/s", flush=True)
    g = torch.Generator().manual_seed(0)
    rows = []
    for name in args.shapes.split(","):
        hq, hkv, d = SHAPES[name]
        cases = args.cases if name == "demo-small" else args.big_shape_cases
        for case in cases.split(","):
            n, nk, kind = case.split(":")
            n, nk, causal = int(n), int(nk), kind == "c"
            q = torch.randn(n, hq, d, generator=g)
            kc, vc = torch.randn(nk, hkv, d, generator=g), torch.randn(nk, hkv, d, generator=g)
            k, v = kc.permute(1, 0, 2).unsqueeze(0), vc.permute(1, 0, 2).unsqueeze(0)
            scale = d**-0.5
            a = ours.attend(q, k, v, causal, scale)
            b = peer.attend(q, k, v, causal, scale)
            err = max((a[0] - b[0]).abs().max().item(), (a[1] - b[1]).abs().max().item())
            assert err < 1e-4, f"{name} {case}: the kernels differ by {err}"
            pairs = n * (n + 1) / 2 if causal else n * nk
            flops = 4 * d * pairs * hq
            call = (q, k, v, causal, scale)
            t_ours = best_ms(lambda call=call: ours.attend(*call), args.reps)
            t_peer = best_ms(lambda call=call: peer.attend(*call), args.reps)
            row = {
                "shape": name, "heads": hq, "kv_heads": hkv, "head_dim": d, "queries": n,
                "keys": nk, "causal": causal, "fa2_cpu_ms": t_ours, "torch_flash_ms": t_peer,
                "speedup": t_peer / t_ours,
                "fa2_cpu_gflops": flops / t_ours / 1e6, "torch_flash_gflops": flops / t_peer / 1e6,
                "max_abs_diff": err,
            }  # fmt: skip
            rows.append(row)
            print(
                f"{name:<11}{n:>6} x {nk:<6}{'causal' if causal else 'full':<7}"
                f"fa2_cpu {t_ours:8.2f} ms {row['fa2_cpu_gflops']:6.0f} GFLOP/s   "
                f"torch {t_peer:8.2f} ms {row['torch_flash_gflops']:6.0f} GFLOP/s   "
                f"{row['speedup']:.2f}x",
                flush=True,
            )
    result = {
        "benchmark": "CPU attention kernels: fa2_cpu against torch's CPU flash kernel",
        "command": command_line(),
        "device": devmod.device_info(torch.device("cpu")).name,
        "machine": platform.machine(),
        "lanes": ours.lanes,
        "threads": torch.get_num_threads(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": {"torch": torch.__version__},
        "bound_matmul_gflops": bound,
        "bound": "float32 matmul rate of this CPU on these threads (2048^3), same run",
        "rows": rows,
    }
    write_result(result, args.out, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
