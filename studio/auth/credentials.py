"""What a client of the session service sends, found without asking the user.

In order: ``STUDIO_LIVY_TOKEN`` (with ``STUDIO_LIVY_USER`` for HTTP Basic against a Livy that
wants a user name), then ``STUDIO_TOKEN``, then, only for a service on this machine, the token
of the local studio in its state directory (``studio.paths.default_state_dir``). A token found
on disk is never sent to another machine: it would hand the local studio's secret to whoever
runs that server.

Standard library only (the kernel imports this while it starts).
"""

from __future__ import annotations

import base64
import os
from urllib.parse import urlsplit

from studio.paths import default_state_dir, is_loopback

# Environment variables that carry credentials; a child that runs user code must not inherit them.
SECRET_VARIABLES = ("STUDIO_TOKEN", "STUDIO_LIVY_TOKEN", "STUDIO_LIVY_USER", "STUDIO_KERNEL_TOKEN", "JUPYTER_TOKEN")


def local_token() -> str | None:
    path = default_state_dir() / "token"
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def credentials_for(url: str) -> tuple[str | None, str | None]:
    """(user, token) to send to the Livy endpoint at ``url``; (None, None) when there is nothing to send."""
    user = os.environ.get("STUDIO_LIVY_USER") or None
    token = os.environ.get("STUDIO_LIVY_TOKEN") or os.environ.get("STUDIO_TOKEN")
    if token:
        return user, token
    if is_loopback(urlsplit(url).hostname or ""):
        return None, local_token()
    return None, None


def authorization(user: str | None, token: str | None) -> str | None:
    """The ``Authorization`` header value: Basic when a user name is given, else Bearer."""
    if not token:
        return None
    if user:
        return "Basic " + base64.b64encode(f"{user}:{token}".encode()).decode("ascii")
    return f"Bearer {token}"


def without_secrets(env: dict[str, str]) -> dict[str, str]:
    """``env`` minus the variables that carry the studio's credentials."""
    return {key: value for key, value in env.items() if key not in SECRET_VARIABLES}
