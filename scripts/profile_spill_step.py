"""Where a decode step over host KV goes, per spill mode: in process, one long prompt.

For each ``--modes`` entry (``stream``, ``cooperate``, ``auto``) a fresh engine runs the prompt
with a device tier of ``--kv-cache-tokens`` (the rest on the host) and decodes ``--new-tokens``;
the decode steps' time is split into the CPU part's ``host_attention`` calls (with the bytes
they read, so the in-situ CPU rate), the rest of the cooperate path, and the whole of
``SpillStep.attention`` (timers wrapped around those functions, decode steps only). JSON to
``--out``.

    python scripts/profile_spill_step.py --model llama3-8b --context 131008 \\
        --kv-cache-tokens 65536 --modes cooperate stream
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import runtime.spill_step as ss  # noqa: E402
from cluster.config import EngineConfig  # noqa: E402
from cluster.engine import Engine  # noqa: E402
from scheduler.request import SamplingParams  # noqa: E402

TIMES: dict[str, float] = {}


def _instrument() -> None:
    """Timers around the CPU part, the cooperate path and each layer's spill attention, counted
    for one-query-per-sequence (decode) calls only."""
    host_attention, cooperate, attention = (
        ss.host_attention,
        ss.SpillStep._cooperate,
        ss.SpillStep.attention,
    )

    def add(key: str, value: float) -> None:
        TIMES[key] = TIMES.get(key, 0.0) + value

    def timed_host_attention(q, k, v, scale, method):
        t = time.perf_counter()
        r = host_attention(q, k, v, scale, method)
        if q.shape[0] == 1:
            add("cpu_part_s", time.perf_counter() - t)
            add("cpu_part_bytes", sum(x.nbytes for x in k) + sum(x.nbytes for x in v))
        return r

    def timed_cooperate(self, layer, q_host, out, lse, scale):
        t = time.perf_counter()
        r = cooperate(self, layer, q_host, out, lse, scale)
        if (q_host[0] if isinstance(q_host, tuple) else q_host).shape[0] == 1:
            add("cooperate_s", time.perf_counter() - t)
        return r

    def timed_attention(self, q, *a, **kw):
        t = time.perf_counter()
        r = attention(self, q, *a, **kw)
        if q.shape[0] == 1:
            add("spill_attention_s", time.perf_counter() - t)
        return r

    ss.host_attention = timed_host_attention
    ss.SpillStep._cooperate = timed_cooperate
    ss.SpillStep.attention = timed_attention


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama3-8b")
    ap.add_argument("--context", type=int, default=131008)
    ap.add_argument("--kv-cache-tokens", type=int, default=65536, help="device tier")
    ap.add_argument("--modes", nargs="+", default=["cooperate", "stream"])
    ap.add_argument("--new-tokens", type=int, default=13)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    _instrument()
    ctx, steps = args.context, args.new_tokens - 1
    res = {
        "command": "python " + " ".join(sys.argv),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "rows": [],
    }
    for mode in args.modes:
        cfg = EngineConfig.from_dict(dict(
            model=args.model, device=args.device, prefill_chunk=8192, max_num_seqs=1,
            max_model_len=ctx + 64, kv_cache_tokens=args.kv_cache_tokens, kv_host_tokens=ctx,
            spill=mode, executor="local",
        ))  # fmt: skip
        engine = Engine(cfg)
        res["device"] = torch.cuda.get_device_name() if args.device == "cuda" else args.device
        vocab = engine.model_config.vocab_size
        prompt = torch.randint(0, vocab, (ctx,), generator=torch.Generator().manual_seed(0))
        TIMES.clear()
        out = engine.generate([prompt.tolist()], SamplingParams(max_new_tokens=args.new_tokens))
        m = out[0].metrics
        tuned = engine.executor.worker.spill_tuner.summary()  # --modes auto: what it timed
        engine.shutdown()
        row = {"mode": mode, "ttft_s": m["ttft_s"], "decode_ms": 1000 * m["decode_s"] / steps}
        row["kv_modes"], row["spill_tuner"] = m.get("kv", {}).get("modes", {}), tuned
        row.update({k: v / steps for k, v in TIMES.items()})  # per decode step
        if TIMES.get("cpu_part_s"):
            row["cpu_part_bytes_per_s"] = TIMES["cpu_part_bytes"] / TIMES["cpu_part_s"]
        res["rows"].append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
