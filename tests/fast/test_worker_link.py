"""The worker's end of its service connection (studio.worker.main.Link) and what it keeps for a
service that comes back (studio.worker.streaming.OutputStream), in-process: real Unix sockets, no
Spark."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path
from typing import Any

from studio.worker import protocol
from studio.worker.main import Link
from studio.worker.streaming import OutputStream


def _listener(folder: Path) -> socket.socket:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with protocol.socket_address(folder) as address:
        listener.bind(address)
    listener.listen(4)
    return listener


def _connect(folder: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with protocol.socket_address(folder) as address:
        sock.connect(address)
    return sock


def _wait(condition: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_a_deep_folder_still_gets_a_socket(tmp_path):
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    assert len(str(deep / protocol.SOCKET_NAME)) > 108
    listener = _listener(deep)
    client = _connect(deep)
    server, _ = listener.accept()
    client.sendall(b"x")
    assert server.recv(1) == b"x"
    for sock in (client, server, listener):
        sock.close()


def test_a_new_service_replaces_the_old_and_a_lonely_worker_gives_up(tmp_path):
    received: list[dict[str, Any]] = []
    orphaned = threading.Event()
    link = Link(_listener(tmp_path), received.append, orphan_timeout=0.5, on_orphaned=orphaned.set)
    link.start()
    assert not link.send({"op": "ready"})  # nobody there: said again on attach, not an error

    first = _connect(tmp_path)
    first.sendall(protocol.encode({"op": "attach"}))
    _wait(lambda: received == [{"op": "attach"}])
    assert link.send({"op": "attached"})
    with first.makefile("rb") as reader:
        assert protocol.decode(reader.readline()) == {"op": "attached"}

    second = _connect(tmp_path)  # a restarted service: it takes over, the old connection is closed
    second.sendall(protocol.encode({"op": "ack", "id": 3}))
    _wait(lambda: len(received) == 2)
    assert received[1] == {"op": "ack", "id": 3}
    assert first.recv(1) == b""
    first.close()
    assert link.send({"op": "result", "id": 4})
    with second.makefile("rb") as reader:
        assert protocol.decode(reader.readline())["id"] == 4

    second.close()  # the service went away: the worker waits for it, then gives up
    assert not orphaned.wait(0.2)
    assert orphaned.wait(3)


def test_the_output_of_the_running_statement_is_kept_until_it_ends(tmp_path):
    sent: list[dict[str, Any]] = []
    lock = threading.RLock()
    stream = OutputStream(sent.append, limit_bytes=1024, interval=0.01, lock=lock)
    stream.begin(7)
    stream.write(b"one\n")
    _wait(lambda: len(sent) == 1)
    stream.write("twö\n".encode())
    _wait(lambda: len(sent) == 2)
    assert stream.sent() == (7, "one\ntwö\n")  # what a service that attaches now gets again in one piece
    kept, unstreamed = stream.end("extra")
    assert (kept, unstreamed) == ("one\ntwö\n", "extra")
    assert sent[-1] == {"op": "output", "id": 7, "text": "", "unstreamed": "extra"}
    assert stream.sent() == (None, "")
    stream.begin(8)
    assert stream.end("quiet") == ("", None)  # nothing printed: nothing sent, nothing kept
