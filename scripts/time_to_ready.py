"""Time to ready of ``tilerun run``: seconds from the shell's start stamp to the driver's checks
(its imports done), the executor's wait for Ray, Ray ready, engine ready and the first step done
(the first progress callback), with the executor's bring-up phases (``bring_up_s``), printed as
one JSON line.

    START=$(date +%s.%N) python scripts/time_to_ready.py run --model llama2-7b --device cuda \\
        --prompt-token-ids 1,2,3,4 --max-new-tokens 2

``START`` (seconds since the epoch) is taken by the shell before Python starts, so the
interpreter's own start-up counts; without it the clock starts at this script's first line.
"""

from __future__ import annotations

import json
import os
import sys
import time

T0 = float(os.environ.get("START", time.time()))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
marks: dict[str, float] = {}


def _mark(name: str) -> None:
    marks.setdefault(name, round(time.time() - T0, 2))


def main() -> int:
    import cluster.ray_cluster as rc

    ensure_ray = rc.ensure_ray

    def timed_ensure_ray(*a, **k):
        _mark("ray_wait_begin_s")
        out = ensure_ray(*a, **k)
        _mark("ray_ready_s")
        return out

    rc.ensure_ray = timed_ensure_ray  # the executor looks it up here when it starts

    import cluster.cli as cli
    import cluster.engine as eng
    import cluster.preflight as pre

    check_engine = pre.check_engine

    def timed_check_engine(*a, **k):
        _mark("checks_begin_s")  # the driver's imports are done
        out = check_engine(*a, **k)
        _mark("checks_done_s")
        return out

    pre.check_engine = timed_check_engine

    generate = eng.Engine.generate

    def timed_generate(self, prompts, params, on_progress=None, *a, **k):
        _mark("engine_ready_s")
        marks.setdefault("bring_up_s", dict(getattr(self.executor, "bring_up_s", {})))

        def progress(p):
            _mark("first_step_s")
            if on_progress is not None:
                on_progress(p)

        return generate(self, prompts, params, progress, *a, **k)

    eng.Engine.generate = timed_generate
    code = cli.main(sys.argv[1:])
    print("READY " + json.dumps(marks), flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
