"""Launch the service from Python, submit a batch of long-context tasks, wait for them.

    python scripts/service/batch.py --model demo-small --device cpu --tasks 4 --context 8192
    python scripts/service/batch.py --cluster cluster.yaml --tasks 16 --context 65536   # a GPU box
    python scripts/service/batch.py --attach --home ~/.tilerun                        # already up

Each task is a different long prompt (token ids, so no tokenizer is needed); the script prints
each result's prefill rate and time to first token as it lands, and leaves the service running
with ``--keep`` (else it stops it, along with the Ray head it started).
"""

from __future__ import annotations

import argparse
import json
import random
import time

from cluster.service.client import Service


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cluster", help="a cluster YAML file (engine fields, max_attempts, num_cpus)")
    ap.add_argument("--model", default="demo-small")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--home", help="state directory (default $TILERUN_HOME or ~/.tilerun)")
    ap.add_argument("--attach", action="store_true", help="use the service already up in --home")
    ap.add_argument("--tasks", type=int, default=4)
    ap.add_argument("--context", type=int, default=8192, help="prompt tokens per task")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--keep", action="store_true", help="leave the service up afterwards")
    args = ap.parse_args()

    t0 = time.perf_counter()
    if args.attach:
        svc = Service(args.home)
    elif args.cluster:
        svc = Service.up(args.cluster, home=args.home)
    else:
        limit = args.context + args.max_new_tokens
        svc = Service.up(home=args.home, model=args.model, device=args.device, max_model_len=limit)
    print(f"service ready in {time.perf_counter() - t0:.1f}s: {json.dumps(svc.urls())}")

    vocab = svc.engine_info()["vocab_size"]
    rng = random.Random(0)
    ids = [
        svc.submit(
            prompt_token_ids=[rng.randrange(vocab) for _ in range(args.context)],
            max_new_tokens=args.max_new_tokens,
        )
        for _ in range(args.tasks)
    ]
    print(f"submitted {len(ids)} tasks of {args.context} tokens: {' '.join(ids)}")
    for tid in ids:
        r = svc.result(tid, wait=True)
        m = r["metrics"]
        print(
            f"{tid}: {m['generated_tokens']} tokens, prefill {m['prefill_tokens_per_s'] or 0:,.0f} "
            f"tok/s, submit->first token {m['submit_to_first_token_s']:.2f}s, attempts {r['attempts']}"
        )
    if not args.keep and not args.attach:
        svc.down()


if __name__ == "__main__":
    main()
