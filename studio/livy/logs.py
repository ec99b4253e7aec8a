"""Line-addressed reading of the log files that workers and batches write.

A worker's stdout and stderr (Spark's own log lines included) go to one file, so the lines
keep their order. ``LogFile`` indexes line starts incrementally, so paging through a long,
growing log (``/log?from=N&size=M``) reads only the lines asked for.
"""

from __future__ import annotations

import logging
import time
from array import array
from pathlib import Path

log = logging.getLogger("studio.livy.logs")


class LogFile:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._starts = array("q")  # byte offset of each complete line
        self._indexed = 0  # bytes indexed so far
        self._pending_start: int | None = None  # start of a line that has no newline yet

    def append(self, text: str, source: str = "StudioService") -> None:
        """Add a line in Spark's log format (the service's own notes: why a session ended). A note
        that cannot be written (a full disk) goes to the service's own log instead: it must never
        stop what it describes from happening."""
        stamp = time.strftime("%y/%m/%d %H:%M:%S")
        try:
            with open(self.path, "ab") as handle:
                handle.write(f"{stamp} INFO {source}: {text}\n".encode("utf-8", "backslashreplace"))
        except OSError as exc:
            log.warning("could not write to %s (%s): %s", self.path.name, exc.strerror, text)

    def _index(self) -> None:
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return
        if size < self._indexed:  # rewritten: start over
            self._starts = array("q")
            self._indexed = 0
            self._pending_start = None
        if size == self._indexed:
            return
        with open(self.path, "rb") as handle:
            handle.seek(self._indexed)
            chunk = handle.read(size - self._indexed)
        offset = self._indexed
        position = 0
        while True:
            if self._pending_start is None:
                self._pending_start = offset + position
            newline = chunk.find(b"\n", position)
            if newline < 0:
                break
            self._starts.append(self._pending_start)
            self._pending_start = None
            position = newline + 1
            if position >= len(chunk):
                break
        self._indexed = size

    def total(self) -> int:
        """Lines in the log, counting a last line that has no newline yet."""
        self._index()
        return len(self._starts) + (1 if self._has_partial() else 0)

    def _has_partial(self) -> bool:
        return self._pending_start is not None and self._pending_start < self._indexed

    def lines(self, start: int, count: int) -> list[str]:
        """Lines ``start`` .. ``start + count`` (fewer at the end), without newlines."""
        total = self.total()
        start = max(0, start)
        end = total if count < 0 else min(total, start + count)
        if start >= end:
            return []
        complete = len(self._starts)

        def line_start(index: int) -> int:
            return self._starts[index] if index < complete else int(self._pending_start or 0)

        first = line_start(start)
        last = line_start(end) if end < total else self._indexed
        with open(self.path, "rb") as handle:
            handle.seek(first)
            data = handle.read(last - first)
        text = data.decode("utf-8", "replace")
        if text.endswith("\n"):
            text = text[:-1]
        return [line.rstrip("\r") for line in text.split("\n")]

    def tail(self, count: int) -> list[str]:
        total = self.total()
        return self.lines(max(0, total - count), count)

    def page(self, start: int | None, size: int | None, max_lines: int) -> tuple[int, int, list[str]]:
        """Livy's paging (SessionServlet.serializeLogs): size defaults to 100 and a negative one
        means all; a missing or negative ``from`` means the tail. Returns (from, total, lines).
        At most ``max_lines`` lines are read: "all" of a long log is its newest ``max_lines``."""
        total = self.total()
        size = 100 if size is None else size
        if size < 0:
            size = min(total, max_lines)
        start = -1 if start is None else start
        if start < 0:
            start = max(0, total - size)
        return start, total, self.lines(start, min(size, max_lines))


class RetainedLogs:
    """Logs of sessions and batches that a DELETE removed from the API.

    As in Livy, a DELETEd session or batch leaves every Livy route (the list, GET by id or name)
    and frees its name at once; its log stays readable at its ``appInfo.driverLogUrl`` (a route no
    Livy client lists) for the retention time."""

    def __init__(self) -> None:
        self._logs: dict[int, tuple[float, LogFile]] = {}

    def keep(self, item_id: int, log: LogFile) -> None:
        self._logs[item_id] = (time.monotonic(), log)

    def get(self, item_id: int) -> LogFile | None:
        kept = self._logs.get(item_id)
        return kept[1] if kept else None

    def cull(self, retain: float) -> None:
        now = time.monotonic()
        for item_id, (since, _) in list(self._logs.items()):
            if now - since > retain:
                del self._logs[item_id]
