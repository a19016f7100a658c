"""The Gluon FA3-style prefill prototype: compile it offline, or check and time it on a Hopper GPU.

    python scripts/bench_gluon_prefill.py --compile-only     # no GPU: sm_90a build, registers, spills
    python scripts/bench_gluon_prefill.py --seqs 4096,16384,32768,65536 --out F.json   # H100/H200

On a GPU: the float64-reference check (tests/test_gluon_prefill.py does it fully; here one ragged
mix and one chunked case), then causal prefill TFLOP/s (batch 1, 32 heads of 128, bf16, pages of
16 in one consecutive run) for the Gluon kernel, the Triton TMA kernel (the default on sm_90)
and SDPA's cuDNN and flash kernels, each timed in the same run with L2 flushed between calls.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

from _command import command_line  # scripts/: the result's command line

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def compile_only(args) -> int:
    """Build for sm_90a without a GPU (Triton's bundled ptxas): proves the kernel compiles and
    shows its register use and spills."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    from triton.runtime.jit import mangle_type

    from runtime.attention.gluon_prefill_hopper import fa3_prefill_kernel

    class _DT:  # what TensorDescriptor and mangle_type read of a tensor
        is_floating_point = True

        def __str__(self) -> str:
            return "torch.bfloat16"

    class _T:
        dtype = _DT()

        def data_ptr(self) -> int:
            return 0

    def dsig(shape, block):
        lay = gl.NVMMASharedLayout.get_default_for(block, gl.bfloat16)
        return mangle_type(TensorDescriptor(_T(), shape, [shape[1], 1], block, lay))

    cons = dict(HQ=32, GROUP=4, HEAD_DIM=128, PAGE=16, BLOCK_M=64, BLOCK_N=128, STAGES=args.stages,
                CONSUMER_REGS=args.consumer_regs, PRODUCER_REGS=40,
                PINGPONG=not args.no_pingpong, CHECK_RUNS=True)  # fmt: skip
    sig = {
        "q_desc": dsig([65536, 4096], [64, 128]),
        "k_desc": dsig([65536, 1024], [128, 128]),
        "v_desc": dsig([65536, 1024], [128, 128]),
        "Out": "*bf16", "Lse": "*fp32", "QStart": "*i32", "SeqLens": "*i32",
        "BlockTables": "*i32", "Ok": "*i32", "qk_scale": "fp32", "stride_ot": "i32", "stride_oh": "i32",
        "stride_lt": "i32", "stride_bt": "i32",
    }  # fmt: skip
    sig |= dict.fromkeys(cons, "constexpr")
    cc = triton.compile(
        GluonASTSource(fa3_prefill_kernel, sig, cons),
        target=GPUTarget("cuda", 90, 32),
        options={"num_warps": 4},
    )
    ptx = cc.asm["ptx"]
    path = Path("/tmp/gluon_prefill.ptx")
    path.write_text(ptx)
    # Triton 3.9 ships the newer ptxas as ptxas-blackwell (its PTX 9.x needs it, for sm_90a too)
    tools = Path(triton.__file__).parent / "backends/nvidia/bin"
    for name in ("ptxas-blackwell", "ptxas"):
        built = subprocess.run(
            [str(tools / name), "-arch=sm_90a", "-v", str(path), "-o", "/tmp/gluon_prefill.cubin"],
            capture_output=True, text=True,
        )  # fmt: skip
        if built.returncode == 0:
            break
    else:
        raise RuntimeError(f"no ptxas of this Triton assembles the PTX: {built.stderr[-300:]}")
    info = built.stderr
    print(f"triton {triton.__version__}: shared {cc.metadata.shared} B, "
          f"{ptx.count('wgmma.mma_async')} wgmma, {ptx.count('setmaxnreg')} setmaxnreg")  # fmt: skip
    print(
        "\n".join(
            line.strip() for line in info.splitlines() if "registers" in line or "spill" in line
        )
    )
    return 0


# the Gluon kernel's schedules, each spelled out (the labels name what runs, whatever the default)
GLUON_VARIANTS = {
    "ping-pong": {"pingpong": True, "stages": 2},
    "ping-pong 3 stages": {"pingpong": True, "stages": 3},
    "free": {"pingpong": False, "stages": 2},
    "free 3 stages": {"pingpong": False, "stages": 3},
}


def on_gpu(args) -> int:
    import torch
    from bench_attention import prefill_tflops, sdpa_fn, time_ms
    from torch.nn.attention import SDPBackend

    from runtime.attention import triton_prefill_hopper
    from runtime.attention.gluon_prefill_hopper import prefill_attention_gluon

    H, D, PAGE, DT = 32, 128, 16, torch.bfloat16
    dev = torch.device("cuda")
    log_lines: list[str] = []

    def log(msg: str) -> None:
        print(msg, flush=True)
        log_lines.append(msg)

    # 1. correctness first (a wrong kernel's speed is no figure)
    import pytest

    rc = pytest.main(["-q", "-x", "tests/test_gluon_prefill.py", "-k", args.check_filter])
    checked = int(rc) == 0
    log(f"tests/test_gluon_prefill.py -k '{args.check_filter}': exit {int(rc)}")
    if not checked and not args.time_unchecked:
        return int(rc)

    rows = []
    gen = torch.Generator(device="cuda").manual_seed(0)
    for S in [int(s) for s in args.seqs.split(",")]:
        q = torch.randn(S, H, D, device=dev, dtype=DT, generator=gen)
        k = torch.randn(S, H, D, device=dev, dtype=DT, generator=gen)
        v = torch.randn(S, H, D, device=dev, dtype=DT, generator=gen)
        kc, vc = k.view(S // PAGE, PAGE, H, D), v.view(S // PAGE, PAGE, H, D)
        qsl = torch.tensor([0, S], dtype=torch.int32, device=dev)
        sl = torch.tensor([S], dtype=torch.int32, device=dev)
        bt = torch.arange(S // PAGE, dtype=torch.int32, device=dev)[None]
        qt, kt, vt = (x.transpose(0, 1)[None] for x in (q, k, v))
        paged = (q, kc, vc, qsl, sl, bt, S, D**-0.5)
        impls = {
            f"gluon fa3 {label} (paged)": partial(prefill_attention_gluon, *paged, **kw)
            for label, kw in GLUON_VARIANTS.items()
        } | {
            "triton tma (paged)": partial(
                triton_prefill_hopper.prefill_attention_hopper, *paged
            ),
            "sdpa cudnn": sdpa_fn(SDPBackend.CUDNN_ATTENTION, qt, kt, vt, True),
            "sdpa flash": sdpa_fn(SDPBackend.FLASH_ATTENTION, qt, kt, vt, True),
        }  # fmt: skip
        ref = impls["triton tma (paged)"]()[0]
        got = impls["gluon fa3 ping-pong (paged)"]()[0]
        diff = (got.float() - ref.float()).abs().max().item()
        for name, fn in impls.items():
            try:
                ms = time_ms(fn)
                row = {"S": S, "impl": name, "ms": ms, "tflops": prefill_tflops(S, ms)}
            except Exception as e:  # noqa: BLE001 - a peer missing on this machine
                row = {"S": S, "impl": name, "error": f"{type(e).__name__}: {e}"[:200]}
            if name.startswith("gluon"):
                row["max_abs_diff_vs_triton"] = diff
                row["passed_reference_check"] = checked  # False: a wrong kernel's speed
            rows.append(row)
            log(f"S={S} {name}: {row.get('tflops', row.get('error'))}")
        if args.chunk and args.chunk < S:
            # the last prefill chunk of S tokens: args.chunk queries after S - chunk cached keys
            # (the engine's shape with --prefill-chunk); no SDPA peer (its causal mask is top-left)
            c, n = S - args.chunk, args.chunk
            qsl_c = torch.tensor([0, n], dtype=torch.int32, device=dev)
            chunked = (q[c:], kc, vc, qsl_c, sl, bt, n, D**-0.5)
            flops = 4 * H * D * (n * c + n * n / 2)
            variants = {
                f"gluon fa3 {label}": partial(prefill_attention_gluon, *chunked, **kw)
                for label, kw in GLUON_VARIANTS.items()
            }
            variants["triton tma"] = partial(
                triton_prefill_hopper.prefill_attention_hopper, *chunked
            )
            for name, fn in variants.items():
                ms = time_ms(fn)
                rows.append({"S": S, "chunk": n, "impl": name + " (paged)", "ms": ms,
                             "tflops": flops / (ms * 1e-3) / 1e12})  # fmt: skip
                log(f"S={S} last chunk of {n} {name}: {rows[-1]['tflops']:.1f}")
    result = {
        "benchmark": "gluon FA3-style prefill prototype",
        "command": command_line(),
        "device": torch.cuda.get_device_name(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": {"torch": torch.__version__, "triton": __import__("triton").__version__},
        "bound": "bf16 dense matmul ceiling ~787 TFLOP/s (H100 SXM, measured by bench_attention)",
        "rows": rows,
        "log": log_lines,
    }
    out = Path(args.out or os.path.join(os.environ.get("OUT", "."), "gluon-prefill.json"))
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--compile-only", action="store_true")
    ap.add_argument("--seqs", default="4096,16384,32768,65536")
    ap.add_argument("--stages", type=int, default=2, help="--compile-only: ring stages")
    ap.add_argument("--chunk", type=int, default=0, help="also time each S's last chunk of N")
    ap.add_argument("--consumer-regs", type=int, default=232, help="--compile-only")
    ap.add_argument(
        "--no-pingpong", action="store_true", help="--compile-only: warp groups issue freely"
    )
    ap.add_argument("--check-filter", default="ragged and 1-17 or chunked")
    ap.add_argument(
        "--time-unchecked",
        action="store_true",
        help="time it even when the reference check fails (rows say so)",
    )
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    return compile_only(args) if args.compile_only else on_gpu(args)


if __name__ == "__main__":
    sys.exit(main())
