"""Messages between the session service and a session worker.

One JSON object per line over a Unix socket pair that the service creates and the worker
inherits (``--fd N``). Every message has an ``op``:

service → worker
    ``start``     {master, conf, app_name, warmup, warmup_seconds, log_level, max_output_bytes, cancel_timeout, stop_timeout}
                  (first message; the worker creates its SparkSession from it)
    ``activate``  {conf}: apply runtime SQL conf when a warm worker is handed to a session
    ``execute``   {id, code, kind, max_rows}: run one statement (kind "pyspark" or "sql")
    ``cancel``    {id}: stop that statement's Spark jobs and interrupt its Python code
    ``complete``  {req, code, cursor}: completion candidates for the text before ``cursor``
    ``inspect``   {req, code, cursor, detail_level}: type, signature and docstring at ``cursor``
    ``shutdown``  {}: stop Spark and exit

worker → service
    ``ready``      {app_id, spark_ui_url, spark_version, jvm_pid, python_pid, startup_seconds}
    ``failed``     {message}: the SparkSession could not be created; the worker exits next
    ``activated``  {ok, static: [keys that need their own JVM], error}
    ``progress``   {id, progress, jobs: [...]}: live Spark progress of the running statement
    ``output``     {id, text[, unstreamed]}: what the running statement printed since the last one
                   (stdout and stderr as written, in order); the last, sent just before ``result``
                   and only if anything was printed, carries ``unstreamed``: the output's text/plain
                   that is not in the stream (a magic's own text)
    ``result``     {id, output}: output is Livy's statement output without ``execution_count``
    ``completion`` {req, candidates}
    ``inspection`` {req, found, data}

Lines can be large (images, SQL results), so readers must allow long lines.
"""

from __future__ import annotations

import json
from typing import Any

MAX_LINE_BYTES = 1024 * 1024 * 1024

# Folder in the worker's working directory for Arrow results that the service streams to clients.
RESULTS_DIR = ".studio-results"


def encode(message: dict[str, Any]) -> bytes:
    """One message as a line of UTF-8 JSON (JSON escapes newlines inside strings).

    Text that UTF-8 cannot hold (lone surrogates, e.g. a file name's undecodable bytes under
    ``surrogateescape``) travels as its backslash escape, ``\\udcff``: what a statement prints must
    never break the line that carries it, and with it the worker."""
    text = json.dumps(message, ensure_ascii=False, separators=(",", ":"), default=str)
    try:
        return text.encode("utf-8") + b"\n"
    except UnicodeEncodeError:
        safe = json.dumps(
            _escape_surrogates(message), ensure_ascii=False, separators=(",", ":"), default=lambda o: _escape_surrogates(str(o))
        )
        return safe.encode("utf-8") + b"\n"


def _escape_surrogates(value: Any) -> Any:
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, dict):
        return {_escape_surrogates(k): _escape_surrogates(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_escape_surrogates(v) for v in value]
    return value


def decode(line: bytes) -> dict[str, Any]:
    message = json.loads(line)
    if not isinstance(message, dict) or "op" not in message:
        raise ValueError(f"not a protocol message: {line[:200]!r}")
    return message
