"""Lightning attention layer: tilerun's tiled core against transformers' MiniMax layer.

Both sides run the same transformers ``MiniMaxLightningAttention`` module (same weights, same
projections, norm and output gate); tilerun's side swaps its attention core for the one its
model runs (``runtime.attention.lightning_kernels``: the Triton kernels on CUDA, the torch path
elsewhere). Measured, the two interleaved ``--repeats`` times (best of
each, a shared machine's load falls on both):

* prefill of ``T`` tokens from an empty state (transformers: its loop over blocks of 256
  tokens; tilerun: blocks of ``BLOCK_SIZE``, the decays of all blocks applied at once);
* prefill of ``--chunk`` more tokens on top of that state (chunked prefill, or a follow-up
  prompt: transformers falls back to its per-token recurrence there);
* decode of ``--new-tokens`` tokens one at a time, each continuing from the state.

Outputs are compared (max relative difference, asserted below 1e-4). Beside each prefill figure
is the layer's arithmetic (projections and attention core, counted) over the time, against
this machine's float32 matrix-product rate measured in the same run.

``--core`` times the attention core alone instead, in the model dtype (float32 on the CPU,
bfloat16 on CUDA): prefill of one sequence from a zero state by the torch path at each
``--block-sizes`` and, on CUDA, the Triton kernel (outputs compared), beside the matrix-product
rate of that dtype; and one decode step of ``--decode-batch`` sequences (torch update, Triton
kernel on CUDA) with the states' bytes read and written over its time.

    python scripts/bench_lightning.py --contexts 4096 16384 65536      # 2-core CPU
    python scripts/bench_lightning.py --core --device cuda --heads 64 \
        --contexts 4096 32768 131072                                   # GPU

Writes ``benchmarks/results/lightning-<device>.json`` (``lightning-core-<device>.json``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import inspect
import json
import platform
import sys
import time
from functools import partial
from pathlib import Path

import torch
from _command import command_line  # scripts/: the result's command line

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from runtime.attention.lightning import (  # noqa: E402
    BLOCK_SIZE,
    lightning_decode,
    lightning_forward,
    new_states,
)
from runtime.attention.lightning_kernels import lightning_step  # noqa: E402
from runtime.device import device_info  # noqa: E402


def layer_for(heads: int, head_dim: int, device):
    import transformers
    from transformers.models.minimax import modeling_minimax as mm

    cfg = transformers.MiniMaxConfig(
        hidden_size=heads * head_dim,
        num_attention_heads=heads,
        head_dim=head_dim,
        num_key_value_heads=heads,
        num_hidden_layers=4,
        block_size=256,  # transformers' own block (the MiniMax-01 default)
        layer_types=["linear_attention"] * 4,
    )
    torch.manual_seed(0)
    layer = mm.MiniMaxLightningAttention(cfg, 1).eval().to(device)
    # transformers renamed the cache argument (past_key_values -> cache); the wrong name lands
    # in **kwargs unnoticed and every call starts from an empty state
    name = "cache" if "cache" in inspect.signature(layer.forward).parameters else "past_key_values"
    return (lambda x, cache: layer(x, None, None, **{name: cache})), layer, mm


def ours(layer, x: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
    """The layer with tilerun's core as its model runs it (``lightning_step``: the Triton kernels
    on CUDA, the torch path elsewhere): ``x [T, hidden]``, one sequence, ``states`` advanced."""
    T = x.shape[0]
    h, d = layer.num_attention_heads, layer.head_dim
    q, k, v = layer.act_fn(layer.qkv_proj(x)).view(T, h, 3 * d).split(d, dim=-1)
    o = lightning_step(q, k, v, layer.slope_rate.view(h), [T], states)
    o = layer.norm(o.reshape(T, h * d))
    return layer.out_proj(torch.sigmoid(layer.output_gate(x)) * o)


def layer_flops(T: int, heads: int, d: int) -> float:
    """Projections (qkv, gate, out: 5 hidden x hidden products a token) and tilerun's core
    (intra: 4 B d a token and head, a block's triangle counted whole; inter: 4 d^2)."""
    hidden = heads * d
    return T * (2 * 5 * hidden * hidden + heads * (4 * min(BLOCK_SIZE, T) * d + 4 * d * d))


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_rate(device, dtype=torch.float32) -> float:
    a = torch.randn(4096, 4096, device=device, dtype=dtype)
    b = torch.randn(4096, 4096, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(5):
        sync(device)
        t = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * 4096**3 / best


def core_rows(args, device) -> list[dict]:
    """The attention core alone, one sequence of ``T`` tokens from a zero state: the torch path
    at each of ``--block-sizes`` and, on CUDA, the Triton kernel (each compared with the first),
    in the model dtype."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    h, d = args.heads, args.head_dim
    # name -> (function, block size)
    impls = {f"torch B{b}": (partial(lightning_forward, block_size=b), b)
             for b in args.block_sizes}  # fmt: skip
    if device.type == "cuda":
        from runtime.attention.triton_lightning import BLOCK, lightning_prefill_triton

        impls[f"triton B{BLOCK}"] = (lightning_prefill_triton, BLOCK)
    slopes = (2.0 ** (-8.0 * torch.arange(1, h + 1) / h)).to(device)
    rows = []
    for T in args.contexts:
        g = torch.Generator().manual_seed(T)
        q, k, v = (torch.randn(T, h, d, generator=g).to(device, dtype) / d**0.25 for _ in range(3))
        best: dict[str, float] = {}
        outs = {}
        for _ in range(args.repeats):  # interleaved: load changes hit every variant
            for name, (fn, _b) in impls.items():
                states = new_states(1, h, d, d, device)
                sync(device)
                t = time.perf_counter()
                outs[name] = fn(q, k, v, slopes, [T], states)
                sync(device)
                _keep_best(best, name, time.perf_counter() - t)
        # arithmetic of the tiled form, a token and head: intra 4 B d (whole blocks), inter 4 d^2
        flops = {n: T * h * (4 * b * d + 4 * d * d) for n, (_f, b) in impls.items()}
        first = next(iter(impls))
        row = {"context": T, "dtype": str(dtype).removeprefix("torch."),
               "ms": {n: 1e3 * b for n, b in best.items()},
               "tokens_per_s": {n: T / b for n, b in best.items()},
               "tflops": {n: flops[n] / best[n] / 1e12 for n in best},
               f"max_rel_diff_vs_{first}": {n: rel(outs[n], outs[first]) for n in outs}}  # fmt: skip
        rows.append(row)
        print(json.dumps(row), flush=True)
    rows.append(decode_row(args, device, dtype, slopes))
    print(json.dumps(rows[-1]), flush=True)
    return rows


def decode_row(args, device, dtype, slopes) -> dict:
    """One decode step of ``--decode-batch`` sequences: the torch update and, on CUDA, the
    Triton kernel; the states' bytes read and written over the time (the step's floor)."""
    h, d, n = args.heads, args.head_dim, args.decode_batch
    impls = {"torch": lightning_decode}
    if device.type == "cuda":
        from runtime.attention.triton_lightning import lightning_decode_triton

        impls["triton"] = lightning_decode_triton
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(n, h, d, generator=g).to(device, dtype) / d**0.25 for _ in range(3))
    base = torch.randn(n, h, d, d, generator=g).to(device)
    best: dict[str, float] = {}
    outs = {}
    for _ in range(args.repeats):
        for name, fn in impls.items():
            states = base.clone()
            sync(device)
            t = time.perf_counter()
            for _ in range(10):
                outs[name] = fn(q, k, v, slopes, states)
            sync(device)
            _keep_best(best, name, (time.perf_counter() - t) / 10)
    state_bytes = 2 * n * h * d * d * 4  # each step reads and writes every state once
    return {"decode_batch": n, "dtype": str(dtype).removeprefix("torch."),
            "us_per_step": {k_: 1e6 * b for k_, b in best.items()},
            "state_gbps": {k_: state_bytes / b / 1e9 for k_, b in best.items()}}  # fmt: skip


def _keep_best(best: dict[str, float], name: str, seconds: float) -> None:
    best[name] = min(best.get(name, float("inf")), seconds)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--contexts", type=int, nargs="+", default=[4096, 16384, 65536])
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--chunk", type=int, default=512, help="tokens prefilled on top of a state")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--core", action="store_true", help="time the attention core alone")
    ap.add_argument("--decode-batch", type=int, default=16, help="--core: sequences a step")
    ap.add_argument(
        "--block-sizes", type=int, nargs="+", default=[BLOCK_SIZE], help="--core: torch path's"
    )
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    if args.core:
        return write_core(args, device)
    run_hf, layer, mm = layer_for(args.heads, args.head_dim, device)
    h, d = args.heads, args.head_dim
    peak = matmul_rate(device)
    rows = []
    for T in args.contexts:
        g = torch.Generator().manual_seed(T)
        x = torch.randn(1, T + args.chunk + args.new_tokens, h * d, generator=g).to(device)
        best: dict[str, float] = {}
        err = 0.0
        note = partial(_keep_best, best)
        for _ in range(args.repeats):
            with torch.no_grad():
                # transformers
                cache = mm.MiniMaxCache()
                sync(device)
                t = time.perf_counter()
                hf_pre, _ = run_hf(x[:, :T], cache)
                note("hf_prefill", time.perf_counter() - t)
                sync(device)
                t = time.perf_counter()
                hf_more, _ = run_hf(x[:, T : T + args.chunk], cache)
                note("hf_continue", time.perf_counter() - t)
                a = T + args.chunk
                sync(device)
                t = time.perf_counter()
                hf_dec = [run_hf(x[:, a + i : a + i + 1], cache)[0]
                          for i in range(args.new_tokens)]  # fmt: skip
                note("hf_decode", (time.perf_counter() - t) / args.new_tokens)
                # tilerun's core
                states = new_states(1, h, d, d, device)
                sync(device)
                t = time.perf_counter()
                o_pre = ours(layer, x[0, :T], states)
                note("ours_prefill", time.perf_counter() - t)
                sync(device)
                t = time.perf_counter()
                o_more = ours(layer, x[0, T : T + args.chunk], states)
                note("ours_continue", time.perf_counter() - t)
                sync(device)
                t = time.perf_counter()
                o_dec = [ours(layer, x[0, a + i : a + i + 1], states)
                         for i in range(args.new_tokens)]  # fmt: skip
                note("ours_decode", (time.perf_counter() - t) / args.new_tokens)
            parts = {"prefill": rel(o_pre, hf_pre[0]), "continue": rel(o_more, hf_more[0]),
                     "decode": max(rel(o, r[0]) for o, r in zip(o_dec, hf_dec))}  # fmt: skip
            err = max(err, *parts.values())
        assert err < 1e-4, f"outputs differ from transformers' by {err:.2e} ({parts})"
        fl_pre, fl_more = layer_flops(T, h, d), layer_flops(args.chunk, h, d)
        row = {
            "context": T,
            "prefill_tokens_per_s": {"tilerun": T / best["ours_prefill"],
                                     "transformers": T / best["hf_prefill"]},
            "prefill_speedup": best["hf_prefill"] / best["ours_prefill"],
            "prefill_gflops_tilerun": fl_pre / best["ours_prefill"] / 1e9,
            "continue_chunk": args.chunk,
            "continue_ms": {"tilerun": 1e3 * best["ours_continue"],
                            "transformers": 1e3 * best["hf_continue"]},
            "continue_speedup": best["hf_continue"] / best["ours_continue"],
            "continue_gflops_tilerun": fl_more / best["ours_continue"] / 1e9,
            "decode_ms_per_token": {"tilerun": 1e3 * best["ours_decode"],
                                    "transformers": 1e3 * best["hf_decode"]},
            "decode_speedup": best["hf_decode"] / best["ours_decode"],
            "max_rel_diff_vs_transformers": err,
        }  # fmt: skip
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\nmatmul ceiling (float32 4096^3, this run): {peak / 1e9:.0f} GFLOP/s")
    print(f"{'T':>7} {'prefill tok/s ours / hf':>26} {'x':>6} {'GFLOP/s':>8} "
          f"{'+' + str(args.chunk) + ' ms ours / hf':>22} {'x':>6} {'decode ms ours / hf':>20} {'x':>6}")  # fmt: skip
    for r in rows:
        p, c, dd = r["prefill_tokens_per_s"], r["continue_ms"], r["decode_ms_per_token"]
        print(f"{r['context']:>7} {p['tilerun']:>12,.0f} / {p['transformers']:>11,.0f} "
              f"{r['prefill_speedup']:>6.2f} {r['prefill_gflops_tilerun']:>8.0f} "
              f"{c['tilerun']:>10.1f} / {c['transformers']:>9.1f} {r['continue_speedup']:>6.2f} "
              f"{dd['tilerun']:>9.2f} / {dd['transformers']:>8.2f} {r['decode_speedup']:>6.2f}")  # fmt: skip
    return write_result(
        args,
        device,
        "lightning attention layer (MiniMax), tilerun core vs transformers",
        {"heads": h, "head_dim": d, "hidden": h * d, "block_size": BLOCK_SIZE},
        {"float32_matmul_gflops": peak / 1e9},
        rows,
        f"lightning-{device.type}.json",
    )


def write_core(args, device) -> int:
    peak = matmul_rate(device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    rows = core_rows(args, device)
    write_result(
        args,
        device,
        "lightning attention core: torch path and Triton kernel",
        {"heads": args.heads, "head_dim": args.head_dim},
        {"matmul_tflops_same_dtype": peak / 1e12},
        rows,
        f"lightning-core-{device.type}.json",
    )
    print(f"matmul ceiling (this run): {peak / 1e12:.1f} TFLOP/s")
    return 0


def write_result(args, device, benchmark: str, shape, bound, rows, default_name: str) -> int:
    """The results file: what ran, where, when, with which versions, its bound and its rows."""
    import transformers

    result = {
        "benchmark": benchmark,
        "command": command_line(),
        "device": f"{device.type}: {device_info(device).name}, {torch.get_num_threads()} threads",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "shape": shape,
        "bound": bound,
        "rows": rows,
    }
    out = Path(args.out or ROOT / "benchmarks/results" / default_name)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
