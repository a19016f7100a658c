"""Per-step control overhead: the Ray path's decode step against the same step in process.

For each TP size, one prompt of ``--context`` tokens is decoded for ``--new-tokens`` greedy
tokens through every path, the paths interleaved (``--repeats`` rounds of local, ray, ray, ...)
so that a shared machine's load falls on all of them alike. A decode step's time is the time
between two consecutive steps as the engine's loop sees them (the scheduler's own work, the
same on every path, is inside every figure and cancels in the difference):

* ``local``: the worker in this process (``executor=local``, TP = 1 only);
* ``ray[<transport>]``: the worker actors, one per rank, with each ``--transports`` setting
  (``compiled:3``: the compiled graph with 3 steps in flight, ``pipeline_depth``);
* the worker's own time inside ``Worker.execute`` on rank 0 (``StepResult.seconds``), the
  in-process figure for TP > 1, where no in-process path exists.

Per-step overhead = median Ray decode step - median in-process decode step (TP = 1: the local
path; TP > 1: rank 0's own step time). Greedy tokens must be identical on every path of a TP
size (asserted). Also reported: the bytes of one decode step's message to a worker (the
pickled batch, as the executor sends it), and time to ready per path (a fresh process, as
``tilerun run``: from its start until the first prefill step is done, Ray's start included).

    python scripts/bench_step.py --model demo-small --kv-heads 4 --device cpu --tp 1 2 4  # CPU
    python scripts/bench_step.py --model llama2-7b --device cuda --tp 1 \
        --contexts 4096 32768 --new-tokens 128                                        # H100

Writes ``benchmarks/results/step-<device>.json`` (command, device, date, load, versions, rows).
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import pickle
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _command import command_line, write_result  # scripts/: the result's command line

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def load() -> list[float]:
    """The 1, 5 and 15 minute load averages (the machine may be shared)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def checkpoint_with_kv_heads(preset: str, kv_heads: int) -> str:
    """A random-weight checkpoint of ``preset``'s shape with ``kv_heads`` key/value heads (the
    demo model's 2 cannot be split over TP = 4), written once to a temporary directory."""
    import tempfile

    from transformers import LlamaConfig, LlamaForCausalLM

    from runtime.presets import get_preset

    c = get_preset(preset)
    d = Path(tempfile.mkdtemp(prefix=f"bench-step-{preset}-kv{kv_heads}-"))
    cfg = LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size, num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads, num_key_value_heads=kv_heads,
        max_position_embeddings=min(c.max_position_embeddings, 32768),
        rope_theta=c.rope_theta, eos_token_id=None, bos_token_id=None, pad_token_id=None,
    )  # fmt: skip
    import torch

    torch.manual_seed(0)
    LlamaForCausalLM(cfg).float().save_pretrained(d, safe_serialization=True)
    return str(d)


def split_depth(path: str) -> tuple[str, int | None]:
    """``ray[compiled:2]`` -> (``ray[compiled]``, 2): the engine's path and the steps in
    flight asked of it (None: the engine's default)."""
    base, _, depth = path.rstrip("]").partition(":")
    return (base + "]" if depth else path), (int(depth) if depth else None)


def engine_fields(args, tp: int, path: str, longest: int) -> dict:
    """The flat engine fields of one path: ``local`` or ``ray[<transport>]``."""
    fields = dict(
        model=args.model, device=args.device, dtype=args.dtype, attention=args.attention,
        prefill_chunk=args.prefill_chunk, max_num_seqs=max(1, args.batch),
        max_model_len=longest, kv_cache_tokens=args.batch * (longest + 32), kv_host_tokens=0,
        tp=tp, cuda_graphs=not args.no_cuda_graphs, weights_seed=0,
    )  # fmt: skip
    if path == "local":
        fields["executor"] = "local"
    else:
        fields["executor"] = "ray"
        fields["comm"] = args.comm
        transport = split_depth(path)[0][len("ray[") : -1]
        if transport != "default":
            fields["step_transport"] = transport
    return fields


