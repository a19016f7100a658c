"""Ray's authentication token, found where Ray itself looks, so tilerun's pages share Ray's login.

Ray 2.60 turns token authentication on for new local clusters and reads the token, in order, from
the ``RAY_AUTH_TOKEN`` environment variable, the file named by ``RAY_AUTH_TOKEN_PATH``, and
``~/.ray/auth_token`` (written by ``ray.init()`` or ``ray get-auth-token --generate``).
"""

from __future__ import annotations

import os
from pathlib import Path

from scheduler.errors import ConfigError

NO_TOKEN = (
    "no Ray authentication token found (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token) "
    "to guard the status page; fix: start the cluster with ray.init()/`tilerun up`, or run "
    "`ray get-auth-token --generate`, or set RAY_AUTH_TOKEN"
)


def ray_auth_token() -> str:
    """The token Ray's dashboard and API accept; ``ConfigError`` naming the fix when there is none."""
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if path and not os.environ.get("RAY_AUTH_TOKEN", "").strip() and not _read(path):
        raise ConfigError(
            f"RAY_AUTH_TOKEN_PATH={path} cannot be read or is empty; fix: point it at the "
            "cluster's token file, or unset it to use ~/.ray/auth_token"
        )
    token = _from_ray() or _from_env_or_file()
    if not token:
        raise ConfigError(NO_TOKEN)
    return token


def _from_ray() -> str | None:
    # Ray's own loader (C++, cached): the same source and parsing Ray's servers use.
    try:
        from ray._raylet import AuthenticationTokenLoader
    except ImportError:  # a Ray without token auth, or a moved private API: read it ourselves
        return None
    loader = AuthenticationTokenLoader.instance()
    loader.reset_cache()  # the token may have been written since Ray first looked
    try:
        if not loader.has_token(ignore_auth_mode=True):
            return None
        return (loader.get_raw_token(ignore_auth_mode=True) or "").strip() or None
    except Exception:  # Ray's AuthenticationError: fall back to reading the sources directly
        return None


def _from_env_or_file() -> str | None:
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return os.environ["RAY_AUTH_TOKEN"].strip()
    return _read(os.environ.get("RAY_AUTH_TOKEN_PATH") or str(Path.home() / ".ray" / "auth_token"))


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip() or None
    except OSError:
        return None
