"""Accuracy of 8-bit host KV (fp8 e4m3 / int8, per-block scales) against bf16 KV.

One Worker in this process runs the same prompt and greedy generation twice per host dtype:
the reference keeps every KV block on the device (the model's dtype); the spilled run moves every
full block to the host tier as soon as the scheduler's invariant allows (full and before the
step's first position), so almost all attention reads host blocks, stored in the host dtype.

* max logit error: teacher-forced (the spilled run is fed the reference's tokens), the largest
  ``|logit - logit_ref|`` over the prompt's last position and every decode step, beside the
  largest ``|logit_ref|`` for scale;
* greedy agreement: free-running, how many of the ``--new-tokens`` generated tokens equal the
  reference's (and the first position where they differ).

A bf16 host tier is run too: it must agree exactly (the tiers never change results).

    python scripts/kv8bit_accuracy.py --model demo-small --prompt-len 512 --new-tokens 128

Writes ``benchmarks/results/kv8bit-accuracy-<device>.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import time
from pathlib import Path

import torch
from _command import command_line  # scripts/: the result's command line

from runtime.loader import resolve_model
from runtime.worker import Worker
from runtime.worker_config import WorkerConfig
from scheduler.batch import ScheduledBatch, SeqChunk
from scheduler.config import SchedulerConfig
from scheduler.request import SamplingParams

GREEDY = SamplingParams(max_new_tokens=1 << 20)


def make_worker(args, host_dtype: str | None, device_blocks: int, host_blocks: int) -> Worker:
    source = resolve_model(args.model)
    limits = SchedulerConfig(block_size=args.block_size, prefill_chunk=args.chunk)
    limits = limits.for_model(source.config.max_position_embeddings)
    cfg = WorkerConfig(
        model=args.model,
        device=args.device,
        dtype=args.dtype,
        attention=args.attention,
        kv_host_dtype=host_dtype or "auto",
        spill="stream",
    )
    w = Worker(cfg, source, limits)
    w.init_device()
    w.load_model()
    # room to stage every host block: all of them are streamed (no CPU part, no merge), so the
    # only difference from the reference is the host dtype
    w._staging_blocks = lambda d: host_blocks
    w.init_kv_cache(device_blocks, host_blocks)
    return w


def generate(w: Worker, prompt, n_new, spill: bool, forced=None):
    """Greedy generation of one sequence; with ``spill`` every full block before the step goes
    to the host. ``forced``: feed these tokens instead of the sampled ones. Returns (tokens,
    logits rows of the sampling steps)."""
    bs = w.limits.block_size
    D = w.kv.num_blocks
    table: list[int] = []
    next_dev, next_host = 0, D
    tokens, logits = [], []
    seq = list(prompt)
    pos, step = 0, 0
    while len(tokens) < n_new:
        if pos < len(prompt):
            chunk = seq[pos : min(pos + w.limits.prefill_chunk, len(prompt))]
        else:
            chunk = [forced[len(tokens) - 1] if forced is not None else tokens[-1]]
        swaps = []
        if spill:  # every full block before this step's first position, to the host
            for i in range(pos // bs):
                if table[i] < D:
                    swaps.append((table[i], next_host))
                    table[i] = next_host
                    next_host += 1
        end = pos + len(chunk)
        while len(table) * bs < end:
            table.append(next_dev)
            next_dev += 1
        last = end == len(prompt) or pos >= len(prompt)
        c = SeqChunk(0, tuple(chunk), pos, tuple(table), last, GREEDY)
        r = w.execute(ScheduledBatch(step, (c,), swaps=tuple(swaps)), logits="sampled")
        if last:
            tokens.append(r.sampled[0])
            logits.append(r.logits[0].float())
        pos, step = end, step + 1
    return tokens, torch.stack(logits)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="demo-small")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--attention", default="torch")
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--chunk", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    args = p.parse_args()

    torch.manual_seed(args.seed)
    vocab = resolve_model(args.model).config.vocab_size
    prompt = torch.randint(0, vocab, (args.prompt_len,)).tolist()
    n = args.new_tokens
    blocks = -(-(args.prompt_len + n) // args.block_size) + 1
    t0 = time.perf_counter()
    ref_w = make_worker(args, None, blocks, 0)
    ref_tokens, ref_logits = generate(ref_w, prompt, n, spill=False)
    scale = ref_logits.abs().max().item()
    rows = []
    for host_dtype in ("bfloat16" if args.dtype == "bfloat16" else "auto", "fp8", "int8"):
        w = make_worker(args, host_dtype, blocks, blocks)
        _, forced_logits = generate(w, prompt, n, spill=True, forced=ref_tokens)
        w = make_worker(args, host_dtype, blocks, blocks)
        free_tokens, _ = generate(w, prompt, n, spill=True)
        same = [a == b for a, b in zip(ref_tokens, free_tokens)]
        err = (forced_logits - ref_logits).abs()
        row = {
            "host_dtype": host_dtype,
            "max_logit_error": err.max().item(),
            "mean_logit_error": err.mean().item(),
            "max_abs_logit": scale,
            "teacher_forced_top1_agreement": int(
                (forced_logits.argmax(-1) == ref_logits.argmax(-1)).sum()
            ),
            "greedy_agreement": sum(same),
            "first_divergence": same.index(False) if False in same else None,
            "new_tokens": n,
        }
        rows.append(row)
        print(
            f"{host_dtype:>9}: max |dlogit| {row['max_logit_error']:.4f} "
            f"(mean {row['mean_logit_error']:.5f}, max |logit| {scale:.2f}); "
            f"teacher-forced top-1 {row['teacher_forced_top1_agreement']}/{n}; "
            f"greedy {row['greedy_agreement']}/{n} (first divergence: {row['first_divergence']})"
        )
    result = {
        "benchmark": "8-bit host KV accuracy (scripts/kv8bit_accuracy.py)",
        "command": command_line(),
        "device": platform.processor() or platform.machine(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "settings": vars(args),
        "reference": f"all KV on the device in {args.dtype}",
        "seconds": round(time.perf_counter() - t0, 1),
        "rows": rows,
    }
    out = Path(args.out or f"benchmarks/results/kv8bit-accuracy-{args.device}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
