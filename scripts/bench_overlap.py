"""The overlapped step loop against the one-step-at-a-time loop, in process and through Ray.

    python scripts/bench_overlap.py --model demo-small --device cpu             # 64 + 256 tokens
    python scripts/bench_overlap.py --model llama2-7b --device cuda --prompt-len 4096 \
        --new-tokens 128                                                        # H100, 7B shape

For each executor (``local``: the worker in this process; ``ray``: one worker actor) one engine
is built and warmed up, then the same greedy request runs with ``overlap_schedule`` off and on,
alternately, ``--reps`` times each (alternating, so drift on a shared machine hits both alike);
the table gives medians of decode ms/token and time to first token, and the Ray path's cost per
step over the in-process one (Ray decode ms/token minus local decode ms/token, same setting).
Both settings must give the same tokens; the script says so or fails.

Writes ``benchmarks/results/overlap-<device>.json`` (command, device, date, load, rows).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from cluster.api import LLM  # noqa: E402
from scheduler.request import SamplingParams  # noqa: E402


def run_executor(args, executor: str) -> dict:
    cfg = dict(model=args.model, device=args.device, executor=executor)
    cfg.update(prefill_chunk=args.prefill_chunk, max_num_seqs=args.max_num_seqs)
    cfg.update(max_model_len=args.prompt_len + args.new_tokens + 16)
    if args.device != "cpu":
        cfg.update(kv_cache_tokens=args.prompt_len + args.new_tokens + 512, kv_host_tokens=0)
    t0 = time.perf_counter()
    llm = LLM(**cfg)
    ready_s = time.perf_counter() - t0
    print(f"[{executor}] {llm.ready_line}", flush=True)
    vocab = llm.engine.model_config.vocab_size
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab, (args.prompt_len,), generator=g).tolist()
    params = SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True)
    try:
        # warm-up: kernels, graphs, allocator pools, both loop settings
        for on in (False, True):
            llm.engine.steps.overlap = on
            llm.engine.generate([prompt], SamplingParams(max_new_tokens=8, ignore_eos=True))
        runs: dict[bool, list[dict]] = {False: [], True: []}
        tokens: dict[bool, list[int]] = {}
        for _ in range(args.reps):
            for on in (False, True):
                llm.engine.steps.overlap = on
                out = llm.engine.generate([prompt], params)[0]
                m = out.metrics
                runs[on].append(
                    {
                        "decode_ms_per_token": 1000 * m["decode_s"] / (len(out.token_ids) - 1),
                        "ttft_s": m["ttft_s"],
                        "load1": os.getloadavg()[0],
                    }
                )
                if tokens.setdefault(on, out.token_ids) != out.token_ids:
                    raise SystemExit(f"[{executor}] overlap={on}: tokens changed between runs")
        same = tokens[False] == tokens[True]
        if not same:  # reported, not fatal: the timings still say what overlap costs or saves
            k = next(i for i, (a, b) in enumerate(zip(tokens[False], tokens[True])) if a != b)
            print(f"[{executor}] WARNING: overlap on and off differ from token {k}", flush=True)
        info = llm.engine.device_infos[0]
    finally:
        llm.shutdown()
    row = {"executor": executor, "ready_s": ready_s, "device": info, "same_tokens": same}
    row["runs"] = {}
    for on in (False, True):
        rs = runs[on]
        row["runs"]["on" if on else "off"] = {
            "decode_ms_per_token": statistics.median(r["decode_ms_per_token"] for r in rs),
            "ttft_s": statistics.median(r["ttft_s"] for r in rs),
            "each": rs,
        }
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="demo-small")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--executors", nargs="+", default=["local", "ray"], choices=["local", "ray"])
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--prefill-chunk", type=int, default=4096)
    ap.add_argument("--max-num-seqs", type=int, default=1)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    load_before = os.getloadavg()
    rows = [run_executor(args, ex) for ex in args.executors]
    by = {r["executor"]: r["runs"] for r in rows}
    print(
        f"\n{args.model} on {rows[0]['device']['name']}, prompt {args.prompt_len}, "
        f"{args.new_tokens} new tokens, medians of {args.reps}; load {load_before[0]:.1f} -> "
        f"{os.getloadavg()[0]:.1f}"
    )
    print(f"{'executor':9} {'overlap':8} {'decode ms/token':>16} {'TTFT s':>8}")
    for r in rows:
        for k in ("off", "on"):
            x = r["runs"][k]
            note = "" if r["same_tokens"] else "  (tokens differ on/off)"
            print(
                f"{r['executor']:9} {k:8} {x['decode_ms_per_token']:16.3f} {x['ttft_s']:8.3f}{note}"
            )
    overhead = {}
    if "local" in by and "ray" in by:
        for k in ("off", "on"):
            d = by["ray"][k]["decode_ms_per_token"] - by["local"][k]["decode_ms_per_token"]
            overhead[k] = d
            print(f"Ray minus in process, overlap {k}: {d:+.3f} ms/step")
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit,
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "torch": torch.__version__,
        "args": vars(args),
        "rows": rows,
        "ray_minus_local_ms_per_step": overhead,
    }
    info = rows[0]["device"]
    name = "cpu" if info["device"] == "cpu" else info["name"].lower().replace(" ", "-")
    out = Path(args.out or f"benchmarks/results/overlap-{name}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
