"""What the plugin reads from the environment: its on/off switches and where caches go."""
from __future__ import annotations

import os
from pathlib import Path


def env_flag(name: str) -> bool:
    """Whether switch ``name`` is set: any value but empty, 0, false or no turns it on."""
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


def cache_root() -> Path:
    """``$XDG_CACHE_HOME``, by default ``~/.cache``."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
