"""Start-up objects out of the cyclic garbage collector's way, for as long as they live.

A process that has imported torch and Triton (and Ray) and built a model holds ~200K objects the
cyclic collector tracks. Its full (generation 2) pass walks every one of them: ~100 ms on the
2-core development CPU, and one decode step stalled for 124 ms in the demo on an H200 (the
demo's 64-token decode then read 351 tokens/s instead of ~900). Passes come whenever enough new
containers have survived, and a decode step makes some (block-table tuples, results). Freezing
moves what exists after start-up into a permanent generation that those passes skip; what is
allocated later is collected as before.

Frozen objects are never collected, so whoever froze unfreezes at shutdown (an engine's cycles
would otherwise outlive it in a process that makes several, as tests and notebooks do), and at
exit (extension modules such as Triton's report the objects still alive then as leaks).
"""

from __future__ import annotations

import atexit
import gc

_at_exit = False


def freeze_startup_objects() -> int:
    """Collect the young generations, then freeze every tracked object; returns how many are
    frozen. Called once a worker has warmed up and once an engine is ready."""
    global _at_exit
    gc.collect(1)  # start-up's short-lived garbage is not worth keeping for the process's life
    gc.freeze()
    if not _at_exit:
        atexit.register(gc.unfreeze)
        _at_exit = True
    return gc.get_freeze_count()


def unfreeze_startup_objects() -> None:
    """Back into the collected generations (an engine or worker shutting down): what became
    garbage with it is collected by the next full pass."""
    gc.unfreeze()