class StepClock:
    """Times every step the engine's loop finishes, and what each batch costs to send."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.marks: list[tuple[float, int, int]] = []  # (time, tokens in step, prefill done)
        self.worker_s: list[float] = []
        self.message_bytes: list[int] = []
        self._wrap()

    def _wrap(self) -> None:
        ex = self.engine.executor
        clock = self
        if hasattr(ex, "measure_messages"):
            ex.measure_messages = True
        # rank 0's own step time and the message size, whichever executor method the loop uses
        # execute() is submit().result() where submit exists: wrap only one of them
        for name in ("submit",) if hasattr(ex, "submit") else ("execute",):
            inner = getattr(ex, name)

            def timed(batch, logits="none", *args, _inner=inner, _name=name, **kwargs):
                size = clock._message_size(batch, logits)
                out = _inner(batch, logits, *args, **kwargs)  # passes hold= through
                clock.message_bytes.append(size if size is not None else ex.last_message_bytes)
                if _name == "execute":
                    clock.worker_s.append(out.seconds)
                    return out
                return _Handle(out, clock)

            setattr(ex, name, timed)

    def _message_size(self, batch, logits) -> int | None:
        if hasattr(self.engine.executor, "measure_messages"):
            return None  # the executor measures what it sends (block-table deltas), see timed()
        return len(pickle.dumps((batch, logits), protocol=pickle.HIGHEST_PROTOCOL))

    def on_progress(self, p) -> None:
        self.marks.append((time.perf_counter(), p.step_tokens, p.prefill_done >= p.prefill_total))

    def reset(self) -> None:
        self.marks.clear()
        self.worker_s.clear()
        self.message_bytes.clear()

    def decode_steps_s(self) -> list[float]:
        """Seconds between consecutive steps that are both pure decode (prefill done)."""
        out = []
        for (t0, _, d0), (t1, _, d1) in zip(self.marks, self.marks[1:]):
            if d0 and d1:
                out.append(t1 - t0)
        return out[1:]  # the first decode step after prefill may still warm up


class _Handle:
    def __init__(self, inner, clock: StepClock) -> None:
        self.inner, self.clock = inner, clock

    def result(self):
        out = self.inner.result()
        self.clock.worker_s.append(out.seconds)
        return out


def run_path(engine, clock: StepClock, prompts, new: int) -> dict:
    from scheduler.request import SamplingParams

    clock.reset()
    outs = engine.generate(
        prompts, SamplingParams(max_new_tokens=new), on_progress=clock.on_progress
    )
    steps = clock.decode_steps_s()
    n_prompt = len(prompts)
    decode_bytes = [b for b in clock.message_bytes[-len(steps) :]] if steps else []
    # rank 0's own time of the same decode steps (the last len(steps) steps are all decode)
    worker = clock.worker_s[-len(steps) :] if steps else []
    return {
        "tokens": [o.token_ids for o in outs],
        "decode_step_ms": 1000 * statistics.median(steps) if steps else None,
        "worker_step_ms": 1000 * statistics.median(worker) if worker else None,
        "message_bytes": statistics.median(decode_bytes) if decode_bytes else None,
        "steps": len(steps),
        "sequences": n_prompt,
        "load": load(),
    }


def ready_probe(fields: dict) -> None:
    """In a fresh process (``--ready-probe``): build the engine as ``tilerun run`` does, run the
    first step, print seconds since this process started (parent gives the start) as JSON."""
    from cluster.api import LLM
    from scheduler.request import SamplingParams

    t_import = time.time()
    llm = LLM(**fields)
    t_engine = time.time()
    first: list[float] = []

    def on_progress(p) -> None:
        if not first:
            first.append(time.time())

    try:
        llm.generate([[1] * 64], SamplingParams(max_new_tokens=2), on_progress=on_progress)
    finally:
        llm.shutdown()
    print("READY " + json.dumps({"imported": t_import, "engine": t_engine, "first_step": first[0]}))


def time_to_ready(args, tp: int, path: str, longest: int) -> dict:
    fields = engine_fields(args, tp, path, longest)
    # the caller's PYTHONPATH stays (it may hold ray: the device machines' bundle does)
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, TILERUN_DASHBOARD="0", PYTHONPATH=path)
    cmd = [sys.executable, __file__, "--ready-probe", json.dumps(fields)]
    t0 = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.probe_timeout)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("READY ")), None)
    if proc.returncode != 0 or line is None:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": f"probe exited {proc.returncode}: {' | '.join(tail)}"}
    t = json.loads(line[len("READY ") :])
    return {
        "ready_s": round(t["first_step"] - t0, 3),
        "imports_s": round(t["imported"] - t0, 3),
        "engine_s": round(t["engine"] - t["imported"], 3),
        "load": load(),
    }


def bench_tp(args, tp: int, context: int) -> list[dict]:
    import torch

    from cluster.config import EngineConfig
    from cluster.engine import Engine

    longest = context + args.new_tokens
    paths = (["local"] if tp == 1 and not args.no_local else []) + [
        f"ray[{t}]" for t in args.transports
    ]
    # paths that differ only in depth (ray[compiled:1], ray[compiled:2]) share one engine, so
    # one GPU holds them all; each run sets its depth first
    key = {p: split_depth(p)[0] for p in paths}
    engines, clocks = {}, {}
    rows = []
    try:
        for path in dict.fromkeys(key.values()):
            t0 = time.perf_counter()
            engines[path] = Engine(EngineConfig.from_dict(engine_fields(args, tp, path, longest)))
            clocks[path] = StepClock(engines[path])
            print(f"tp={tp} {path}: ready in {time.perf_counter() - t0:.1f}s", flush=True)
        default_depth = {k: getattr(e.executor, "pipeline_depth", 1) for k, e in engines.items()}

        def run(path: str, new: int) -> dict:
            ex = engines[key[path]].executor
            depth = split_depth(path)[1]
            if hasattr(ex, "pipeline_depth"):
                ex.pipeline_depth = depth or default_depth[key[path]]
            out = run_path(engines[key[path]], clocks[key[path]], prompts, new)
            out["pipeline_depth"] = getattr(ex, "pipeline_depth", 1)
            return out

        vocab = engines[key[paths[0]]].model_config.vocab_size
        g = torch.Generator().manual_seed(0)
        prompts = [
            torch.randint(0, vocab, (context,), generator=g).tolist() for _ in range(args.batch)
        ]
        for path in paths:  # warm every path once (first requests compile and fill pools)
            run(path, min(args.new_tokens, 8))
        runs: dict[str, list[dict]] = {p: [] for p in paths}
        for r in range(args.repeats):
            order = paths if r % 2 == 0 else paths[::-1]  # neither path always goes first
            for path in order:
                runs[path].append(run(path, args.new_tokens))
        want = runs[paths[0]][0]["tokens"]
        for path in paths:
            for x in runs[path]:
                assert x["tokens"] == want, (
                    f"tp={tp}: {path} generated other tokens than {paths[0]}: "
                    f"{x['tokens'][0][:8]} vs {want[0][:8]}"
                )
        local_ms = None
        for path in paths:
            rs = runs[path]
            step = statistics.median(x["decode_step_ms"] for x in rs)
            worker = statistics.median(x["worker_step_ms"] for x in rs)
            if path == "local":
                local_ms = step
            row = {
                "tp": tp,
                "context": context,
                "path": path,
                "pipeline_depth": rs[0]["pipeline_depth"],
                "decode_step_ms": round(step, 3),
                "decode_step_ms_runs": [round(x["decode_step_ms"], 3) for x in rs],
                "worker_step_ms": round(worker, 3),
                "message_bytes_per_decode_step": rs[0]["message_bytes"],
                "decode_steps_per_run": rs[0]["steps"],
                "load_per_run": [x["load"] for x in rs],
                "first_tokens": want[0][:8],
            }
            if path != "local":
                ref = local_ms if local_ms is not None else worker
                row["overhead_ms"] = round(step - ref, 3)
                row["overhead_vs"] = "local" if local_ms is not None else "rank 0's own step"
                # the same step's time outside rank 0's execute (transport, driver, the other
                # ranks' lag): free of how fast the compute itself ran in this run
                row["outside_worker_ms"] = round(
                    statistics.median(x["decode_step_ms"] - x["worker_step_ms"] for x in rs), 3
                )
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "load_per_run"}), flush=True)
        tokens = {"tp": tp, "context": context, "tokens": want}
    finally:
        for e in engines.values():
            e.shutdown()
        engines.clear()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return rows, tokens


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="demo-small")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--attention", default="auto")
    ap.add_argument("--tp", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--contexts", type=int, nargs="+", default=[64])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, default=1, help="sequences decoded together")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--comm", default="auto", help="the Ray paths' communicator (default: auto)")
    ap.add_argument("--prefill-chunk", type=int, default=8192)
    ap.add_argument(
        "--transports",
        nargs="+",
        default=["default"],
        help="step_transport settings of the Ray path (default: the engine's default); "
        "<transport>:<d> also sets the executor's pipeline_depth (steps in flight) to d",
    )
    ap.add_argument(
        "--kv-heads",
        type=int,
        default=None,
        help="run a random checkpoint of --model's shape with this many KV heads (TP=4 on the "
        "demo model, whose 2 KV heads do not split 4 ways)",
    )
    ap.add_argument("--no-local", action="store_true", help="skip the in-process path")
    ap.add_argument("--no-cuda-graphs", action="store_true")
    ap.add_argument("--ready", type=int, default=1, help="time-to-ready probes per path (0: none)")
    ap.add_argument("--ready-only", action="store_true", help="only the time-to-ready probes")
    ap.add_argument("--probe-timeout", type=float, default=300.0)
    ap.add_argument("--out", default=None)
    ap.add_argument("--ready-probe", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.ready_probe is not None:
        ready_probe(json.loads(args.ready_probe))
        return 0
    os.environ.setdefault("TILERUN_DASHBOARD", "0")

    import torch

    from cluster.ray_cluster import ensure_ray

    # every Ray path of a TP size is alive at once (interleaved runs): a logical CPU per worker
    ray_paths = len(args.transports)
    ensure_ray(num_cpus=max(max(args.tp) * ray_paths, os.cpu_count() or 1, 4), dashboard=False)
    model_name = args.model
    if args.kv_heads:
        args.model = checkpoint_with_kv_heads(args.model, args.kv_heads)
    rows, tokens = [], []
    started = load()
    for context in [] if args.ready_only else args.contexts:
        for tp in args.tp:
            r, t = bench_tp(args, tp, context)
            rows += r
            tokens.append(t)
    # one TP size's tokens against another's: reported, not asserted (the reduction order of a
    # row-parallel layer differs with TP, and a near tie may flip a greedy token)
    same_across_tp = {
        str(c): len({json.dumps(t["tokens"]) for t in tokens if t["context"] == c}) == 1
        for c in args.contexts
    }
    ready = []
    for tp in args.tp if args.ready else []:
        paths = (["local"] if tp == 1 and not args.no_local else []) + [
            f"ray[{t}]" for t in args.transports
        ]
        for _ in range(args.ready):
            for path in paths:
                r = time_to_ready(args, tp, path, max(args.contexts) + args.new_tokens)
                ready.append({"tp": tp, "path": path, **r})
                print(json.dumps(ready[-1]), flush=True)

    print(f"\n{'tp':>3} {'context':>8} {'path':<18}{'decode ms/step':>15}{'rank0 ms':>10}"
          f"{'overhead ms':>13}{'outside ms':>12}{'msg bytes':>11}")  # fmt: skip
    for r in rows:
        over = f"{r['overhead_ms']:>13.3f}" if "overhead_ms" in r else f"{'':>13}"
        out = f"{r['outside_worker_ms']:>12.3f}" if "outside_worker_ms" in r else f"{'':>12}"
        print(
            f"{r['tp']:>3} {r['context']:>8} {r['path']:<18}{r['decode_step_ms']:>15.3f}"
            f"{r['worker_step_ms']:>10.3f}{over}{out}"
            f"{r['message_bytes_per_decode_step'] or 0:>11.0f}"
        )
    for r in ready:
        print(f"time to ready tp={r['tp']} {r['path']}: {r.get('ready_s', r.get('error'))}")
    import ray

    info_dev = args.device
    name = "cpu"
    if (
        torch.cuda.is_available()
        and args.device in ("auto", "cuda")
        or args.device.startswith("cuda")
    ):
        name = torch.cuda.get_device_name(0)
        info_dev = "cuda"
    result = {
        "benchmark": "step",
        "command": command_line(),
        "device": name if info_dev == "cuda" else f"cpu ({os.cpu_count()} cores)",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "load_average_1_5_15": {"start": started, "end": load()},
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "ray": ray.__version__,
        },
        "model": model_name + (f" shape, {args.kv_heads} KV heads" if args.kv_heads else ""),
        "new_tokens": args.new_tokens,
        "batch": args.batch,
        "note": "overhead_ms = Ray path decode step - in-process decode step (TP=1: local "
        "executor; TP>1: rank 0's own time in Worker.execute); outside_worker_ms = Ray path "
        "decode step - rank 0's own time in Worker.execute for the same steps; medians of the "
        "decode steps of a run, then the median of runs; paths interleaved",
        "same_tokens_across_tp": same_across_tp,
        "rows": rows,
        "time_to_ready": ready,
    }
    kind = "cpu" if name == "cpu" else name.replace(" ", "-").lower()
    write_result(result, args.out, f"benchmarks/results/step-{model_name}-{kind}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
