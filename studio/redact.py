"""Secrets out of logs and API responses: one rule for which settings hold a secret.

A conf key that names a password, a secret, a token, a key or a credential holds a secret
(``spark.hadoop.fs.s3a.secret.key``, ``spark.ssl.keyStorePassword``, ``spark.myapp.apiToken``);
its value is shown as ``REDACTED``, as Spark's own UI does with ``spark.redaction.regex``. Inside
a value, JVM options (``-Dname=value``) and ``name=value`` pairs are redacted by the same rule,
so ``spark.driver.extraJavaOptions=-Dfs.s3a.secret.key=...`` does not leak either. The session
and batch themselves get the real values; only what is shown is redacted.

Only the standard library: the kernel imports this.
"""

from __future__ import annotations

import re
from typing import Any

SECRET_NAME = re.compile(r"(?i)pass(word|wd|phrase)|secret|token|credential|key")
REDACTED = "*********(redacted)"
# -Dname=value, or name=value inside a longer value (JVM options, option strings)
_PAIR = re.compile(r"(?P<name>(?:-D)?[\w.\-]+)=(?P<value>\S*)")


def is_secret(name: str) -> bool:
    return bool(SECRET_NAME.search(name))


def value(name: str, text: Any) -> Any:
    """``text`` as it may be shown for the setting ``name``."""
    if is_secret(name):
        return REDACTED
    if isinstance(text, str) and "=" in text:
        return _PAIR.sub(lambda m: f"{m['name']}={REDACTED}" if is_secret(m["name"]) else m.group(0), text)
    return text


def conf(settings: dict[str, Any] | None) -> dict[str, Any] | None:
    """A conf mapping with the values of secret keys redacted."""
    if not isinstance(settings, dict):
        return settings
    return {key: value(str(key), text) for key, text in settings.items()}


def session_body(body: dict[str, Any]) -> dict[str, Any]:
    """A Livy session or batch request as it may be shown: its ``conf`` redacted."""
    if "conf" not in body:
        return body
    return {**body, "conf": conf(body["conf"])}


def command(argv: list[str]) -> list[str]:
    """A command line as it may be logged: ``--conf key=value`` and ``-Dkey=value`` redacted."""
    shown: list[str] = []
    after_conf = False
    for arg in argv:
        if after_conf and "=" in arg:
            key, _, text = arg.partition("=")
            shown.append(f"{key}={value(key, text)}")
        elif arg.startswith("--conf=") and "=" in arg[len("--conf=") :]:
            key, _, text = arg[len("--conf=") :].partition("=")
            shown.append(f"--conf={key}={value(key, text)}")
        else:
            shown.append(value("", arg) if arg.startswith("-D") else arg)
        after_conf = arg in ("--conf", "-c")
    return shown
