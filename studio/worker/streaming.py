"""Live output of the running statement: what it prints goes to the service in chunks while it
runs (``output`` messages, see ``protocol.py``), so the kernel can show it at once and keep it
when the statement is cancelled. Livy's own output (``text/plain`` at the end) is unchanged.

Writes land in a buffer; one thread sends what has gathered every ``interval`` seconds, so a
loop that prints a million lines costs a few messages a second, and a trivial statement costs
nothing until it ends: ``end`` sends what is left with the statement's other text
(``unstreamed``) just before its result.

What was sent is also kept (at most ``limit_bytes``, the statement's output limit) until the
statement ends: a service that reconnects after a restart has lost what it was sent, and gets
it again in one piece (``sent``; the worker's ``attach``).
"""

from __future__ import annotations

import codecs
import threading
import time
from typing import Any, Callable


class OutputStream:
    def __init__(
        self,
        send: Callable[[dict[str, Any]], Any],
        limit_bytes: int,
        interval: float = 0.05,
        lock: threading.RLock | None = None,
    ) -> None:
        self._send = send
        self._limit = limit_bytes
        self._interval = interval
        # ``lock`` is the worker's: holding it, nothing is sent, so a replay cannot interleave with a chunk.
        self._lock = threading.Condition(lock or threading.RLock())
        self._statement: int | None = None
        self._kept: list[str] = []
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._sent_bytes = 0
        self._sent_any = False
        self._cut = False
        self._noted = False
        self._decoder = codecs.getincrementaldecoder("utf-8")("backslashreplace")
        threading.Thread(target=self._run, name="studio-output", daemon=True).start()

    def begin(self, statement_id: int) -> None:
        with self._lock:
            self._statement = statement_id
            self._pending, self._pending_bytes, self._sent_bytes = [], 0, 0
            self._kept = []
            self._sent_any = self._cut = self._noted = False
            self._decoder.reset()
            self._lock.notify()

    def write(self, data: bytes) -> None:
        """What the statement wrote to stdout or stderr (as UTF-8 bytes); any thread may call it."""
        with self._lock:
            if self._statement is None or self._cut:
                return
            room = self._limit - self._sent_bytes - self._pending_bytes
            if len(data) > room:
                data = data[: max(0, room)]
                self._cut = True
            if data:
                self._pending.append(bytes(data))
                self._pending_bytes += len(data)

    def end(self, unstreamed: str) -> tuple[str, str | None]:
        """The statement is over: send what is left, and the output's text that is not in the stream
        (a magic's own text) — only if anything was streamed, so a quiet statement sends nothing.
        Returns everything it streamed and the ``unstreamed`` it sent (None: it sent nothing)."""
        with self._lock:
            statement, self._statement = self._statement, None
            text = self._take()
            sent_unstreamed = None
            if statement is not None and (text or self._sent_any):
                self._send({"op": "output", "id": statement, "text": text, "unstreamed": unstreamed})
                sent_unstreamed = unstreamed
            kept, self._kept = "".join(self._kept), []
            return kept, sent_unstreamed

    def sent(self) -> tuple[int | None, str]:
        """The running statement and what it streamed so far (call with the worker's lock held)."""
        with self._lock:
            return self._statement, "".join(self._kept)

    def _take(self) -> str:
        """The pending bytes as text (call with the lock held)."""
        data = b"".join(self._pending)
        self._pending, self._pending_bytes = [], 0
        self._sent_bytes += len(data)
        text = self._decoder.decode(data)
        if self._cut and not self._noted:
            text += f"\n[output cut at {self._limit:,} bytes (STUDIO_MAX_OUTPUT_BYTES)]\n"
            self._noted = True
        if text:
            self._sent_any = True
            self._kept.append(text)
        return text

    def _run(self) -> None:
        while True:
            with self._lock:
                while self._statement is None:
                    self._lock.wait()
                if self._pending:
                    text = self._take()
                    if text:
                        self._send({"op": "output", "id": self._statement, "text": text})
            time.sleep(self._interval)
