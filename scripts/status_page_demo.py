"""Watch a real run on the tilerun status page: long prompts run one after another on Ray.

    python scripts/status_page_demo.py                    # prints the page's URL; Ctrl-C stops
    python scripts/status_page_demo.py --screenshot docs/status-page.png   # the README's picture

The page is served behind Ray's token (open the printed URL with ``?token=$(ray get-auth-token)``).
With ``--screenshot`` the third task is held halfway through its prefill while headless Chromium
takes the picture, so it shows finished, running and queued tasks from the run itself.
"""

from __future__ import annotations

import argparse
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cluster import LLM, SamplingParams  # noqa: E402
from cluster.service.ray_token import ray_auth_token  # noqa: E402
from cluster.service.run_snapshot import RunSnapshot  # noqa: E402
from cluster.service.status_page import StatusPage  # noqa: E402
from scripts.demo import long_document  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="demo-small")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--prompt-tokens", type=int, nargs="+", default=[6144, 3072, 8192, 2048])
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--prefill-chunk", type=int, default=512)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--screenshot", help="write a PNG of the page taken mid-run, then finish")
    args = ap.parse_args()

    llm = LLM(model=args.model, device=args.device, prefill_chunk=args.prefill_chunk)
    hold_id = "t3" if len(args.prompt_tokens) >= 3 else "t1"
    held, release = threading.Event(), threading.Event()

    def on_step(task_id, p) -> None:
        half = p.prefill_done * 2 >= p.prefill_total
        if args.screenshot and task_id == hold_id and half and not held.is_set():
            held.set()
            release.wait(600)

    run = RunSnapshot(llm, on_step=on_step)
    for n in args.prompt_tokens:
        run.submit(long_document(n), SamplingParams(max_new_tokens=args.new_tokens))
    with StatusPage(run.snapshot, port=args.port, task_fn=run.task_view) as page:
        print(f"status page: {page.url}  (Ray's token: {page.url}?token=$(ray get-auth-token))")
        runner = threading.Thread(target=run.run, daemon=True)
        runner.start()
        if args.screenshot:
            from tests.browser import screenshot

            held.wait()
            screenshot(f"{page.url}?token={ray_auth_token()}", args.screenshot, size=(1280, 760))
            print(f"wrote {args.screenshot}")
            release.set()
        try:
            runner.join()
            if not args.screenshot:
                print("all tasks done; the page stays up until Ctrl-C")
                threading.Event().wait()
        except KeyboardInterrupt:
            pass
    for t in run.snapshot()["tasks"]:
        print(f"{t['id']}: {t['state']}, {t['prefill_total']} prompt tokens, {t['generated']} new")
    llm.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
