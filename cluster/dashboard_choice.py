"""Whether a cluster tilerun starts gets Ray's dashboard, and why not where it gets none.

Ray's dashboard needs packages that only ``ray[default]`` installs (aiohttp, grpc,
opentelemetry...). Asked to start one without them, Ray logs an error and refuses to start the
cluster at all. So the default (``TILERUN_DASHBOARD`` unset) starts it only where those
packages import, and otherwise starts the cluster without it and says why; ``TILERUN_DASHBOARD=0``
never starts it; ``TILERUN_DASHBOARD=1`` insists, and a missing package is then a one-line error
naming the fix.
"""

from __future__ import annotations

import importlib
import os

from scheduler.errors import ConfigError

FIX = "Fix: pip install 'ray[default]' (or TILERUN_DASHBOARD=0 to start none)"


def missing_packages() -> str | None:
    """What keeps Ray's dashboard from starting here (Ray's own list of its imports), or None."""
    try:
        importlib.import_module("ray.dashboard.optional_deps")
    except ImportError as e:
        return str(e)
    return None


def choose_dashboard() -> tuple[bool, str | None]:
    """``(start it, why not)``: the second is a line for the user where it is off."""
    wanted = os.environ.get("TILERUN_DASHBOARD")
    if wanted == "0":
        return False, "off (TILERUN_DASHBOARD=0)"
    gap = missing_packages()
    if gap is None:
        return True, None
    if wanted is not None:
        raise ConfigError(
            f"TILERUN_DASHBOARD={wanted} asks for Ray's dashboard, but its packages are "
            f"missing here ({gap}); {FIX}"
        )
    return False, f"off: its packages are missing ({gap}); {FIX}"
