"""The README's demo: one long-context task on an embedded local Ray cluster.

A synthetic Llama preset (random weights from a fixed seed, sized for a 2-core CPU) reads a long
generated document through chunked prefill over the paged KV cache, then generates. Prints
progress during prefill, then prefill/decode tokens per second, time to first token and peak
memory of the worker.
"""

from __future__ import annotations

import argparse
import sys

from cluster import LLM, SamplingParams
from scheduler.errors import TilerunError


def long_document(num_tokens: int) -> list[int]:
    """A document of exactly ``num_tokens`` byte tokens (BOS + text), with a fact to find."""
    lines = []
    i = 0
    while sum(len(s) + 1 for s in lines) < num_tokens:
        lines.append(f"Section {i}: the tiles of block {i * 7 % 97} are reduced in order {i % 13}.")
        i += 1
    lines.insert(len(lines) // 2, "Remember: the secret key is 4417.")
    text = "\n".join(lines)
    ids = [256, *text.encode()]  # ByteTokenizer: BOS then bytes
    return ids[:num_tokens]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="demo-small")
    ap.add_argument("--prompt-tokens", type=int, default=12288)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--attention", default="auto")
    ap.add_argument(
        "--prefill-chunk", type=int, default=None, help="tokens per step (default: by device)"
    )
    ap.add_argument("--tp", type=int, default=1)
    args = ap.parse_args()
    for flag in ("prompt_tokens", "new_tokens", "prefill_chunk", "tp"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            name = flag.replace("_", "-")
            print(
                f"demo: error: --{name} must be at least 1, got {getattr(args, flag)}",
                file=sys.stderr,
            )
            return 2
    if args.prompt_tokens < 8192:
        print("note: a long-context demo uses at least 8192 prompt tokens", file=sys.stderr)

    print(f"starting an embedded Ray cluster and {args.tp} worker(s) for {args.model} ...")
    with LLM(
        model=args.model,
        device=args.device,
        attention=args.attention,
        prefill_chunk=args.prefill_chunk,
        tp=args.tp,
        max_model_len=args.prompt_tokens + args.new_tokens,
        max_num_seqs=1,
    ) as llm:
        info = llm.engine.device_infos[0]
        print(llm.ready_line)
        cluster = llm.engine.executor.cluster
        if cluster.get("dashboard"):
            print(f"Ray dashboard (token auth): {cluster['dashboard']}")
        elif cluster.get("dashboard_off"):
            print(f"Ray dashboard: {cluster['dashboard_off']}")
        prompt = long_document(args.prompt_tokens)

        def progress(p) -> None:
            if p.prefill_done < p.prefill_total or p.generated == 1:
                bar = "#" * int(30 * p.prefill_done / p.prefill_total)
                print(
                    f"\r  prefill [{bar:<30}] {p.prefill_done:>6}/{p.prefill_total} tokens "
                    f"{p.elapsed_s:6.1f}s",
                    end="" if p.prefill_done < p.prefill_total else "\n",
                    flush=True,
                )
            elif p.generated % 8 == 0:
                print(f"  decode  {p.generated} tokens {p.elapsed_s:6.1f}s", flush=True)

        params = SamplingParams(max_new_tokens=args.new_tokens, temperature=0.0)
        out = llm.generate(prompt, params, on_progress=progress)[0]
    m = out.metrics
    print()
    print(f"prompt tokens        {m['prompt_tokens']:>10,}")
    print(f"generated tokens     {m['generated_tokens']:>10,}  ({out.finish_reason})")
    print(f"prefill              {m['prefill_tokens_per_s']:>10,.1f} tokens/s")
    print(f"time to first token  {m['ttft_s']:>10.2f} s")
    print(f"decode               {m['decode_tokens_per_s'] or 0:>10,.1f} tokens/s")
    print(
        f"peak memory          {m['peak_memory_bytes'] / 2**20:>10,.1f} MiB (worker, {info['device']})"
    )
    print(f"first tokens         {out.token_ids[:12]}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except TilerunError as e:
        print(f"demo: error: {e}", file=sys.stderr)
        sys.exit(2)
