"""``tilerun`` command line.

tilerun run --model demo-small --prompt-file long.txt --max-new-tokens 32 --json
tilerun run job.yaml
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

from scheduler.errors import TilerunError


def _run_parser(sub) -> None:
    p = sub.add_parser("run", help="run one inference task")
    p.add_argument("job", nargs="?", help="a job YAML file (flags given too override its fields)")
    p.add_argument("--model", help="preset name or HF checkpoint directory (default demo-small)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt")
    src.add_argument("--prompt-file")
    src.add_argument("--prompt-token-ids", help="comma-separated token ids, e.g. 1,2,3")
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-p", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="auto|cpu|cuda|npu")
    p.add_argument("--attention", help="auto|torch|sdpa|triton")
    p.add_argument("--prefill-chunk", type=int, help="tokens per prefill step (outer tiling)")
    p.add_argument("--dtype", help="auto|float32|bfloat16|float16")
    p.add_argument("--tp", type=int, help="tensor-parallel size: one worker per device")
    p.add_argument("--comm", help="auto|nccl|hccl|gloo|mpi")
    p.add_argument("--no-overlap", action="store_true", help="plain AllReduce, no tiling")
    p.add_argument(
        "--no-cuda-graphs", action="store_true", help="decode eagerly, without CUDA graphs"
    )
    p.add_argument("--allreduce-tiles", type=int)
    p.add_argument("--kv-cache-tokens", type=int)
    p.add_argument("--max-model-len", type=int)
    p.add_argument("--block-size", type=int)
    p.add_argument("--executor", choices=["ray", "local"], default="ray")
    p.add_argument("--ray-address", help="attach to this Ray cluster instead of starting one")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--quiet", action="store_true", help="no progress lines")


def cmd_run(args: argparse.Namespace) -> int:
    from cluster.job import PROMPT_FIELDS, build_job, load_job_values

    values, where = load_job_values(args.job) if args.job else ({}, {})
    flags = {
        "model": args.model,
        "prompt": args.prompt,
        "prompt_file": args.prompt_file,
        "prompt_token_ids": args.prompt_token_ids,
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "seed": args.seed,
        "device": args.device,
        "attention": args.attention,
        "prefill_chunk": args.prefill_chunk,
        "dtype": args.dtype,
        "tp": args.tp,
        "comm": args.comm,
        "allreduce_tiles": args.allreduce_tiles,
        "kv_cache_tokens": args.kv_cache_tokens,
        "max_model_len": args.max_model_len,
        "block_size": args.block_size,
    }
    if args.no_overlap:
        flags["overlap"] = False
    if args.no_cuda_graphs:
        flags["cuda_graphs"] = False
    # a prompt given as a flag replaces the file's prompt, whichever form either takes
    if any(flags[k] is not None for k in PROMPT_FIELDS):
        for k in PROMPT_FIELDS:
            values.pop(k, None)
    for k, v in flags.items():
        if v is not None:
            values[k] = v
            where.pop(k, None)  # a flag's error has no file line
    job = build_job(values, where)

    from cluster.api import LLM

    progress = None if (args.quiet or args.json) else _progress_printer()
    t0 = time.perf_counter()
    llm = LLM(
        executor=args.executor,
        ray_address=args.ray_address,
        **{k: getattr(job.engine, k) for k in job.engine.field_names()},
    )
    try:
        prompt = list(job.prompt_token_ids) if job.prompt_token_ids else job.prompt
        out = llm.generate(prompt, job.sampling, on_progress=progress)[0]
        devices = llm.engine.device_infos
    finally:
        llm.shutdown()
    m = dict(out.metrics)
    result = {
        "token_ids": out.token_ids,
        "text": out.text,
        "finish_reason": out.finish_reason,
        "metrics": m,
        "devices": devices,
        "wall_s": time.perf_counter() - t0,
    }
    if args.json:
        print(json.dumps(result))
    else:
        _print_summary(result)
    return 0


def _progress_printer():
    def show(p) -> None:
        if p.prefill_done < p.prefill_total or p.generated <= 1:
            pct = 100 * p.prefill_done / max(p.prefill_total, 1)
            print(
                f"\rprefill {p.prefill_done}/{p.prefill_total} tokens ({pct:3.0f}%) "
                f"{p.elapsed_s:6.1f}s",
                end="",
                file=sys.stderr,
                flush=True,
            )
        else:
            print(
                f"\rdecode  {p.generated} tokens{' ' * 24}{p.elapsed_s:6.1f}s",
                end="",
                file=sys.stderr,
                flush=True,
            )

    return show


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _print_summary(r: dict) -> None:
    m = r["metrics"]
    print(file=sys.stderr)
    print(f"devices: {', '.join(d['device'] + ' ' + d['name'] for d in r['devices'])}")
    print(
        f"generated {m['generated_tokens']} tokens ({r['finish_reason']}): {r['token_ids'][:16]}..."
    )
    if r["text"]:
        print(f"text: {r['text'][:200]!r}")

    def rate(x):
        return f"{x:,.1f}" if x else "-"

    print(
        f"prompt {m['prompt_tokens']} tokens | prefill {rate(m['prefill_tokens_per_s'])} tok/s | "
        f"TTFT {m['ttft_s']:.2f} s | decode {rate(m['decode_tokens_per_s'])} tok/s | "
        f"peak memory {_fmt_bytes(m['peak_memory_bytes'])}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tilerun", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    _run_parser(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return {"run": cmd_run}[args.cmd](args)
    except TilerunError as e:
        print(f"tilerun: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
