"""Where the studio keeps things by default, and which hosts are this machine.

Only the standard library here: the PySpark kernel imports this at start-up, where every
millisecond counts, to find the local studio's token (see ``studio.auth.credentials``).
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path


def default_state_dir() -> Path:
    """``$STUDIO_STATE_DIR``, else ``$XDG_STATE_HOME/spark-studio`` (``~/.local/state/spark-studio``)."""
    if os.environ.get("STUDIO_STATE_DIR"):
        return Path(os.environ["STUDIO_STATE_DIR"]).expanduser()
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "spark-studio"


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "spark-studio"


def default_root() -> Path:
    return Path(os.path.expanduser("~")) / "spark-studio"


def is_loopback(host: str) -> bool:
    """True when ``host`` names only this machine (127.0.0.0/8, ::1 or localhost)."""
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
