"""Messages between the session service and a session worker.

One JSON object per line over a Unix socket. The worker outlives the service that started it:
the service binds ``worker.sock`` in the worker's private work folder (0600 in a 0700 folder)
and the worker inherits the listening socket (``--listen-fd N``) and accepts on it for life, one
service at a time (a new connection replaces the old; peers of another user are refused). So a
service that restarts connects again and carries on (``attach``). While no service is connected
the worker keeps running its statement and keeps what the service must not miss (results until
they are acknowledged, what the running statement printed); after ``--orphan-timeout`` seconds
alone it stops itself. Every message has an ``op``:

service → worker
    ``start``     {master, conf, app_name, warmup, warmup_seconds, log_level, max_output_bytes, cancel_timeout, stop_timeout,
                  user, session} (first message to a new worker; it creates its SparkSession from it; a cold
                  worker's ``user`` is its session's Spark user, already in its environment and conf)
    ``attach``    {}: first message of a service that finds a running worker again; answered by
                  ``attached``, then the replays (below)
    ``activate``  {conf, session, user}: a warm worker is handed to a session: apply runtime SQL conf, then make
                  ``user`` the driver's Spark user (``studio.worker.identity``)
    ``execute``   {id, code, kind, max_rows, user}: run one statement (kind "pyspark" or "sql"); ``user``: who
                  sent it, named in its Spark jobs' description (else the session's Spark user)
    ``ack``       {id}: the service has recorded statement ``id``'s result; the worker forgets it
    ``cancel``    {id}: stop that statement's Spark jobs and interrupt its Python code
    ``complete``  {req, code, cursor}: completion candidates for the text before ``cursor``
    ``inspect``   {req, code, cursor, detail_level}: type, signature and docstring at ``cursor``
    ``hurry``     {}: a session waits for this starting pool worker: cut its warm-up short
    ``shutdown``  {}: stop Spark and exit

worker → service
    ``ready``      {app_id, spark_ui_url, spark_version, jvm_pid, python_pid, startup_seconds}
    ``failed``     {message}: the SparkSession could not be created; the worker exits next
    ``activated``  {ok, static: [keys that need their own JVM], error[, identity_error]}: ``identity_error``: the
                   conf is applied but the user could not be set (the service discards the worker)
    ``progress``   {id, progress, jobs: [...]}: live Spark progress of the running statement
    ``output``     {id, text[, unstreamed][, replay]}: what the running statement printed since the last
                   one (stdout and stderr as written, in order); the last, sent just before ``result``
                   and only if anything was printed, carries ``unstreamed``: the output's text/plain
                   that is not in the stream (a magic's own text). ``replay``: ``text`` is everything
                   the statement printed so far (after an ``attach``), replacing what the service has
    ``result``     {id, output}: output is Livy's statement output without ``execution_count``
    ``attached``   {pid, started, ready: <the ready message> | null, failed, session, last_id,
                   statements: {id: "queued" | "running" | "done"}, started_ms: {id: epoch ms}}: the
                   worker's state for a service that attached; ``last_id`` is the highest statement id
                   it was ever sent (-1: none), ``statements`` those it has not forgotten, ``started_ms``
                   when those of them that ran started. Then, in order, each "done" statement's
                   ``output`` (replay) and ``result``, and the running one's ``output`` (replay)
    ``completion`` {req, candidates}
    ``inspection`` {req, found, data}

A result can arrive twice (a replay races the original); the service records the first.
Lines can be large (images, SQL results), so readers must allow long lines.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Iterator

MAX_LINE_BYTES = 1024 * 1024 * 1024

# Folder in the worker's working directory for Arrow results that the service streams to clients.
RESULTS_DIR = ".studio-results"

# The worker's listening socket, in its working directory.
SOCKET_NAME = "worker.sock"

_MAX_UNIX_PATH = 100  # sun_path holds 108 bytes with its NUL; keep a margin


@contextlib.contextmanager
def socket_address(folder: Path) -> Iterator[str]:
    """An address for ``folder``/worker.sock that bind() and connect() accept: state folders can be
    deeper than a Unix socket path may be long, so a long one goes through a descriptor of the
    folder (``/proc/self/fd/N/worker.sock``), held open while the address is in use."""
    path = str(folder / SOCKET_NAME)
    if len(path.encode()) <= _MAX_UNIX_PATH:
        yield path
        return
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{fd}/{SOCKET_NAME}"
    finally:
        os.close(fd)


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
