"""The wmma_cuda kernel's compiled tiles against each other and SDPA's efficient and flash kernels.

Causal prefill, batch 1, 32 heads, one head dim and dtype, contiguous K/V viewed as the cache
lays them out. Picks the order of ``runtime.attention.wmma_cuda.PREFERRED``; writes TFLOP/s (bound: the
GPU's tensor-core rate, 989 dense bf16 TFLOP/s on an H100 SXM, about 2/3 of it through the
mma.sync instructions WMMA compiles to) with the command, device and date.

    python scripts/bench_wmma_tiles.py --dtype bfloat16 --head-dim 128 --seqs 4096,16384,32768
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _command import command_line, write_result  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from runtime.attention import wmma_cuda  # noqa: E402

H = 32


def bench_length(S: int, d: int, dt: torch.dtype) -> list[dict]:
    """Every tile and both SDPA kernels at ``S`` positions."""
    rows = []
    q, k, v = (torch.randn(S, H, d, device="cuda", dtype=dt) for _ in range(3))
    flops = 4 * S * S * d * H / 2
    qt, kt, vt = (x.unsqueeze(0).transpose(1, 2) for x in (q, k, v))
    peers = {}
    for name, be in (("sdpa efficient", SDPBackend.EFFICIENT_ATTENTION),
                     ("sdpa flash", SDPBackend.FLASH_ATTENTION)):  # fmt: skip

        def run(be=be):
            with sdpa_kernel(be):
                return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True)

        peers[name] = do_bench(run, warmup=30, rep=200)
    with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
        ref = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True)
    ref = ref.transpose(1, 2)[0].float()
    kh, vh = k.transpose(0, 1), v.transpose(0, 1)
    for tile in wmma_cuda.TILES[d]:
        fn = lambda tile=tile: wmma_cuda.fa2_forward(q, kh, vh, True, d**-0.5, tile)  # noqa: E731
        err = (fn()[0].float() - ref).abs().max().item()
        ms = do_bench(fn, warmup=30, rep=200)
        rows.append({
            "S": S, "impl": wmma_cuda.kernel_name(dt, d, tile), "default":
            tile == wmma_cuda.PREFERRED[d][0], "ms": ms, "tflops": flops / ms / 1e9,
            "speed_vs_sdpa_efficient": peers["sdpa efficient"] / ms,
            "max_abs_diff_vs_sdpa_efficient": err,
        })  # fmt: skip
        print(rows[-1], flush=True)
    for name, ms in peers.items():
        rows.append({"S": S, "impl": name, "ms": ms, "tflops": flops / ms / 1e9})
        print(rows[-1], flush=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    ap.add_argument("--head-dim", type=int, default=128, choices=sorted(wmma_cuda.TILES))
    ap.add_argument("--seqs", default="4096,16384,32768")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    dt, d = getattr(torch, args.dtype), args.head_dim
    rows = []
    for S in (int(x) for x in args.seqs.split(",")):
        rows += bench_length(S, d, dt)
        torch.cuda.empty_cache()
    name = torch.cuda.get_device_name().lower().replace(" ", "-")
    write_result(
        {
            "benchmark": "wmma_cuda tiles, causal prefill",
            "command": command_line(),
            "device": torch.cuda.get_device_name(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "shape": {"batch": 1, "heads": H, "head_dim": d, "dtype": args.dtype},
            "bound": "989 TFLOP/s dense bf16 (H100 SXM); mma.sync reaches about 2/3 of it",
            "rows": rows,
        },
        args.out,
        f"benchmarks/results/wmma-tiles-d{d}-{name}.json",
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
