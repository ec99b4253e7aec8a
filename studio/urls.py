"""URL hygiene shared by the Studio, the kernel and the workspace manager (standard library only).

* ``http_url``: only ``http``/``https`` URLs become links. A compute (any Livy URL) chooses its
  sessions' ``sparkUiUrl`` and ``driverLogUrl``, and a ``javascript:`` or ``data:`` URL in an
  ``href`` runs in the page that shows it.
* ``split_credentials``: a URL's ``user:password@`` taken out, so the URL can be stored, shown and
  logged while the secret travels only where it is needed.
"""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

LINK_SCHEMES = ("http", "https")


def http_url(value: object) -> str | None:
    """``value`` when it is an absolute http(s) URL with a host, else None (shown as no link)."""
    if not isinstance(value, str):
        return None
    text = value.strip()
    if any(ord(char) < 0x20 or char in "\\\x7f" for char in text):
        return None  # browsers drop tabs and newlines inside a scheme ("java\tscript:") and read \ as /
    try:
        parts = urlsplit(text)
    except ValueError:
        return None
    if parts.scheme.lower() not in LINK_SCHEMES or not parts.netloc:
        return None
    return text


def split_credentials(url: str) -> tuple[str, str | None, str | None]:
    """``(url without user info, user, password)`` of a URL with a scheme; other strings unchanged."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url, None, None
    if not parts.scheme or "@" not in parts.netloc:
        return url, None, None
    userinfo, _, hostport = parts.netloc.rpartition("@")
    user, colon, password = userinfo.partition(":")
    clean = urlunsplit((parts.scheme, hostport, parts.path, parts.query, parts.fragment))
    return clean, user or None, password if colon else None
