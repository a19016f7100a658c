"""One mixture-of-experts layer's decode step, three ways, on one GPU: each pair's product read
from its expert in place (``expert_gemv``), the same products over a gathered copy of the picked
experts' weights (gather + ``bmm``: the form before), and every expert on every token (weighted 0
where not picked). Times are CUDA-graph replays (as decode runs); beside each, the bytes of the
distinct picked experts over the time, against the HBM copy rate measured in the run.

    python scripts/bench_moe_decode.py                                 # MiniMax-Text-01's layer
    python scripts/bench_moe_decode.py --experts 4 --top-k 2 --hidden 4096 --intermediate 2048

Default shape: MiniMax-Text-01 (32 experts, top 2, hidden 6144, expert intermediate 9216, bf16:
10.9 GB of expert weights). Writes ``benchmarks/results/moe-decode-<device>.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from functools import partial
from pathlib import Path

import torch
from _command import command_line  # scripts/: the result's command line

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_attention import _copy_tbps, graphed, time_ms  # noqa: E402

from runtime.config import ModelConfig  # noqa: E402
from runtime.layers.moe import SparseMoE  # noqa: E402
from runtime.parallel import ParallelState  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=6144)
    ap.add_argument("--intermediate", type=int, default=9216)
    ap.add_argument("--batches", default="1,4,8")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    dev = torch.device("cuda")
    cfg = ModelConfig(
        model_type="minimax", vocab_size=64, hidden_size=args.hidden,
        intermediate_size=args.intermediate, num_hidden_layers=1, num_attention_heads=8,
        num_key_value_heads=8, head_dim=args.hidden // 8, num_local_experts=args.experts,
        num_experts_per_tok=args.top_k, layer_types=("full_attention",),
    )  # fmt: skip
    moe = SparseMoE(cfg, ParallelState(), torch.bfloat16, dev)
    g = torch.Generator(device=dev).manual_seed(0)
    for p in (moe.gate, moe.gate_up, moe.down):
        p.data.normal_(0, 0.02, generator=g)
    per_expert = 3 * args.hidden * args.intermediate * 2
    copy_tbps = _copy_tbps()
    rows = []
    for n in (int(b) for b in args.batches.split(",")):
        x = torch.randn(n, args.hidden, device=dev, dtype=torch.bfloat16, generator=g)
        probs = torch.softmax(torch.nn.functional.linear(x, moe.gate).float(), dim=-1)
        weights, picked = torch.topk(probs, args.top_k, dim=-1)
        weights /= weights.sum(dim=-1, keepdim=True)
        distinct = torch.unique(picked).numel()
        forms = {
            "expert_gemv (in place)": dict(gemv=True, every=False),
            "gather + bmm": dict(gemv=False, every=False),
            "every expert": dict(every=True),
        }
        ref = moe.route_on_device(x, weights, picked, gemv=False, every=False).float()
        for name, kw in forms.items():
            fn = partial(moe.route_on_device, x, weights, picked, **kw)
            err = (fn().float() - ref).abs().max().item()
            ms = time_ms(graphed(fn), max_reps=100)
            read = (args.experts if kw.get("every") else distinct) * per_expert
            row = {"batch": n, "form": name, "ms": ms, "distinct_experts": distinct,
                   "expert_bytes_read_once": read, "tbps": read / ms / 1e9,
                   "max_abs_diff_vs_gather": err}  # fmt: skip
            rows.append(row)
            print(f"batch {n} {name}: {ms:.3f} ms, {row['tbps']:.2f} TB/s of the experts' "
                  f"bytes (copy rate {copy_tbps:.2f}), diff {err:.2e}", flush=True)  # fmt: skip
    name = torch.cuda.get_device_name()
    result = {
        "benchmark": "moe decode forms",
        "command": command_line(),
        "device": name,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": {"torch": torch.__version__},
        "shape": vars(args),
        "bound": f"HBM copy rate measured in the run: {copy_tbps:.2f} TB/s",
        "rows": rows,
    }
    slug = "-".join(name.lower().split())
    out = Path(args.out or f"benchmarks/results/moe-decode-{slug}.json")
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
