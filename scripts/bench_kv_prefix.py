"""What a saved prompt KV costs and what it saves (``runtime.kv_prefix``, the service's re-runs).

For each context S, one engine (local worker) runs the same S random prompt tokens three times,
batch 1, greedy:

* ``compute``: prefill as usual (the peer: what a re-run costs without a saved prefix, the same
  as any runtime that re-prefills);
* ``save``: the same, the prompt's KV written to disk at the end of the prefill (the save sits in
  the prefill's last step, so ``ttft`` grows by its time, ``save_s``, timed around the call);
* ``restore``: a re-run that reads the S-1 saved positions (the file's pages first evicted from
  the page cache, as after the machine's memory went to other work) and computes the last one;
* ``split``: no file, the prefill's budget cut to S-1 tokens for one run, so the last position is
  computed alone as after a restore. Where ``restore`` parts from ``compute``, ``split`` says
  why: the same tokens as ``restore`` means the file gave back the computed rows and the last
  position's lone step (other matrix shapes, another rounding) moved the tokens.

Time to first token of each, the file's bytes, the write rate (bound: the same bytes written
with one ``write`` and ``fsync`` here, ``disk_write_bytes_per_s``) and the restore's read rate,
and whether the three runs' tokens agree.

    python scripts/bench_kv_prefix.py --model demo-small --contexts 1024 4096 8192
    python scripts/bench_kv_prefix.py --model llama3-8b --device cuda --contexts 32768 131072

Writes ``benchmarks/results/kv-prefix-<device>.json`` (command, device, date, rows).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
from _command import command_line, write_result  # scripts/: the result's command line

from cluster.config import EngineConfig
from cluster.engine import Engine
from runtime import kv_prefix
from scheduler.request import SamplingParams


def disk_write_rate(directory: Path, nbytes: int) -> float:
    """Bytes/s of one large write + fsync of ``nbytes`` (at most 4 GiB) in ``directory``."""
    n = min(nbytes, 4 << 30)
    buf = os.urandom(1 << 20) * (n >> 20)
    path = directory / "rate.bin"
    t = time.perf_counter()
    with open(path, "wb") as f:
        f.write(buf)
        f.flush()
        os.fsync(f.fileno())
    dt_s = time.perf_counter() - t
    path.unlink()
    return len(buf) / dt_s


SAVES: list[float] = []  # seconds of each prefix save (the local worker calls kv_prefix.save)
_save = kv_prefix.save


def _timed_save(*a, **kw):
    t = time.perf_counter()
    try:
        return _save(*a, **kw)
    finally:
        SAVES.append(time.perf_counter() - t)


kv_prefix.save = _timed_save


def run_once(engine: Engine, prompt: list[int], new: int, **prefix):
    """Tokens, time to first token, and the logits each token was picked from."""
    seq = engine.add_request(prompt, SamplingParams(max_new_tokens=new), **prefix)
    t0 = time.perf_counter()
    ttft = None
    rows = []
    while engine.steps.has_work:
        for step in engine.steps.advance("sampled") or ():
            if seq.seq_id in step.result.logits:
                rows.append(step.result.logits[seq.seq_id])
        if ttft is None and seq.output_ids:
            ttft = time.perf_counter() - t0
    return list(seq.output_ids), ttft, rows


def run_split(engine: Engine, prompt: list[int], new: int):
    """``run_once`` with the prefill's token budget cut to len(prompt) - 1 for this run."""
    sched = engine.scheduler
    whole = sched.config
    sched.config = dataclasses.replace(whole, prefill_chunk=len(prompt) - 1)
    try:
        return run_once(engine, prompt, new)
    finally:
        sched.config = whole


