"""``studio run``'s progress for programs: JSON lines in a file (``studio run --events FILE``).

What ``studio run`` prints on stderr is for people and may change; this channel is what the
executions API follows. One JSON object per line, appended and flushed as it happens, each with
``event`` and ``time`` (epoch seconds):

``started``        ``pid``: the run handles SIGINT and SIGTERM from now on (a stop before this
                   line would kill the process before it could write its output notebook)
``kernel_ready``   ``cells``: the kernel runs; the number of code cells that will run
``cell_started``   ``index`` (in the notebook), ``number`` (1-based among the code cells), ``total``
``cell_finished``  the same, with ``status`` (completed, failed, interrupted), ``duration``
                   (seconds), ``ename`` and ``evalue``
``finished``       ``exit_code``, ``status`` (succeeded, failed, interrupted, usage), ``message``
                   (for people: "cell 2 of 3 failed: ZeroDivisionError: ..."); the last line

The file lives in the execution's own folder, so it outlives the server that started the run: a
restarted ``studio serve`` reads it from the start to catch up with a run it adopts, or to learn
how a run ended while no server was watching. A reader takes complete lines only (one being
written is read next time) and skips a line that is not JSON.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

STARTED, KERNEL_READY, CELL_STARTED, CELL_FINISHED, FINISHED = (
    "started", "kernel_ready", "cell_started", "cell_finished", "finished",
)  # fmt: skip


class EventWriter:
    """Appends events to a file (none when ``path`` is None); never fails the run over it."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._fd: int | None = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            # O_APPEND and one write() per line: a reader never sees two events' bytes mixed.
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)

    def emit(self, event: str, **fields: Any) -> None:
        if self._fd is None:
            return
        line = json.dumps({"event": event, "time": round(time.time(), 3), **fields}, default=str) + "\n"
        try:
            os.write(self._fd, line.encode("utf-8", "backslashreplace"))
        except OSError:
            pass  # a full disk must not end the run; the output notebook says what happened

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class EventReader:
    """Reads the events a run has appended since the last call."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0
        self._partial = b""

    def read(self) -> list[dict[str, Any]]:
        """The complete events written since the last call (none when there is no file yet)."""
        try:
            with open(self.path, "rb") as handle:
                handle.seek(self._offset)
                data = handle.read()
        except OSError:
            return []
        self._offset += len(data)
        data = self._partial + data
        *lines, self._partial = data.split(b"\n")
        events = []
        for line in lines:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict) and isinstance(event.get("event"), str):
                events.append(event)
        return events
