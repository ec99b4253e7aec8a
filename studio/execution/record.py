"""The run record (``studio run --record DIR``): what ran, with what, where, and how each cell
went, as strict JSON in ``record.json``, with the end of the Spark driver log in ``driver.log``
beside it. ``json_safe`` is the one rule that keeps a record (and what the executions API says
about it) valid JSON whatever the parameters hold."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from studio.process import run_to_end

if TYPE_CHECKING:
    from studio.execution.runner import NotebookRun, RunOptions


def utc_now() -> str:
    """Now, as the record's times are written: ISO 8601 in UTC, to the millisecond."""
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")


def json_safe(value: Any) -> Any:
    """``value`` as strict JSON can carry it: NaN and infinities become the strings "NaN",
    "Infinity" and "-Infinity" (JSON has no such numbers; a bare NaN token breaks most readers),
    tuples and sets become lists, dates ISO text, other objects their str."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else "Infinity" if value > 0 else "-Infinity"
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [json_safe(v) for v in value]
    if isinstance(value, (dt.date, dt.time)):
        return value.isoformat()
    return str(value)


# What a repository's own .git/config could make `git status` run: an fsmonitor command, hooks
# (post-index-change), clean filters, and the same again inside submodules. All off.
_SAFE_GIT = ["-c", "core.fsmonitor=false", "-c", "core.hooksPath=/dev/null", "-c", "core.untrackedCache=false"]


def git_commit(folder: Path) -> dict[str, Any] | None:
    """The commit the notebook's folder is at, and whether it has changes; None outside a repository.

    The folder may be a cloned repository whose ``.git/config`` names commands; nothing it names runs.
    """
    env = {**os.environ, "GIT_TERMINAL_PROMPT": "0", "GIT_OPTIONAL_LOCKS": "0", "GIT_PAGER": "cat"}

    def git(*args: str) -> str | None:
        """What git printed, or None when it failed or took over 10 s (then it was killed)."""
        done = run_to_end(["git", *_SAFE_GIT, *args], timeout=10, cwd=folder, env=env)
        return done.output if done.code == 0 else None

    try:
        commit = git("rev-parse", "--verify", "HEAD")
        if commit is None:
            return None
        # Reading config runs nothing; every filter it defines is switched off for the status below.
        filters = (git("config", "--name-only", "--get-regexp", r"^filter\..*\.(clean|smudge|process)$") or "").split()
        off = [arg for name in filters for arg in ("-c", f"{name}=")]
        dirty = git(*off, "status", "--porcelain", "--ignore-submodules=all")
        if dirty is None:
            return None
        return {"commit": commit.strip(), "dirty": bool(dirty.strip())}
    except OSError:  # no git on this machine
        return None


DRIVER_LOG_LINES = 10_000  # the end of the driver log that a record keeps


def driver_log(url: str, session: dict[str, Any]) -> list[str] | None:
    """The end of the session's driver log, kept in the record: the service's link to it dies with
    the session. Read from ``appInfo.driverLogUrl``, which Spark Studio's service keeps for a while
    after a DELETE; else from ``/sessions/{id}/log`` while the session is listed."""
    from studio.livy_client import LivyClient, LivyError

    client = LivyClient(url, timeout=30)
    try:
        link = (session.get("appInfo") or {}).get("driverLogUrl")
        # Only on the service itself: its credentials go with the request, and a compute chooses this URL.
        if isinstance(link, str) and _same_origin(link, client.url):
            response = client.http.get(link)
            if response.status_code == 200:
                return response.text.splitlines()[-DRIVER_LOG_LINES:]
        return client.log(session["id"], size=DRIVER_LOG_LINES)
    except (LivyError, OSError, ValueError):
        return None
    except Exception:  # noqa: BLE001 - httpx errors: the record is written without the log
        return None
    finally:
        client.close()


def _same_origin(url: str, base: str) -> bool:
    """Same scheme, host and port (a prefix test would let ``http://127.0.0.1:8998.evil.example`` pass)."""
    from urllib.parse import urlsplit

    left, right = urlsplit(url), urlsplit(base)
    try:
        return (left.scheme, left.hostname, left.port) == (right.scheme, right.hostname, right.port) and not left.username
    except ValueError:  # a port that is not a number
        return False


def write_record(
    run: NotebookRun, options: RunOptions, url: str, session: dict[str, Any] | None, driver_log: list[str] | None = None
) -> Path:
    """The run record: what ran, with what, where, and how each cell went; the driver log beside it."""
    folder: Path = options.record  # type: ignore[assignment]
    folder.mkdir(parents=True, exist_ok=True)
    kept = None
    if session is not None:
        kept = {k: session.get(k) for k in ("id", "appId", "appInfo", "kind", "driverMemory", "executorMemory", "conf", "jars", "pyFiles")}
        if driver_log is not None:
            (folder / "driver.log").write_text("\n".join(driver_log) + "\n", encoding="utf-8", errors="replace")
            kept["driver_log"] = "driver.log"  # beside record.json; appInfo.driverLogUrl ends with the session
    failure = None
    if run.failure:
        index, ename, evalue = run.failure
        numbers = [r.index for r in run.reports]
        failure = {"cell": numbers.index(index) + 1 if index in numbers else None, "index": index, "ename": ename, "evalue": evalue}
    record = {
        "notebook": str(options.notebook),
        "notebook_sha256": hashlib.sha256(run.source_bytes).hexdigest(),
        "output": str(options.output),
        "parameters": run.values,
        "git": git_commit(options.notebook.parent),
        "livy_url": url,
        "session_name": run.session_name,
        "session": kept,
        "spark_app_id": session.get("appId") if session else None,
        "kernel": options.kernel,
        "started": run.started,
        "ended": utc_now(),
        "status": "interrupted" if run.interrupted else "failed" if run.failure else "succeeded",
        "failure": failure,
        "cells": [r.__dict__ for r in run.reports],
    }
    path = folder / "record.json"
    path.write_text(json.dumps(json_safe(record), indent=2, allow_nan=False) + "\n")
    return path
