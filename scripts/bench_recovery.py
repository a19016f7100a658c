"""What a worker death costs a long task: the work a re-run redoes before it is where it was.

One service (``tilerun up``), one task at a time: a prompt of ``--context`` tokens and
``--max-new-tokens`` new ones. Once the store shows ``--kill-after`` generated tokens, the
rank-0 worker gets SIGKILL; the task runs again on rebuilt workers. Per row:

* ``first_run_s``: from the first run's start to the store showing the kill point (the work the
  kill threw away; a re-run from the prompt, as before re-runs kept anything, redoes exactly it,
  so this is that baseline, measured on the same machine in the same run);
* ``catch_up_s``: the second run's time to its first new token, as its engine timed it (the
  re-run goes on from the tokens stored, with the prompt's KV read from disk where saved);
* ``kill_to_done_s`` and the output's ``resumed_tokens`` and ``restored_tokens``.

Rows with the prompt KV saved (``kv_prefix_min_tokens`` at its CPU default) and not (0), each
against the same tokens from the task's own first run.

    python scripts/bench_recovery.py --model demo-small --context 8192 --max-new-tokens 400 \
        --kill-after 200

Writes ``benchmarks/results/recovery-<model>-<device>.json`` (command, device, date, rows).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import random
import signal
import sys
import tempfile
import time
from pathlib import Path

from _command import command_line, poll, write_result  # scripts/: the result's command line

from cluster.service.client import Service
from cluster.service.store import TaskStore


def _wait(pred, every: float = 0.005, timeout: float = 1800):
    got = poll(pred, timeout, every)
    if got is None:
        raise TimeoutError("the task did not get there in time")
    return got


def one(svc: Service, prompt: list[int], args) -> dict:
    store = TaskStore(svc.home / "tasks.db")
    pid = svc.snapshot()["workers"][0]["pid"]
    tid = svc.submit(prompt_token_ids=prompt, max_new_tokens=args.max_new_tokens)
    t = _wait(lambda: (x := store.get(tid)).state == "running" and x)
    started = t.started_at
    _wait(lambda: (p := store.partial(tid)) and len(p[1]) >= args.kill_after, every=0.001)
    at_kill = time.time()
    kept = len(store.partial(tid)[1])
    os.kill(pid, signal.SIGKILL)
    t0 = time.perf_counter()
    out = svc.result(tid, wait=True)
    m = out["metrics"]
    return {
        "tokens_at_kill": kept,
        "first_run_s": at_kill - started,
        "catch_up_s": m["ttft_s"],
        "kill_to_done_s": time.perf_counter() - t0,
        "resumed_tokens": m.get("resumed_tokens", 0),
        "restored_tokens": m.get("restored_tokens", 0),
        "attempts": out["attempts"],
        "token_ids": out["token_ids"],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="demo-small")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--max-new-tokens", type=int, default=400)
    ap.add_argument("--kill-after", type=int, default=200, help="generated tokens at the kill")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rng = random.Random(0)
    rows = []
    for label, min_tokens in (("tokens + prompt KV", None), ("tokens only", 0)):
        fields = {"model": args.model, "device": args.device,
                  "max_model_len": args.context + args.max_new_tokens + 16}  # fmt: skip
        if min_tokens is not None:
            fields["kv_prefix_min_tokens"] = min_tokens
        home = Path(tempfile.mkdtemp(prefix="tilerun-recovery-"))
        svc = Service.up(home=home, **fields)
        try:
            vocab = svc.engine_info()["vocab_size"]
            prompt = [rng.randrange(1, vocab) for _ in range(args.context)]
            # the same task without a kill: its tokens are what the killed one must give
            ref = svc.result(
                svc.submit(prompt_token_ids=prompt, max_new_tokens=args.max_new_tokens), wait=True
            )["token_ids"]
            r = one(svc, prompt, args)
        finally:
            svc.down()
        r["same_tokens"] = r.pop("token_ids") == ref
        r["kept"] = label
        r["catch_up_vs_first_run"] = r["first_run_s"] / r["catch_up_s"]
        rows.append(r)
        print(
            f"{label:<20} killed at {r['tokens_at_kill']} tokens after {r['first_run_s']:.2f} s;"
            f" the re-run was past it {r['catch_up_s']:.2f} s after it started "
            f"({r['catch_up_vs_first_run']:.1f}x); resumed {r['resumed_tokens']}, restored "
            f"{r['restored_tokens']}; same tokens {r['same_tokens']}",
            flush=True,
        )
    device = "cpu" if args.device == "cpu" else args.device
    result = {
        "benchmark": "recovery",
        "command": command_line(),
        "device": platform.processor() or platform.machine() if device == "cpu" else device,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "model": args.model,
        "context": args.context,
        "max_new_tokens": args.max_new_tokens,
        "rows": rows,
    }
    write_result(result, args.out, f"benchmarks/results/recovery-{args.model}-{device}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
