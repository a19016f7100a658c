"""Start-up objects out of the cyclic garbage collector's way.

A process that has imported torch and Triton (and Ray) and built a model holds ~200K objects the
cyclic collector tracks. Its full (generation 2) pass walks every one of them: ~100 ms on the
2-core development CPU, and one decode step stalled for 124 ms in the demo on an H200 (the
demo's 64-token decode then read 351 tokens/s instead of ~900). Passes come whenever enough new
containers have survived, and a decode step makes some (block-table tuples, results). Freezing
moves what exists after start-up into a permanent generation that those passes skip; what is
allocated later is collected as before.
"""

from __future__ import annotations

import gc


def freeze_startup_objects() -> int:
    """Collect the young generations, then freeze every tracked object; returns how many are
    frozen. Called once a worker has warmed up and once an engine is ready."""
    gc.collect(1)  # start-up's short-lived garbage is not worth keeping for the process's life
    gc.freeze()
    return gc.get_freeze_count()