def difference(ref: list[int], ref_logits: list, got: list[int]) -> dict | None:
    """Where ``got`` parts from ``ref``: the step, and the gap between the two tokens' logits in
    the reference's row there (against its best logit: a gap within the dtype's rounding of
    that logit is a near tie, which another summation order can flip)."""
    d = next((i for i, (a, b) in enumerate(zip(ref, got)) if a != b), None)
    if d is None:
        return None
    row = ref_logits[d].float().flatten()
    return {
        "first_difference": d,
        "logit_gap": float(row[ref[d]] - row[got[d]]),
        "best_logit": float(row[ref[d]]),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="demo-small")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 8192])
    ap.add_argument("--new-tokens", type=int, default=4)
    ap.add_argument("--dir", help="where the prefix files go (default: a temporary directory)")
    ap.add_argument("--out")
    args = ap.parse_args()
    top = max(args.contexts)
    cfg = EngineConfig.from_dict(
        {
            "model": args.model,
            "device": args.device,
            "executor": "local",
            "max_model_len": top + args.new_tokens + 16,
            "kv_cache_tokens": top + args.new_tokens + 64,
            "overlap_schedule": False,
        }  # fmt: skip
    )
    engine = Engine(cfg)
    info = engine.device_infos[0]
    print(engine.ready_line(0.0))
    root = Path(args.dir or tempfile.mkdtemp(prefix="kv-prefix-"))
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    vocab = engine.model_config.vocab_size
    try:
        for s in args.contexts:
            g = torch.Generator().manual_seed(s)
            prompt = torch.randint(0, vocab, (s,), generator=g).tolist()
            stem = root / f"bench-{s}"
            run_once(engine, prompt, 1)  # warm: this length's kernels, tunings and plans
            a, t_compute, a_logits = run_once(engine, prompt, args.new_tokens)
            b, t_save, _ = run_once(engine, prompt, args.new_tokens, save_prefix=(str(stem), "k"))
            path = kv_prefix.rank_path(stem, 0)
            nbytes = path.stat().st_size
            with open(path, "rb") as f:  # cold: the file's pages out of the page cache
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            c, t_restore, _ = run_once(
                engine, prompt, args.new_tokens, restore_prefix=(str(stem), s)
            )
            d, _, _ = run_split(engine, prompt, args.new_tokens)
            disk = disk_write_rate(root, nbytes)
            path.unlink()
            save_s = SAVES.pop()
            row = {
                "context": s,
                "ttft_compute_s": t_compute,
                "ttft_save_s": t_save,
                "save_s": save_s,
                "ttft_restore_s": t_restore,
                "restore_speedup": t_compute / t_restore,
                "file_bytes": nbytes,
                "write_bytes_per_s": nbytes / save_s if save_s > 0 else None,
                "disk_write_bytes_per_s": disk,
                "restore_read_bytes_per_s": nbytes / t_restore,
                "same_tokens": a == b == c,
                "save_differs": difference(a, a_logits, b),
                "restore_differs": difference(a, a_logits, c),
                "split_differs": difference(a, a_logits, d),
                "restore_equals_split": c == d,
            }
            rows.append(row)
            print(
                f"{s:>8}  compute {t_compute:7.3f}s  save +{save_s:6.3f}s "
                f"({nbytes / 2**30:.2f} GiB, {row['write_bytes_per_s'] or 0:.2e} B/s; disk "
                f"{disk:.2e})  restore {t_restore:7.3f}s = {row['restore_speedup']:.1f}x  "
                f"same tokens {row['same_tokens']}, restore = split {row['restore_equals_split']}",
                flush=True,
            )
            for k in ("save_differs", "restore_differs", "split_differs"):
                if row[k]:
                    print(f"          {k}: {row[k]}", flush=True)
    finally:
        engine.shutdown()
    kind = "cpu" if info["device"] == "cpu" else info["name"].replace(" ", "-").lower()
    result = {
        "benchmark": "kv_prefix",
        "command": command_line(),
        "device": info["name"],
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "model": args.model,
        "prefill_chunk": engine.config.scheduler.prefill_chunk,
        "prefix_dir": str(root),
        "rows": rows,
    }
    write_result(result, args.out, f"benchmarks/results/kv-prefix-{args.model}-{kind}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
