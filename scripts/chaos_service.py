"""Durability under fire: the service keeps every task while its engine and workers are killed.

Starts a service (``tilerun up``: its own Ray head, the engine actor, its workers), submits
``--tasks`` tasks (varied prompt and output lengths, a quarter sampled with a seed), some at the
start and the rest while it runs, and meanwhile SIGKILLs the engine's or a worker's process
``--kills`` times, a few seconds apart, each time once the service has come back from the last
(``--victims stall``: a worker is SIGSTOPped instead, as a hung collective would leave it; the
service must name it past the step deadline, tear its group down and run its tasks again).
Then it stops the service and checks every task against ``tilerun run``'s tokens for the same
inputs (an in-process engine at TP 1, one request at a time):

* lost: submitted ids the store does not hold, or holds unfinished;
* failed / mismatched: tasks that did not end done, or ended with other tokens, except ties:
  a greedy task whose tokens part from the reference where the reference's top two logits are
  equal to float32 noise (``TIE_REL``; TP=2 sums in another order, and a random-weight model's
  logits are near uniform), reported with the token and the gap;
* recovery: seconds from each kill to the service running steps again (the engine's snapshot
  answers with its workers ready: a new engine pid, or one more worker rebuild).

    python scripts/chaos_service.py                          # tiny model, 40 tasks, 12 kills
    python scripts/chaos_service.py --tasks 80 --kills 30 --seed 2
    python scripts/chaos_service.py --tasks 8 --kills 3 --victims engine worker   # the CI test
    python scripts/chaos_service.py --tp 2 --comm gloo        # a kill hits one of two ranks
    python scripts/chaos_service.py --victims engine worker stall  # stalls as well as kills
    python scripts/chaos_service.py --device cuda --victims engine worker stall  # on one GPU

Writes ``benchmarks/results/chaos-service-<device>.json`` (command, device, date, every kill
and every task). On a GPU the tasks keep float32 (``--dtype``), so the check against the
reference stays exact up to float32 noise; its Ray head sees the GPU and each new worker
takes it once the killed one has let it go.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import random
import signal
import sys
import tempfile
import time
from pathlib import Path

from _command import command_line, poll  # scripts/: the result's command line

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from cluster.service.client import Service  # noqa: E402
from cluster.service.store import TERMINAL  # noqa: E402


def _tasks(n: int, rng: random.Random, vocab: int) -> list[dict]:
    out = []
    for i in range(n):
        t = {
            "prompt_token_ids": [rng.randrange(1, vocab) for _ in range(rng.randint(3, 1500))],
            "max_new_tokens": rng.randint(50, 1500),
        }
        if i % 4 == 3:  # sampled, seeded: the same tokens on every attempt
            t |= {"temperature": 0.8, "top_p": 0.9, "seed": rng.randrange(1 << 30)}
        out.append(t)
    return out


TIE_REL = 1e-5  # a logit gap this small (relative) is float32 summation-order noise


def _gone(pid: int) -> bool:
    """The process has exited (or is a zombie waiting for its parent)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] == "Z"
    except OSError:
        return True


def _metric(task, name: str) -> int:
    """A metric of a finished task's output (0 where there is none)."""
    return ((task.output or {}).get("metrics") or {}).get(name) or 0 if task else 0


