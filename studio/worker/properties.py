"""Spark conf as a properties file, for ``spark-submit --properties-file``.

Whatever is passed as ``--conf key=value`` stays on the command line of spark-submit and of the
driver JVM, where ``ps`` shows it to every user of the machine: a password in a session's conf
would be public. Workers and batches hand their conf over in a file of mode 0600 instead (with
``--load-spark-defaults``, so ``spark-defaults.conf`` still applies underneath).

Standard library only: the worker imports this before Spark starts.
"""

from __future__ import annotations

import os
from pathlib import Path


def write_properties(path: Path, conf: dict[str, str]) -> Path:
    """Spark conf as a properties file (mode 0600) for ``spark-submit --properties-file``, so that no
    value, a password included, is on a command line that ``ps`` shows every user of the machine."""
    lines = [f"{_escape_property(key, key=True)}={_escape_property(value)}" for key, value in conf.items()]
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:  # Spark reads properties files as UTF-8
        handle.write("\n".join(lines) + "\n")
    return path


_PROPERTY_ESCAPES = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t", "\f": "\\f", "=": "\\=", ":": "\\:", "#": "\\#", "!": "\\!"}


def _escape_property(text: str, key: bool = False) -> str:
    """java.util.Properties escaping: separators and comment marks, line breaks, and spaces that
    would otherwise be dropped (every space in a key, a value's leading ones)."""
    escaped = "".join(_PROPERTY_ESCAPES.get(char, char) for char in text)
    if key:
        return escaped.replace(" ", "\\ ")
    stripped = escaped.lstrip(" ")
    return "\\ " * (len(escaped) - len(stripped)) + stripped
