"""Where one decode step goes: a preset model in process (local executor, CUDA graphs), batch 1.

Times, at one context: the engine's decode ms/token (``generate``, 128 tokens), one
``Worker.execute`` decode step, the captured graph replayed back to back without a sync (the
GPU's own time per step), and the step run eagerly; then a torch.profiler table of the eager
step's kernels grouped by kind (matmul, attention, the rest by kernel name). The JSON and the
top-60 kernel table go under ``--out-dir``.

    python scripts/profile_decode.py --model llama2-7b --context 4096 --out-dir benchmarks/results
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cluster.config import EngineConfig  # noqa: E402
from cluster.engine import Engine  # noqa: E402
from scheduler.batch import ScheduledBatch, SeqChunk  # noqa: E402
from scheduler.request import SamplingParams  # noqa: E402

MATMUL = ("gemm", "nvjet", "cutlass", "xmma", "sm90", "gemv", "splitk")
ATTENTION = ("decode", "attn", "attention")


def _timeit(fn, n: int) -> float:
    """Milliseconds per call of ``fn`` run ``n`` times back to back (synchronised at the ends)."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return 1000 * (time.perf_counter() - t) / n


def _kernel_table(fn, n: int) -> list[tuple[str, float, float, float]]:
    """(name, device ms per step, CPU ms per step, calls per step) of ``fn``'s ops and kernels."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as pr:
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
    rows = []
    for e in pr.key_averages():
        dev_us = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        rows.append((e.key, dev_us / n / 1000, e.cpu_time_total / n / 1000, e.count / n))
    return sorted(rows, key=lambda r: -r[1])


def _by_kind(rows) -> dict[str, float]:
    kinds: dict[str, float] = {}
    for name, dev_ms, _cpu, calls in rows:
        if not calls or not dev_ms or name.startswith(("aten::", "cuda")):
            continue  # torch ops and API calls: their kernels are counted by name
        low = name.lower()
        if any(s in low for s in MATMUL):
            kind = "matmul"
        elif any(s in low for s in ATTENTION):
            kind = "attention"
        elif "memcpy" in low or "memset" in low:
            kind = "copy"
        else:
            kind = "other: " + name[:60]
        kinds[kind] = kinds.get(kind, 0.0) + dev_ms
    return dict(sorted(kinds.items(), key=lambda kv: -kv[1]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama2-7b")
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--out-dir", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("profile_decode.py: error: needs a CUDA GPU", file=sys.stderr)
        return 2
    ctx = args.context
    cfg = EngineConfig.from_dict(dict(
        model=args.model, device="cuda", prefill_chunk=8192, max_num_seqs=1,
        max_model_len=ctx + 256, kv_cache_tokens=ctx + 512, executor="local", kv_host_tokens=0,
    ))  # fmt: skip
    t0 = time.perf_counter()
    engine = Engine(cfg)
    res: dict = {"context": ctx, "ready_s": time.perf_counter() - t0}
    w = engine.executor.worker
    vocab = engine.model_config.vocab_size
    prompt = torch.randint(0, vocab, (ctx,), generator=torch.Generator().manual_seed(0)).tolist()
    engine.generate([prompt[:256]], SamplingParams(max_new_tokens=4))
    out = engine.generate([prompt], SamplingParams(max_new_tokens=129))[0]
    res["engine_ttft_s"] = out.metrics["ttft_s"]
    res["engine_decode_ms"] = 1000 * out.metrics["decode_s"] / 128
    # one decode step over ctx tokens of cache (contents do not matter for timing)
    bs = cfg.scheduler.block_size
    chunk = SeqChunk(0, (5,), ctx, tuple(range(ctx // bs + 1)), True, SamplingParams())
    batch = ScheduledBatch(0, (chunk,))
    res["worker_execute_ms"] = _timeit(lambda: w.execute(batch), 100)
    res["graph_run_nosync_ms"] = _timeit(lambda: w.decode_graphs.run(batch.chunks), 100)
    with w.decode_graphs.eager():
        res["eager_execute_ms"] = _timeit(lambda: w.execute(batch), 30)
        rows = _kernel_table(lambda: w.execute(batch), 10)
    res["eager_kernel_ms_by_kind"] = _by_kind(rows)
    res["eager_kernel_ms_total"] = sum(res["eager_kernel_ms_by_kind"].values())
    engine.shutdown()
    res.update(
        command="python " + " ".join(sys.argv),
        device=torch.cuda.get_device_name(),
        date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        versions={"torch": torch.__version__},
        fused_ops=os.environ.get("TILERUN_FUSED_OPS", "1") != "0",
    )
    print(json.dumps(res, indent=1))
    if args.out_dir:
        stem = Path(args.out_dir) / f"profile-decode-{args.model}-{ctx}"
        stem.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
        lines = [
            f"{d:9.3f} ms dev {c:9.3f} ms cpu  x{n:6.1f}  {k[:110]}" for k, d, c, n in rows[:60]
        ]
        Path(f"{stem}-kernels.txt").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