def _tie(engine, prompt: list[int], params, ref: list[int], got: list[int]) -> dict:
    """Where a greedy task's tokens part from the reference: the reference's logit gap between
    its token and the service's there; a tie if within ``TIE_REL``."""
    out = engine.generate([prompt], params, logits="all")[0]
    d = next(i for i, (a, b) in enumerate(zip(ref, got)) if a != b)
    row = out.metrics["logits"][len(prompt) - 1 + d]
    gap = float(row[ref[d]] - row[got[d]])
    tie = gap <= TIE_REL * max(1.0, abs(float(row[ref[d]])))
    return {"first_difference": d, "logit_gap": gap, "tie": tie}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (its workers' device)")
    ap.add_argument("--dtype", default="float32", help="float32 keeps the check exact")
    ap.add_argument("--tasks", type=int, default=40)
    ap.add_argument("--kills", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prefill-chunk", type=int, default=64, help="small: long prefills to hit")
    ap.add_argument("--tp", type=int, default=1, help="workers (a kill hits one rank of them)")
    ap.add_argument("--comm", default="auto", help="their collective backend (gloo, mpi, auto)")
    ap.add_argument("--gap-s", type=float, nargs=2, default=[1.0, 4.0], help="between kills")
    ap.add_argument(
        "--victims", nargs="+", choices=["engine", "worker", "stall"], default=None,
        help="whose process each kill hits, in turn (default: engine or worker, at random; "
        "stall: SIGSTOP a worker)",
    )  # fmt: skip
    ap.add_argument(
        "--kv-prefix-min-tokens", type=int, default=256,
        help="prompts this long keep their KV on disk, and a re-run restores it (0: off)",
    )  # fmt: skip
    ap.add_argument("--timeout-s", type=float, default=1800)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    engine = {
        "model": args.model,
        "device": args.device,
        "dtype": args.dtype,
        "max_model_len": 4096,
        "prefill_chunk": args.prefill_chunk,
        "tp": args.tp,
        "comm": args.comm,
    }
    home = Path(tempfile.mkdtemp(prefix="tilerun-chaos-"))
    t_start = time.time()
    # every kill may hit every running task: enough attempts that none fails of kills alone
    svc = Service.up(
        home=home, max_attempts=args.kills + 2, num_cpus=4,
        kv_prefix_min_tokens=args.kv_prefix_min_tokens, **engine,
    )  # fmt: skip
    info = json.loads((home / "engine.json").read_text())
    vocab = info["vocab_size"]
    on_cpu = args.device == "cpu"
    device = (platform.processor() or platform.machine()) if on_cpu else info["devices"][0]["name"]
    specs = _tasks(args.tasks, rng, vocab)
    ids: list[str] = []
    first = args.tasks // 2
    for t in specs[:first]:
        ids.append(svc.submit(**t))
    later = list(specs[first:])
    kills = []
    try:
        for k in range(args.kills):
            time.sleep(rng.uniform(*args.gap_s))
            snap = svc.snapshot()
            if snap is None or not snap["engine"]["ready"]:
                raise RuntimeError(
                    f"kill {k}: the service is not running ({snap and snap['engine']})"
                )
            victim = "engine" if rng.random() < 0.5 else "worker"
            if args.victims:
                victim = args.victims[k % len(args.victims)]
            e = snap["engine"]
            n = len(snap["workers"])
            rank = rng.randrange(n) if n > 1 else 0  # (tp 1 draws nothing: runs repeat)
            pid = e["pid"] if victim == "engine" else snap["workers"][rank]["pid"]
            running = sum(t["state"] == "running" for t in snap["tasks"])
            t0 = time.monotonic()
            os.kill(pid, signal.SIGSTOP if victim == "stall" else signal.SIGKILL)
            # tasks submitted while the service recovers (the store takes them)
            for _ in range(min(len(later), rng.randint(0, 3))):
                ids.append(svc.submit(**later.pop(0)))

            def back(victim=victim, e=e):
                s = svc.snapshot()
                if s is None or not s["engine"]["ready"] or not s["workers"]:
                    return None
                if victim == "engine":
                    return s if s["engine"]["pid"] != e["pid"] else None
                return s if s["engine"]["rebuilds"] > e["rebuilds"] else None

            s = poll(back, 300)
            if s is None:
                raise RuntimeError(f"kill {k} ({victim}): the service did not come back in 300 s")
            kills.append(
                {
                    "victim": victim,
                    **({"rank": rank} if victim != "engine" else {}),
                    "running_tasks": running,
                    "recovery_s": round(time.monotonic() - t0, 2),
                    "engine_restarts": s["engine"]["restarts"],
                }
            )
            if victim == "stall":  # the torn-down group takes the stopped process with it
                kills[-1]["stalled_process_gone"] = bool(poll(lambda p=pid: _gone(p), 30))
                if not kills[-1]["stalled_process_gone"]:
                    os.kill(pid, signal.SIGKILL)
            print(json.dumps({"kill": k, **kills[-1]}), flush=True)
        for t in later:
            ids.append(svc.submit(**t))
        done = poll(
            lambda: all(svc.task(i).state in TERMINAL for i in ids), args.timeout_s, every=1.0
        )
        if not done:
            print("not every task ended in time", file=sys.stderr)
    finally:
        svc.down()
    wall = time.time() - t_start
    tasks = {t.id: t for t in svc.store.list()}

    # the reference: tilerun run's engine, in this process, one request at a time
    from cluster.config import EngineConfig
    from cluster.engine import Engine
    from scheduler.request import SamplingParams

    rows = []
    # (in process at tp 1: TP=N gives TP=1's tokens, which tests hold elsewhere)
    one = {k: v for k, v in engine.items() if k not in ("tp", "comm")}
    ref_engine = Engine(EngineConfig.from_dict({**one, "executor": "local"}))
    try:
        for tid, spec in zip(ids, specs):
            t = tasks.get(tid)
            prompt = spec["prompt_token_ids"]
            params = SamplingParams(**{k: v for k, v in spec.items() if k != "prompt_token_ids"})
            ref = ref_engine.generate([prompt], params)[0].token_ids
            got = t.output["token_ids"] if t and t.output else None
            row = {
                "id": tid,
                "prompt_tokens": len(prompt),
                "max_new_tokens": spec["max_new_tokens"],
                "sampled": "seed" in spec,
                "state": t.state if t else "lost",
                "attempts": t.attempts if t else None,
                "same_tokens": got == ref,
                # prompt positions this attempt read from the KV an earlier one saved
                "restored_tokens": _metric(t, "restored_tokens"),
                # generated tokens a later run went on from
                "resumed_tokens": _metric(t, "resumed_tokens"),
            }
            if got is not None and got != ref and not row["sampled"]:
                row |= _tie(ref_engine, prompt, params, ref, got)
            rows.append(row)
    finally:
        ref_engine.shutdown()
    summary = {
        "tasks": len(ids),
        "lost": sum(r["state"] == "lost" for r in rows),
        "not_done": sum(r["state"] != "done" for r in rows),
        # greedy picks that differ where the reference's top two logits tie to float32 noise
        # (TP's other summation order, a random-weight model's near-uniform logits) are ties
        "ties": sum(r.get("tie", False) for r in rows),
        "mismatched": sum(
            r["state"] == "done" and not r["same_tokens"] and not r.get("tie") for r in rows
        ),
        "kills": len(kills),
        "engine_kills": sum(k["victim"] == "engine" for k in kills),
        "stalls": sum(k["victim"] == "stall" for k in kills),
        "stalled_processes_left": sum(not k.get("stalled_process_gone", True) for k in kills),
        "tp": args.tp,
        "recovery_s_median": sorted(k["recovery_s"] for k in kills)[len(kills) // 2]
        if kills
        else None,
        "recovery_s_max": max((k["recovery_s"] for k in kills), default=None),
        "tasks_rerun": sum((r["attempts"] or 0) > 1 for r in rows),
        "tasks_restored": sum(r["restored_tokens"] > 0 for r in rows),
        "tasks_resumed": sum(r["resumed_tokens"] > 0 for r in rows),
        "wall_s": round(wall, 1),
    }
    print(json.dumps(summary, indent=1))
    slug = "cpu" if on_cpu else device.lower().replace(" ", "-")
    out = Path(args.out or f"benchmarks/results/chaos-service-{slug}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "benchmark": "chaos_service",
                "command": command_line(),
                "device": device,
                "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                "engine": engine,
                "summary": summary,
                "kills": kills,
                "rows": rows,
            },
            indent=1,
        )
    )
    print(f"wrote {out}")
    ok = not (
        summary["lost"]
        or summary["not_done"]
        or summary["mismatched"]
        or summary["stalled_processes_left"]
    )
    return 0 if ok and len(kills) == args.kills else 1


if __name__ == "__main__":
    sys.exit(main())
