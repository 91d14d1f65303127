"""Ray's environment, set the way ``ray start`` sets it, before Ray is imported.

``ray start`` turns token authentication on when a token exists
(``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``), but a
driver that joins with ``ray.init(address=...)`` does not by itself, and Ray
reads its documented switch ``RAY_AUTH_MODE`` only once, when ``ray`` is
imported.  So ``renderer.pool`` calls this before its ``import ray``; a value
the user set is left alone.
"""

from __future__ import annotations

import os
from pathlib import Path


def token_auth_like_ray_start() -> bool:
    """Set ``RAY_AUTH_MODE=token`` when a Ray token exists and the user set no mode; True if set."""
    if "RAY_AUTH_MODE" in os.environ:
        return False
    token_file = os.environ.get("RAY_AUTH_TOKEN_PATH") or str(Path.home() / ".ray" / "auth_token")
    if os.environ.get("RAY_AUTH_TOKEN") or os.path.isfile(token_file):
        os.environ["RAY_AUTH_MODE"] = "token"
        return True
    return False
