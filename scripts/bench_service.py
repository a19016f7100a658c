"""The service against the one-shot path: latency and throughput for 1, 8 and 32 queued tasks.

For each count n, n tasks (different prompts of ``--context`` tokens, ``--max-new-tokens`` each)
are queued at once

* on the service (``tilerun up`` once, then ``submit`` x n): submit -> first token per task
  (from the store's timestamps), and the wall time until the last result;
* with ``tilerun run`` one after another (a fresh process, cluster and workers per task, as a
  script without the service would do): queue -> first token per task (the first token is the
  moment the run prints 100% prefill), and the wall time until the last run ends.

Then the time from a worker kill (SIGKILL during a task's prefill) to that task's completion.

    python scripts/bench_service.py --model tiny --context 256 --max-new-tokens 8        # CPU
    python scripts/bench_service.py --model llama3-8b --device cuda --context 32768 \
        --max-new-tokens 64 --counts 1 8 32                                              # H100

Writes ``benchmarks/results/service-<device>.json`` (command, device, date, rows).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cluster.service.client import Service
from cluster.service.store import TaskStore

ROOT = Path(__file__).resolve().parent.parent


def prompts(n: int, context: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1, vocab) for _ in range(context)] for _ in range(n)]


def summarize(first: list[float], wall: float, n: int, gen: int, context: int) -> dict:
    return {
        "tasks": n,
        "first_token_s_mean": statistics.mean(first),
        "first_token_s_p50": statistics.median(first),
        "first_token_s_max": max(first),
        "wall_s": wall,
        "prompt_tokens_per_s": n * context / wall,
        "generated_tokens_per_s": n * gen / wall,
    }


def bench_service(svc: Service, n: int, args, vocab: int) -> dict:
    ps = prompts(n, args.context, vocab, seed=n)
    t0 = time.perf_counter()
    ids = [svc.submit(prompt_token_ids=p, max_new_tokens=args.max_new_tokens) for p in ps]
    outs = [svc.result(i, wait=True) for i in ids]
    wall = time.perf_counter() - t0
    first = [o["metrics"]["submit_to_first_token_s"] for o in outs]
    return summarize(first, wall, n, args.max_new_tokens, args.context)


def one_run(ids: list[int], args) -> tuple[float, float]:
    """One `tilerun run` process: (seconds to its first token, seconds to its end)."""
    cmd = [
        sys.executable, "-m", "cluster.cli", "run", "--model", args.model, "--device", args.device,
        "--max-model-len", str(args.context + args.max_new_tokens), "--max-new-tokens",
        str(args.max_new_tokens), "--prompt-token-ids", ",".join(map(str, ids)),
    ]  # fmt: skip
    if args.prefill_chunk:  # the same engine fields as the service's
        cmd += ["--prefill-chunk", str(args.prefill_chunk)]
    if args.step_transport:
        cmd += ["--step-transport", args.step_transport]
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT)
    first = None
    buf = b""
    while True:
        chunk = os.read(p.stderr.fileno(), 4096)
        if not chunk:
            break
        buf = (buf + chunk)[-4096:]
        # the progress line reaches 100% prefill in the step that samples the first token
        if first is None and b"(100%)" in buf:
            first = time.perf_counter() - t0
    rc = p.wait()
    end = time.perf_counter() - t0
    if rc != 0:
        raise SystemExit(f"tilerun run failed ({rc}): {buf.decode(errors='replace')[-2000:]}")
    return (first if first is not None else end), end


def bench_one_shot(n: int, args, vocab: int) -> dict:
    ps = prompts(n, args.context, vocab, seed=n)
    first, t = [], 0.0
    for p in ps:  # one after another; task i waited for all before it
        f, end = one_run(p, args)
        first.append(t + f)
        t += end
    return summarize(first, t, n, args.max_new_tokens, args.context)


def bench_kill(svc: Service, args, vocab: int) -> dict:
    """Kill the rank-0 worker during a task's prefill; time until that task completes."""
    store = TaskStore(svc.home / "tasks.db")
    context = args.kill_context or args.context
    (p,) = prompts(1, context, vocab, seed=999)
    pid = svc.snapshot()["workers"][0]["pid"]
    tid = svc.submit(prompt_token_ids=p, max_new_tokens=args.max_new_tokens)
    while store.get(tid).prefill_done == 0:
        time.sleep(0.01)
    t = store.get(tid)
    os.kill(pid, signal.SIGKILL)
    t0 = time.perf_counter()
    out = svc.result(tid, wait=True)
    return {
        "context": context,
        "prefill_done_at_kill": t.prefill_done,
        "kill_to_done_s": time.perf_counter() - t0,
        "attempts": out["attempts"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--counts", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument(
        "--one-shot-counts", type=int, nargs="*", help="counts to run `tilerun run` for "
        "(default: --counts; each task is a whole process start)",
    )  # fmt: skip
    ap.add_argument("--prefill-chunk", type=int, default=None)
    ap.add_argument("--kill-context", type=int, help="prompt tokens of the kill test")
    ap.add_argument(
        "--step-transport", default=None, help="the engine's step_transport (default: auto)"
    )
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    one_shot_counts = args.counts if args.one_shot_counts is None else args.one_shot_counts

    home = Path(tempfile.mkdtemp(prefix="tilerun-bench-"))
    fields = {"model": args.model, "device": args.device,
              "max_model_len": max(args.context, args.kill_context or 0) + args.max_new_tokens}  # fmt: skip
    if args.prefill_chunk:
        fields["prefill_chunk"] = args.prefill_chunk
    if args.step_transport:
        fields["step_transport"] = args.step_transport
    t0 = time.perf_counter()
    svc = Service.up(home=home, **fields)
    up_s = time.perf_counter() - t0
    info = svc.engine_info()
    vocab = info["vocab_size"]
    rows = []
    try:
        for n in args.counts:
            r = bench_service(svc, n, args, vocab)
            rows.append({"path": "service", **r})
            print(json.dumps(rows[-1]), flush=True)
        kill = bench_kill(svc, args, vocab)
        print(json.dumps({"worker_kill": kill}), flush=True)
    finally:
        svc.down()
    for n in one_shot_counts:
        r = bench_one_shot(n, args, vocab)
        rows.append({"path": "tilerun run, one after another", **r})
        print(json.dumps(rows[-1]), flush=True)

    device = info["devices"][0]["name"] if args.device != "cpu" else "cpu"
    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "device": device,
        "host": platform.node(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "model": args.model,
        "context": args.context,
        "max_new_tokens": args.max_new_tokens,
        "step_transport": info.get("step_transport", args.step_transport or "auto"),
        "service_up_s": up_s,
        "rows": rows,
        "worker_kill": kill,
    }
    out = Path(
        args.out
        or ROOT / "benchmarks" / "results" / f"service-{device.lower().replace(' ', '-')}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
