"""The studio's secret and the browser cookies derived from it.

The token is ``STUDIO_TOKEN`` when set, otherwise generated at the first start and kept in
``<state_dir>/token`` with mode 0600, so ``studio serve`` and ``studio livy`` started on the same
state directory share it, and local clients can find it (``studio.auth.credentials``).

A browser exchanges the token once for a cookie that says who it is and until when, signed with
a key derived from the token (HMAC-SHA256): changing the token signs every browser out. The
cookie holds no secret, only the signature.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
import time
from pathlib import Path

TOKEN_FILE = "token"  # noqa: S105 - the file's name, not its content
# The start of every user's token (studio.auth.users), so people and secret scanners know one, and
# the gate looks only such secrets up in the users' directory.
TOKEN_PREFIX = "sst_"  # noqa: S105 - a marker, not a secret


def token_path(state_dir: Path) -> Path:
    return state_dir / TOKEN_FILE


def load_or_create_token(state_dir: Path, configured: str | None = None) -> str:
    """``configured`` if given, else the token kept in the state directory (created on first use)."""
    if configured:
        return configured
    path = token_path(state_dir)
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        # O_EXCL: when `studio serve` and `studio livy` start together, one writes and both read it.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    else:
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_urlsafe(32) + "\n")
    for _ in range(50):  # another process may be between creating and writing it
        token = path.read_text().strip()
        if token:
            if path.stat().st_mode & 0o077:
                os.chmod(path, 0o600)
            return token
        time.sleep(0.02)
    raise RuntimeError(f"{path} is empty; delete it and start again to generate a new token")


def same_secret(given: str, expected: str) -> bool:
    """Constant-time comparison, so the time a wrong guess takes says nothing about the token."""
    return hmac.compare_digest(given.encode("utf-8", "surrogateescape"), expected.encode("utf-8", "surrogateescape"))


def digest(secret: str) -> str:
    """SHA-256 of a secret, for keeping credentials that only need to be recognised, not read."""
    return hashlib.sha256(secret.encode()).hexdigest()


class CookieSigner:
    """Signs and checks ``<payload>.<signature>`` cookies: who the browser is and until when."""

    def __init__(self, token: str) -> None:
        self._key = hmac.new(token.encode(), b"spark-studio browser cookie v1", hashlib.sha256).digest()

    def sign(self, user: str, max_age: float) -> str:
        payload = _b64(json.dumps({"u": user, "exp": int(time.time() + max_age)}, separators=(",", ":")).encode())
        return f"{payload}.{_b64(self._mac(payload))}"

    def verify(self, value: str) -> str | None:
        """The user the cookie names, or None when it is forged, damaged or expired."""
        payload, _, signature = value.partition(".")
        if not payload or not signature:
            return None
        try:
            if not hmac.compare_digest(_unb64(signature), self._mac(payload)):
                return None
            data = json.loads(_unb64(payload))
        except (ValueError, TypeError):
            return None
        if not isinstance(data, dict) or not isinstance(data.get("u"), str) or not isinstance(data.get("exp"), int):
            return None
        return data["u"] if data["exp"] > time.time() else None

    def _mac(self, payload: str) -> bytes:
        return hmac.new(self._key, payload.encode(), hashlib.sha256).digest()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
